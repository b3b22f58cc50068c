"""One Prefect history per home (flows._home_server): commands without PREFECT_API_URL report to the home's own
server, whose SQLite database persists under <home>/prefect; two commands on one home share one server, a
killed one does not take it from the other, and nothing outlives the last command."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from flows._home_server import home_prefect_server, prefect_dir, read_state
from tests.flows.prefect_server import wait_for

HARVEST = [sys.executable, "-m", "flows.cli"]

# A command of a test: hold the home's server (`prefect_api`), print its URL, run one small flow.
COMMAND = """
import sys, time
from prefect import flow
from flows._runtime import prefect_api

@flow(name=sys.argv[2])
def work(seconds: float) -> str:
    time.sleep(seconds)
    return "done"

with prefect_api(sys.argv[1]) as url:
    print("url", url, flush=True)
    print(work(float(sys.argv[3])), flush=True)
"""


def command(home, name: str, seconds: float = 0.0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.Popen([sys.executable, "-c", COMMAND, str(home), name, str(seconds)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)


def url_of(proc: subprocess.Popen) -> str:
    for line in proc.stdout:
        if line.startswith("url "):
            return line.split()[1]
    raise AssertionError(f"no url printed (code {proc.wait()})")


def flow_runs(home) -> dict[str, str]:
    """Flow name -> state of every flow run in the home's database, read with plain sqlite3."""
    con = sqlite3.connect(prefect_dir(home) / "prefect.db")
    try:
        return dict(con.execute("""SELECT flow.name, flow_run.state_type FROM flow_run
                                   JOIN flow ON flow.id = flow_run.flow_id ORDER BY flow_run.created"""))
    finally:
        con.close()


def servers_of(home) -> list[psutil.Process]:
    folder = str(prefect_dir(home))
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            supervisor = "flows._home_server" in cmd and folder in cmd
            server = "prefect server start" in cmd and (p.info["environ"] or {}).get("PREFECT_HOME") == folder
            if supervisor or server:
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(240)
def test_commands_land_in_one_persistent_history_and_leave_no_server(tmp_path):
    home = tmp_path / "home"
    first = command(home, "first")
    assert url_of(first).startswith("http://127.0.0.1:") and first.wait(120) == 0, first.stdout.read()
    wait_for(lambda: not servers_of(home), 10, 0.1, "the home's server stopped after its command")
    assert read_state(prefect_dir(home)) is None
    second = command(home, "second")
    assert second.wait(120) == 0, second.stdout.read()
    assert flow_runs(home) == {"first": "COMPLETED", "second": "COMPLETED"}   # both, in one database
    wait_for(lambda: not servers_of(home), 10, 0.1, "the home's server stopped after its command")
    ui = subprocess.run([*HARVEST, "--home", str(home), "ui", "--no-wait", "--port", "0"], capture_output=True,
                        text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"})
    assert ui.returncode == 0 and ui.stdout.startswith(f"Prefect UI of {home}: http://127.0.0.1:"), ui.stderr
    with home_prefect_server(home) as url:   # what the UI shows: the server reads the same database
        request = urllib.request.Request(f"{url}/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            names = sorted(run["name"] for run in json.loads(r.read()))
        with urllib.request.urlopen(url.removesuffix("/api") + "/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read(2000).lower()   # the UI itself
    assert len(names) == 2


@pytest.mark.timeout(240)
def test_two_commands_share_one_server_and_a_killed_one_does_not_take_it_away(tmp_path):
    home = tmp_path / "home"
    a = command(home, "killed", seconds=60)
    url = url_of(a)
    b = command(home, "survivor", seconds=4)
    assert url_of(b) == url   # joined the running server
    wait_for(lambda: "killed" in flow_runs(home), 30, 0.2, "the first flow run recorded")
    a.kill()
    a.wait()
    assert b.wait(120) == 0, b.stdout.read()   # its flow finished on the server the killed command started
    runs = flow_runs(home)
    assert runs["survivor"] == "COMPLETED" and runs["killed"] == "RUNNING"
    log = (prefect_dir(home) / "supervisor.log").read_text()
    assert log.count("serving ") == 1, log   # one server for both commands
    t0 = time.monotonic()
    wait_for(lambda: not servers_of(home), 10, 0.1, "the home's server stopped after the last command")
    print(f"server gone {time.monotonic() - t0:.1f} s after the last command")
    assert read_state(prefect_dir(home)) is None and not list((prefect_dir(home) / "leases").iterdir())
