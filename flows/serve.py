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

    from flows._runtime import prefect_api
    from pipeline.base.home import Home
    overrides = {"source": args.source} if args.source else {}
    if args.config:
        overrides["config"] = args.config
    if args.dask_address:
        overrides["dask_address"] = args.dask_address   # scheduled runs mine on that cluster
    home = str(Home.resolve(args.home).make().root)
    deployments = load_deployments(args.prefect_yaml, overrides, home)
    with prefect_api(home) as api_url:   # $PREFECT_API_URL, else the home's server (its scheduler runs)
        print(f"Prefect API {api_url}")
        for dep in deployments:
            print(f"serving {dep.name}: schedules {[s.schedule.cron for s in dep.schedules]} params {dep.parameters}")
        serve(*deployments, pause_on_shutdown=False)
    return 0


def _ui(args) -> int:
    """Hold the home's Prefect server (starting it, on `--port` if free) and print where its UI is."""
    import time

    from flows._home_server import home_prefect_server, prefect_dir
    from pipeline.base.home import Home
    home = Home.resolve(args.home).make().root
    with home_prefect_server(home, port=args.port) as api_url:
        if api_url is None:
            raise ValueError(f"the Prefect server of {home} runs on another host; see {prefect_dir(home)}/server.json")
        print(f"Prefect UI of {home}: {api_url.removesuffix('/api')}  (every flow run of this home; Ctrl-C stops)",
              flush=True)
        try:
            while args.wait:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
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

    u = sub.add_parser("ui", help="open the Prefect UI on the home's flow-run history",
                       description="Start (or join) the home's Prefect server, whose database "
                                   "(<home>/prefect/prefect.db) holds every flow run of every verb, print the UI's "
                                   "address, and keep the server up until Ctrl-C. Commands run meanwhile on the "
                                   "same home report to it.")
    u.add_argument("--port", type=int, default=4200, help="port when the server is not running yet (default 4200; "
                                                          "a free one if taken)")
    u.add_argument("--no-wait", dest="wait", action="store_false", help="print the address and return")
    u.set_defaults(func=_ui)
