"""Small verbs start fast (#22 item 6, #21 item 7): `harvest export` starts no Prefect server and imports no Prefect
unless the home's own server already runs (then its flow run lands in that history, named after the warehouse run
id); an unknown `--findings` name fails in one line before anything is opened."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows._home_server import home_prefect_server, prefect_dir
from tests.pipeline.export.test_export import RUN, make_home
from warehouse.db import connect

REPO = Path(__file__).resolve().parents[2]
# The CLI in a child, which then says whether Prefect was imported.
CLI = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
       "print('prefect imported:', 'prefect' in sys.modules); sys.exit(rc)")


def harvest(*args, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    return done, time.perf_counter() - t0


def export_runs(home) -> list[tuple[str, str]]:
    con = connect(home, read_only=True)
    try:
        return con.execute("SELECT run_id, status FROM runs WHERE flow = 'export' ORDER BY started_at").fetchall()
    finally:
        con.close()


@pytest.fixture
def home(tmp_path):
    return make_home(tmp_path / "home").root


def test_an_export_starts_no_prefect_server_and_the_runs_table_records_it(home, tmp_path):
    done, seconds = harvest("--home", home, "export", "--run", RUN, "--format", "labelstudio",
                            "--out", tmp_path / "ls")
    print(f"harvest export labelstudio (4 images): {seconds:.2f} s")
    assert done.returncode == 0, done.stderr
    assert "prefect imported: False" in done.stdout and "export labelstudio: " in done.stdout
    assert not prefect_dir(home).exists()   # no server was started for this home (it would hold its database)
    assert (tmp_path / "ls" / "manifest.json").is_file()
    [(run_id, status)] = export_runs(home)
    assert status == "completed" and run_id.startswith("export-")
    assert seconds < 15, f"took {seconds:.1f} s"   # about 1.5 s on 2 cores; 15 allows for a loaded machine


@pytest.mark.timeout(300)
def test_an_export_joins_the_running_home_server_and_names_its_flow_run_after_the_run(home, tmp_path):
    with home_prefect_server(home) as url:   # as a long command on the same home would hold it
        done, _ = harvest("--home", home, "export", "--run", RUN, "--format", "coco", "--out", tmp_path / "coco")
        assert done.returncode == 0, done.stderr
        assert "prefect imported: True" in done.stdout
        request = urllib.request.Request(f"{url}/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            runs = {run["name"]: run["state_type"] for run in json.loads(r.read())}
    [(run_id, status)] = export_runs(home)
    assert status == "completed" and runs == {run_id: "COMPLETED"}   # the flow run carries the warehouse run id


@pytest.mark.parametrize("argv", [["export", "--run", RUN, "--format", "coco", "--findings", "Mass", "Tumor"]])
def test_an_unknown_finding_fails_in_one_line_before_the_warehouse_or_prefect(tmp_path, argv):
    home = tmp_path / "no-home"
    done, seconds = harvest("--home", home, *argv)
    print(f"harvest {' '.join(argv)}: {seconds:.2f} s")
    assert done.returncode == 1 and "prefect imported: False" in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"harvest {argv[0]}: error: unknown finding 'Tumor'; expected "
                                                   "one of Atelectasis, "), done.stderr
    assert not home.exists()   # checked before the home was made or the warehouse opened
    assert seconds < 5, f"took {seconds:.2f} s"   # about 0.5 s on 2 cores
