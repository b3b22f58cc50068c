"""One Prefect history per home: every flow run of every verb lands in `<home>/prefect/prefect.db`.

A home has at most one `prefect server start` at a time, so one process writes its SQLite database:
- A command takes a *lease* (a file naming its host, pid and start time) while it uses the server, under a lock
  file that orders start-up, lease-taking and shut-down.
- The server runs under a small *supervisor* process (`python -m flows._home_server`), not under the command:
  a second command on the same home uses the running server, and the first one ending (or being SIGKILLed)
  does not pull it from under the second.
- The supervisor stops the server once no live lease is left for `$HARVEST_PREFECT_LINGER` seconds (default
  1): a killed command's lease is dead at once, so nothing outlives the commands that use it. If the
  supervisor itself is killed, the server dies with it (PR_SET_PDEATHSIG).

The same database is what `harvest ui` shows (Prefect's UI, served by this server), and what a user's own
`PREFECT_HOME=<home>/prefect prefect server start` opens when no harvest command runs.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from flows._prefect_server import healthy, start_prefect_server
from pipeline.base.lifeline import Owner

FOLDER, LOCK, STATE, LEASES, LOG = "prefect", ".lock", "server.json", "leases", "supervisor.log"
LINGER_ENV = "HARVEST_PREFECT_LINGER"
START_TIMEOUT = 180.0


def prefect_dir(home) -> Path:
    from pipeline.base.home import Home
    return Home.resolve(home).root / FOLDER


@contextmanager
def _locked(folder: Path):
    with open(folder / LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def read_state(folder: Path) -> dict | None:
    """The running server of this home (`api_url`, `supervisor` Owner fields, ...), or None."""
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return None


def _owner(d: dict) -> Owner:
    return Owner(d["host"], int(d["pid"]), d.get("started"))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def live_leases(folder: Path) -> list[Path]:
    """Lease files whose process is alive (or on another host: not ours to judge); dead ones are removed."""
    live = []
    for lease in sorted((folder / LEASES).glob("*.json")):
        try:
            owner = _owner(json.loads(lease.read_text()))
        except (OSError, ValueError, KeyError):
            continue    # being written
        if owner.is_dead():
            lease.unlink(missing_ok=True)
        else:
            live.append(lease)
    return live


def _take_lease(folder: Path) -> Path:
    me = Owner.me()
    (folder / LEASES).mkdir(exist_ok=True)
    lease = folder / LEASES / f"{me.host}-{me.pid}-{time.monotonic_ns()}.json"
    _write_json(lease, {"host": me.host, "pid": me.pid, "started": me.started})
    return lease


def _start_supervisor(folder: Path, port: int | None) -> dict:
    """Spawn the supervisor (its own session: a Ctrl-C of the command does not reach it) and wait until its
    server answers. Called under the lock."""
    (folder / STATE).unlink(missing_ok=True)
    if port and not _port_free(port):
        port = None   # taken: any free port
    with open(folder / LOG, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows._home_server", str(folder), str(port or 0)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        state = read_state(folder)
        if state and state.get("pid") == proc.pid:
            return state
        if proc.poll() is not None:
            tail = (folder / LOG).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the Prefect server of {folder.parent} did not start (code {proc.returncode}); "
                               f"see {folder / LOG}:\n{tail}")
        time.sleep(0.1)
    proc.terminate()
    raise TimeoutError(f"the Prefect server of {folder.parent} did not start in {START_TIMEOUT:.0f} s; see {folder / LOG}")


def _running(folder: Path) -> dict | None:
    state = read_state(folder)
    if state is None:
        return None
    if state["host"] != socket.gethostname():
        return state    # another host's: the caller decides
    if _owner(state).is_dead() or not healthy(state["api_url"]):
        return None
    return state


@contextmanager
def home_prefect_server(home, port: int | None = None):
    """Yield the API URL of the home's Prefect server, starting it if none runs; hold a lease meanwhile.

    Yields None when the home's server runs on another host (a home on a shared file system): the caller then
    uses a server of its own, and that command's history is not kept."""
    folder = prefect_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        state = _running(folder) or _start_supervisor(folder, port)
        if state["host"] != socket.gethostname():
            lease = None
        else:
            lease = _take_lease(folder)
    try:
        yield state["api_url"] if lease else None
    finally:
        if lease:
            lease.unlink(missing_ok=True)


@contextmanager
def running_home_server(home):
    """Yield the API URL of the home's server when one runs on this host (a lease held meanwhile), else None:
    nothing is started, and a home without a `prefect/` folder gets none."""
    folder = prefect_dir(home)
    if not (folder / LOCK).exists():
        yield None
        return
    with _locked(folder):
        state = _running(folder)
        lease = _take_lease(folder) if state and state["host"] == socket.gethostname() else None
    try:
        yield state["api_url"] if lease else None
    finally:
        if lease:
            lease.unlink(missing_ok=True)


# ---- the supervisor ------------------------------------------------------------------------------------

def supervise(folder: Path, port: int = 0, poll: float = 0.2) -> int:
    """Run the home's server until no live lease is left for the linger time. Returns the exit code."""
    linger = float(os.environ.get(LINGER_ENV, "1"))
    server = start_prefect_server(folder, port=port or None, ui=True, scheduler=True)
    me = Owner.me()
    _write_json(folder / STATE, {"api_url": server.api_url, "host": me.host, "pid": me.pid, "started": me.started,
                                 "server_pid": server.process.pid})
    print(f"serving {server.api_url} (database {folder / 'prefect.db'})", flush=True)
    idle_since = None
    try:
        while server.process.poll() is None:
            time.sleep(poll)
            if live_leases(folder):
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since < linger:
                continue
            with _locked(folder):   # no lease is taken, and no other server starts, until this one is gone
                if not live_leases(folder):
                    print("no command uses the server: stopping", flush=True)
                    (folder / STATE).unlink(missing_ok=True)
                    server.stop()
                    return 0
        print(f"the server exited with code {server.process.returncode}", flush=True)
        return 1
    finally:
        state = read_state(folder)
        if state and state.get("pid") == me.pid:
            (folder / STATE).unlink(missing_ok=True)
        server.stop()


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # run the finally: stop the server
    sys.exit(supervise(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0))
