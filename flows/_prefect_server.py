"""A `prefect server start` process on loopback: start it, wait until it is healthy, point a process at it, stop it.

Why one real server: without `PREFECT_API_URL` every Python process that runs a Prefect task starts an
ephemeral server of its own, so each Dask worker process would start one. Distributed runs therefore point
the flow process and every worker at ONE `prefect server start` on loopback (docs/design.md#flows). Which
server a flow uses is `flows._runtime.prefect_api`; a home's own is `flows._home_server`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Offline and quiet: no analytics, no telemetry. Applied to this process and to every child it starts.
OFFLINE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Exec the given `python ...` command once Linux is asked to SIGTERM it when its parent (argv[1]) dies
# (`lifeline.die_with_parent`), so a SIGKILLed flow or test run leaves no server behind.
_DIE_WITH_PARENT = (
    "import os, signal, sys\n"
    "from pipeline.base.lifeline import die_with_parent\n"
    "die_with_parent(int(sys.argv[1]), signal.SIGTERM)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n")


@dataclass
class PrefectServer:
    """A `prefect server start` subprocess on loopback; `api_url` is what PREFECT_API_URL must hold."""
    api_url: str
    prefect_home: Path
    process: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()   # uvicorn shuts down on SIGTERM
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """The Prefect API at `api_url` answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_prefect_server(prefect_home: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None,
                         timeout: float = 180, ui: bool = False, scheduler: bool = False) -> PrefectServer:
    """Start `prefect server start` (by default API only: no UI, no scheduler) and wait for `/api/health`.

    `prefect_home` holds the server's SQLite database and its log.
    """
    home = Path(prefect_home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(home), "PREFECT_SERVER_UI_ENABLED": str(ui).lower()}
    env.pop("PREFECT_API_URL", None)   # the server must not talk to another server
    log = home / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), "-m", "prefect", "server", "start", "--host", host,
             "--port", str(port), "--ui" if ui else "--no-ui", "--analytics-off",
             "--scheduler" if scheduler else "--no-scheduler", "--no-late-runs"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = PrefectServer(api_url, home, proc, log)
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
def prefect_server(prefect_home, **kwargs):
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
