"""`harvest serve`: serve the deployments of `prefect.yaml` (cron schedules included) from one process."""
from __future__ import annotations

from pathlib import Path

import yaml

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


def load_deployments(path=PREFECT_YAML, overrides: dict | None = None, home: str | None = None):
    """RunnerDeployments built from `prefect.yaml`: the same names, entrypoints, parameters and schedules."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron
    spec = yaml.safe_load(Path(path).read_text())
    root = Path(path).resolve().parent
    deployments = []
    for d in spec["deployments"]:
        file, func = d["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(f"{root / file}:{func}")
        params = {**d.get("parameters", {}), **(overrides or {})}
        if home:
            params["home"] = home
        schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
                     for s in d.get("schedules", []) if "cron" in s]
        deployments.append(flow.to_deployment(name=d["name"], description=d.get("description"), parameters=params,
                                              schedules=schedules))
    return deployments


def _run(args) -> int:
    from prefect import serve

    from pipeline.home import Home
    overrides = {"source": args.source} if args.source else {}
    if args.config:
        overrides["config"] = args.config
    if args.dask_address:
        overrides["dask_address"] = args.dask_address   # scheduled runs mine on that cluster
    deployments = load_deployments(args.prefect_yaml, overrides, str(Home.resolve(args.home).make().root))
    for dep in deployments:
        print(f"serving {dep.name}: schedules {[s.schedule.cron for s in dep.schedules]} params {dep.parameters}")
    serve(*deployments, pause_on_shutdown=False)
    return 0


def register(sub) -> None:
    from flows._runtime import add_dask_address

    p = sub.add_parser("serve", help="serve the scheduled deployments of prefect.yaml",
                       description="Serve the deployments in prefect.yaml (nightly incremental harvest) from this "
                                   "process. Point PREFECT_API_URL at a long-lived `prefect server start` first.")
    p.add_argument("--source", default=None, help="override the source folder the scheduled harvest watches")
    p.add_argument("--config", default=None, help="override the training/mining config")
    p.add_argument("--prefect-yaml", default=str(PREFECT_YAML), help="deployments file (default: the repo's)")
    add_dask_address(p)
    p.set_defaults(func=_run)
