"""Shared runtime of the flows: one Prefect API server and a Dask cluster sized to the machine.

Why one real server: without `PREFECT_API_URL` every Python process that runs a Prefect task starts an
ephemeral server of its own, so each Dask worker process would start one. Distributed runs therefore point
the flow process and every worker at ONE `prefect server start` on loopback (docs/design.md#flows).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

# Offline and quiet: no analytics, no telemetry. Applied to this process and to every child it starts.
OFFLINE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Exec the given `python ...` command after asking Linux to SIGTERM it when its parent dies, so a SIGKILLed
# flow or test run leaves no server behind (elsewhere the server simply outlives a killed parent).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "if os.getppid() == 1:\n"
    "    sys.exit(0)  # the parent is already gone\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")


@dataclass
class PrefectServer:
    """A `prefect server start` subprocess on loopback; `api_url` is what PREFECT_API_URL must hold."""
    api_url: str
    prefect_home: Path
    process: subprocess.Popen
    log: Path
    _own_home: bool = field(default=False, repr=False)

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()   # uvicorn shuts down on SIGTERM
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._own_home:
            shutil.rmtree(self.prefect_home, ignore_errors=True)


_TEMP_PREFIX, _OWNER = "harvest-prefect-", "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True     # someone else's live process
    return True


def sweep_stale_prefect_homes(tmp: str | os.PathLike | None = None) -> list[Path]:
    """Remove the temporary server folders whose owner process is gone: a SIGKILLed `harvest` cannot run
    `stop()` (its server dies with it, by PR_SET_PDEATHSIG, but the folder stays). Returns what was removed."""
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(_TEMP_PREFIX + "*"):
        try:
            pid = int((folder / _OWNER).read_text())
        except (OSError, ValueError):
            continue    # not ours to judge (no owner recorded)
        if not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """The Prefect API at `api_url` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_prefect_server(prefect_home: str | os.PathLike | None = None, host: str = "127.0.0.1",
                         port: int | None = None, timeout: float = 180, ui: bool = False,
                         scheduler: bool = False) -> PrefectServer:
    """Start `prefect server start` (by default API only: no UI, no scheduler) and wait for `/api/health`.

    `prefect_home` (default: a fresh temp folder, removed by `stop()`) holds the server's SQLite database.
    """
    own = prefect_home is None
    if own:
        sweep_stale_prefect_homes()
    home = Path(prefect_home or tempfile.mkdtemp(prefix=_TEMP_PREFIX))
    home.mkdir(parents=True, exist_ok=True)
    if own:
        (home / _OWNER).write_text(str(os.getpid()))
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(home), "PREFECT_SERVER_UI_ENABLED": str(ui).lower()}
    env.pop("PREFECT_API_URL", None)   # the server must not talk to another server
    log = home / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, "-m", "prefect", "server", "start", "--host", host,
             "--port", str(port), "--ui" if ui else "--no-ui", "--analytics-off",
             "--scheduler" if scheduler else "--no-scheduler", "--no-late-runs"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = PrefectServer(api_url, home, proc, log, own)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"prefect server exited with code {proc.returncode}; see {log}:\n"
                               + log.read_text(errors="replace")[-2000:])
        if healthy(api_url):
            return server
        time.sleep(0.25)
    server.stop()
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout:.0f}s; see {log}")


@contextmanager
def prefect_server(prefect_home=None, **kwargs):
    server = start_prefect_server(prefect_home, **kwargs)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def use_prefect_api(api_url: str):
    """Point this process (settings context) and the processes it spawns (environment) at `api_url`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            try:
                yield api_url
            finally:
                drain_prefect_clients()
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old


def drain_prefect_clients(timeout: float = 10) -> None:
    """Send this process's queued Prefect logs and events now, while their server is still up (else they
    are retried against a stopped server at interpreter exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout, at_exit=False)


@contextmanager
def prefect_api(home=None):
    """Use `$PREFECT_API_URL` when set (a user's long-lived server, docker compose); else the home's own
    loopback server, whose database keeps every run's history (`flows._home_server`), shared by the flow,
    its Dask workers and any other command on the same home. Without a home: a temporary server."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    from flows._home_server import home_prefect_server

    with home_prefect_server(home) if home is not None else nullcontext() as url:
        if url:
            with use_prefect_api(url):
                yield url
            return
    with prefect_server() as server, use_prefect_api(server.api_url):
        yield server.api_url


def local_cluster_kwargs(n_workers: int | None = None, api_url: str | None = None) -> dict:
    """`distributed.LocalCluster` kwargs sized to the machine's devices: one worker process per GPU, else 2
    (1 on a one-core machine). Each worker runs one task at a time; torch gets the cores divided among the
    workers (OMP_NUM_THREADS, which overrides the nanny's default of 1). Workers report to `api_url`."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = os.cpu_count() or 1
    n = n_workers or gpus or min(2, cores)
    threads = str(max(1, cores // n))
    env = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_") or k in OFFLINE_ENV}
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **({"PREFECT_API_URL": api_url} if api_url else {}))
    return dict(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=":0", env=env)   # dashboard on any free port: no clash with other clusters


def dask_task_runner(address: str | None = None, n_workers: int | None = None, api_url: str | None = None):
    """prefect-dask runner on the scheduler at `address`, or on a fresh LocalCluster sized to the devices
    whose workers report to `api_url`. Workers of an existing cluster need no Prefect environment: each task
    carries the flow's settings, PREFECT_API_URL included, so run the flow against a real server
    (`prefect_api()`), never an ephemeral one."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs=local_cluster_kwargs(n_workers, api_url))


DASK_ADDRESS_ENV = "HARVEST_DASK_ADDRESS"


def add_dask_address(parser) -> None:
    """`--dask-address`, defaulting to $HARVEST_DASK_ADDRESS (set by docker/compose.yaml)."""
    parser.add_argument("--dask-address", metavar="tcp://HOST:PORT", default=os.environ.get(DASK_ADDRESS_ENV) or None,
                        help=f"use this Dask scheduler (default ${DASK_ADDRESS_ENV} if set, else a LocalCluster: "
                             "one worker per GPU, or 2 on CPU)")


def gpu_index(worker_name, n_gpus: int) -> int:
    """The GPU of a Dask worker by its name: the trailing number modulo the visible GPUs. LocalCluster names
    workers 0..n-1; `dask worker --nworkers N --name w` names them w-0..w-(N-1); a name without a number (or a
    worker named by its address, whose digits are a port) gets GPU 0, right for one GPU per worker host."""
    name = str(worker_name)
    match = None if "://" in name else re.search(r"(\d+)$", name)
    return int(match.group(1)) % n_gpus if match and n_gpus else 0


def worker_device() -> str:
    """The torch device of this Dask worker (`gpu_index`), so one worker per GPU; else CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    try:
        from distributed import get_worker
        name = get_worker().name
    except (ValueError, ImportError):   # not inside a worker
        name = 0
    return f"cuda:{gpu_index(name, torch.cuda.device_count())}"
