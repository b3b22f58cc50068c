"""The `runs` table: one row per flow run, with its params, model and code version; `run_owners` names the
process of each, so that a run left `running` by a killed process is marked `killed` (`mark_killed_runs`)."""
from __future__ import annotations

import json
import subprocess
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from pipeline.base.lifeline import Owner
from warehouse import db


@lru_cache(maxsize=1)
def code_version() -> str:
    """`git describe` of the checkout when there is one, else the package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("cxr-harvest")
    except PackageNotFoundError:
        return "unknown"


def start_run(home, flow: str, params: dict, model_id: str | None = None, run_id: str | None = None) -> str:
    run_id = run_id or f"{flow}-{uuid.uuid4().hex[:12]}"
    me = Owner.me()
    con = writer(home)
    try:
        with db.transaction(con):
            con.execute("""INSERT OR REPLACE INTO runs (run_id, flow, params, model_id, code_version, started_at,
                                                        finished_at, status)
                           VALUES (?, ?, ?, ?, ?, now(), NULL, 'running')""",
                        [run_id, flow, json.dumps(params, default=str, sort_keys=True), model_id, code_version()])
            con.execute("INSERT OR REPLACE INTO run_owners VALUES (?, ?, ?, ?)", [run_id, me.host, me.pid, me.started])
    finally:
        con.close()
    return run_id


def ingest_roots(con, home) -> list[Path]:
    """The source folders a home ingested, newest first, once each: a source inside the home where the home is
    now (`root_in_home`), then the recorded path."""
    roots = []
    for (params,) in con.execute("SELECT params FROM runs WHERE flow = 'ingest' ORDER BY started_at DESC").fetchall():
        params = json.loads(params) if isinstance(params, str) else params or {}
        inside = params.get("root_in_home")
        found = ([home.root / inside] if inside else []) + ([Path(params["root"])] if params.get("root") else [])
        roots += [root for root in found if root not in roots]
    return roots


def dead_runs(con) -> list[str]:
    """The running runs whose process, on this host, is gone (or its pid now names another process). Runs of
    other hosts, and runs recorded without an owner, are not among them. Reads only."""
    rows = con.execute("""SELECT r.run_id, o.host, o.pid, o.pid_started FROM runs r
                          JOIN run_owners o USING (run_id) WHERE r.status = 'running'""").fetchall()
    return [run_id for run_id, host, pid, started in rows if Owner(host, pid, started).is_dead()]


def mark_killed_runs(con) -> list[str]:
    """Mark `killed` the `dead_runs`; returns their ids."""
    dead = dead_runs(con)
    if dead:
        con.execute("UPDATE runs SET status = 'killed', finished_at = coalesce(finished_at, now()) "
                    "WHERE status = 'running' AND run_id IN (SELECT unnest(?))", [dead])
    return dead


def writer(home):
    """A writable warehouse connection, the runs of dead processes marked killed first. Every writer of the
    pipeline opens the warehouse this way, so the next one after a kill shows the run as it ended; the storage
    layer (`warehouse.db.connect`) knows nothing of runs or processes."""
    con = db.connect(home)
    try:
        mark_killed_runs(con)
    except BaseException:
        con.close()
        raise
    return con


def finish_run(home, run_id: str, status: str = "completed", model_id: str | None = None) -> None:
    con = writer(home)
    try:
        con.execute("UPDATE runs SET finished_at = now(), status = ?, model_id = coalesce(?, model_id) "
                    "WHERE run_id = ?", [status, model_id, run_id])
    finally:
        con.close()


@contextmanager
def recorded_run(home, flow: str, params: dict, model_id: str | None = None, run_id: str | None = None):
    """Record a run as running, then completed or failed."""
    run_id = start_run(home, flow, params, model_id, run_id)
    try:
        yield run_id
    except BaseException:
        finish_run(home, run_id, "failed")
        raise
    finish_run(home, run_id, "completed")
