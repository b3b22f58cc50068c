"""Helpers for the flow tests: one real Prefect server per session, flows run in killable subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from flows._prefect_server import prefect_server, use_prefect_api


@contextmanager
def session_server(prefect_home: Path):
    """Start one loopback Prefect server and point this process and every child at it (PREFECT_API_URL;
    PREFECT_HOME keeps clients' local files in the temp folder too)."""
    old_home = os.environ.get("PREFECT_HOME")
    with prefect_server(prefect_home / "server") as server:
        os.environ["PREFECT_HOME"] = str(prefect_home / "client")
        try:
            with use_prefect_api(server.api_url):
                yield server
        finally:
            if old_home is None:
                os.environ.pop("PREFECT_HOME", None)
            else:
                os.environ["PREFECT_HOME"] = old_home


def spawn_flow(module: str, flow: str, log: Path, **kwargs) -> subprocess.Popen:
    """Run `module.flow(**kwargs)` in a child Python (same environment), so that a test can SIGKILL it."""
    code = (f"import json, sys; from {module} import {flow}; "
            f"{flow}(**json.loads(sys.argv[1]))")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", code, json.dumps(kwargs)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ))


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met after {timeout:.0f}s")
