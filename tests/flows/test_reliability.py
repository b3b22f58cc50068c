"""Faults (issue #15 items 3, 4, 7): a SIGKILLed `harvest` leaves no process, no `running` run and no orphan
cache; readers get in while an ingest runs; kill -9 at seeded random points of ingest and mine, then rerun:
nothing lost, nothing duplicated, the same rows and cache bytes as a clean run. Figures: docs/reliability.md."""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.base.home import Home
from pipeline.base.lifeline import Owner
from pipeline.ingest.common import sweep_orphans
from pipeline.ingest.nih import ingest_nih
from pipeline.runs.record import mark_killed_runs, start_run, writer
from tests.flows.prefect_server import wait_for
from warehouse import db

HARVEST = [sys.executable, "-m", "flows.cli"]


# ---- helpers ---------------------------------------------------------------------------------------------

def harvest_popen(home, *argv, env=None, log=None) -> subprocess.Popen:
    return subprocess.Popen([*HARVEST, "--home", str(home), *argv], stdin=subprocess.DEVNULL,
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env or dict(os.environ))


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Tree:
    """The descendants a process has had (polled), to check none outlives it."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.root, self.seen, self.cmd = proc, psutil.Process(proc.pid), {}, {}

    def poll(self) -> None:
        try:
            children = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            # read again at every poll: a child caught between fork and exec still shows its parent's command line
            try:
                self.cmd[child.pid] = " ".join(child.cmdline())
            except psutil.Error:
                continue
            self.seen.setdefault(child.pid, child)

    def running(self, text: str = "") -> int:
        return sum(text in self.cmd[pid] for pid, p in self.seen.items() if alive(p))

    def wait_until(self, predicate, timeout: float, what: str):
        def check():
            self.poll()
            if self.proc.poll() is not None:
                raise AssertionError(f"{what}: the process ended first (code {self.proc.returncode})")
            return predicate()
        return wait_for(check, timeout, 0.01, what)

    def kill_and_check(self, within: float = 5.0) -> float:
        """SIGKILL the process; seconds until no descendant is left (fails after `within`)."""
        self.poll()
        self.proc.kill()
        self.proc.wait()
        t0 = time.monotonic()
        wait_for(lambda: not [p for p in self.seen.values() if alive(p)], within, 0.05,
                 f"descendants of {self.proc.pid} gone: {[self.cmd[pid] for pid, p in self.seen.items() if alive(p)]}")
        return time.monotonic() - t0


def table(home, sql: str) -> list:
    con = db.connect(home, read_only=True)
    try:
        return sorted(con.execute(sql).fetchall(), key=repr)
    finally:
        con.close()


def warehouse_rows(home) -> dict:
    return {"images": table(home, "SELECT * EXCLUDE (ingested_at) FROM images"),
            "labels": table(home, "SELECT * FROM labels"),
            "gt_boxes": table(home, "SELECT * FROM gt_boxes"),
            "cache": table(home, "SELECT source_sha256, size FROM cache_entries")}


def cache_bytes(home) -> dict:
    """source sha256 -> the bytes of its cached image (whatever shard and row hold it)."""
    home = Home.resolve(home)
    out = {}
    for sha, size, shard, row in table(home, "SELECT * FROM cache_entries"):
        with open(home.cache / f"size={size}" / f"shard-{shard:06d}.u8", "rb") as f:
            f.seek(row * size * size)
            out[(sha, size)] = f.read(size * size)
    return out


def shard_files(home) -> set:
    return {p.name for p in (Path(home) / "cache").glob("size=*/shard-*.u8")}


def holds_warehouse(pid: int, home) -> bool:
    """Whether process `pid` has the warehouse open (a DuckDB connection keeps its file descriptor)."""
    target = str(Path(home, "warehouse.duckdb"))
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return False


def run_statuses(home) -> dict:
    return dict(table(home, "SELECT run_id, status FROM runs"))


# ---- units: killed runs, orphans ------------------------------------------------------------------------

def test_runs_of_dead_or_reused_pids_are_marked_killed(tmp_path):
    home = tmp_path / "home"
    mine = start_run(home, "ingest", {})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    con = db.connect(home)
    try:
        for run_id, host, pid, started in [
                ("dead", socket.gethostname(), int(dead.stdout), None),
                ("reused", socket.gethostname(), os.getpid(), Owner.me().started - 3600),   # same pid, older process
                ("elsewhere", "another-host", int(dead.stdout), None),
                ("unowned", None, None, None)]:
            con.execute("INSERT INTO runs (run_id, flow, started_at, status) VALUES (?, 'x', now(), 'running')", [run_id])
            if host:
                con.execute("INSERT INTO run_owners VALUES (?, ?, ?, ?)", [run_id, host, pid, started])
        assert sorted(mark_killed_runs(con)) == ["dead", "reused"]
    finally:
        con.close()
    writer(home).close()   # idempotent; every writer does it
    assert run_statuses(home) == {mine: "running", "dead": "killed", "reused": "killed",
                                  "elsewhere": "running", "unowned": "running"}


def test_sweep_removes_orphan_shards_and_rows_of_changed_images(make_nih, tmp_path):
    root = make_nih([(f"{k:08d}_000.png", "Mass", k) for k in range(1, 5)], size=64)
    home = Home.resolve(tmp_path / "home")
    ingest_nih(home, root, sizes=(32,), workers=1)
    orphan = home.cache / "size=32" / "shard-000007.u8"   # what a kill after the shard write leaves
    orphan.write_bytes(b"\0" * 32 * 32 * 10)
    (home.cache / "size=32" / ".shard-000008.u8.abc.tmp").write_bytes(b"\0")
    from PIL import Image
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "images" / "00000001_000.png")   # changed image
    ingest_nih(home, root, sizes=(32,), workers=1)
    assert not orphan.exists() and not list(home.cache.glob("size=32/.shard-*"))
    assert table(home, "SELECT count(*) FROM cache_entries")[0][0] == 5   # 4 images + the old version
    assert sweep_orphans(home) == {"orphan_cache_rows": 1, "orphan_cache_files": 0}   # the next ingest's sweep
    assert table(home, """SELECT count(*) FROM cache_entries c LEFT JOIN images i USING (source_sha256)
                          WHERE i.image_id IS NULL""")[0][0] == 0


# ---- a killed `harvest ingest` leaves nothing behind ---------------------------------------------------

@pytest.fixture
def pngs(make_nih):
    return make_nih([(f"{k:08d}_000.png", "Mass" if k % 3 else "No Finding", k) for k in range(1, 1801)], size=128)


@pytest.mark.timeout(240)
def test_killed_ingest_leaves_no_process_and_its_run_is_marked_killed(pngs, tmp_path):
    """Own Prefect server (no PREFECT_API_URL), 2 spawn decode workers: SIGKILL mid-decode, all gone in 5 s."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with open(tmp_path / "ingest.log", "wb") as log:
        tree = Tree(harvest_popen(home, "ingest", "nih", "--root", str(pngs), "--sizes", "32", env=env, log=log))
    tree.wait_until(lambda: tree.running("multiprocessing.spawn") >= 2 and tree.running("prefect server"),
                    120, "server and decode workers started")
    names = sorted(cmd[:90] for cmd in tree.cmd.values())
    gone_in = tree.kill_and_check(within=5)
    print(f"descendants at the kill: {names}; all gone in {gone_in:.2f} s")
    assert len(names) >= 4   # server, resource tracker, 2 workers
    assert set(run_statuses(home).values()) == {"running"}   # read-only: seen as it was left
    t0 = time.monotonic()
    summary = ingest_nih(home, pngs, sizes=(32,))   # the next writer marks it, sweeps, and finishes the job
    assert set(run_statuses(home).values()) == {"killed"}
    assert summary["images"] == 1800 and table(home, "SELECT count(*) FROM images")[0][0] == 1800
    print(f"rerun {time.monotonic() - t0:.1f} s")


# ---- readers get in while an ingest runs -----------------------------------------------------------------

@pytest.mark.timeout(240)
def test_readers_and_a_second_ingest_while_an_ingest_is_paused(pngs, tmp_path):
    home = tmp_path / "home"
    code = f"from pipeline.ingest.nih import ingest_nih; ingest_nih({str(home)!r}, {str(pngs)!r}, sizes=(32,), workers=1)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    tree = Tree(proc)
    try:
        tree.wait_until(lambda: (home / "cache" / "size=32" / "shard-000000.u8").exists(), 120, "first chunk written")
        for _ in range(200):   # pause it between two commits: no connection open
            proc.send_signal(signal.SIGSTOP)
            if not holds_warehouse(proc.pid, home):
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        else:
            pytest.fail("never caught the ingest between two commits")
        for argv in (["status"], ["sql", "SELECT count(*) FROM images"]):
            t0 = time.monotonic()
            out = subprocess.run([*HARVEST, "--home", str(home), *argv], capture_output=True, text=True, timeout=30)
            took = time.monotonic() - t0
            print(f"harvest {argv[0]} during the ingest: {took:.2f} s")
            assert out.returncode == 0, out.stderr
            assert took < 3
        env = {**os.environ, "HARVEST_LOCK_TIMEOUT": "2"}
        second = subprocess.run([*HARVEST, "--home", str(home), "ingest", "nih", "--root", str(pngs)],
                                capture_output=True, text=True, timeout=60, env=env)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines == [db.WAIT_MESSAGE, f"harvest ingest: error: another ingest into {home} is running "
                                          f"(pid {proc.pid}); gave up after 2 s (set HARVEST_LOCK_TIMEOUT to wait longer)"]
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(120) == 0
    assert table(home, "SELECT count(*) FROM images")[0][0] == 1800
    assert table(home, "SELECT count(DISTINCT source_sha256) FROM cache_entries")[0][0] == 1800


def test_a_writer_waits_for_the_lock_then_gives_a_one_line_error(tmp_path):
    home = tmp_path / "home"
    db.connect(home).close()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(float(sys.argv[2]))",
                               str(home / "warehouse.duckdb"), "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    db.connect(home).close()   # waits for the holder, then proceeds
    assert 1.0 < time.monotonic() - t0 < 10
    holder.wait()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(30)", str(home / "warehouse.duckdb")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run([*HARVEST, "--home", str(home), "status"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "HARVEST_LOCK_TIMEOUT": "1.5"})
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 1
    wait, error = out.stderr.strip().splitlines()   # the holder named with its command line (cut at 200 characters)
    assert wait == db.WAIT_MESSAGE
    assert error.startswith(f"harvest status: error: warehouse {home / 'warehouse.duckdb'} locked by PID {holder.pid} "
                            f"({sys.executable} -c import duckdb, sys, time;"), error
    assert error.endswith("); gave up after 2 s (set HARVEST_LOCK_TIMEOUT to wait longer)"), error


# ---- kill -9 at seeded random points of ingest and mine, then rerun ---------------------------------------

SEED, INGEST_KILLS, MINE_KILLS = 15, 4, 3


def kill_at(home, argv, files, at: float, env, log, max_new: int) -> dict:
    """Start `harvest argv`, SIGKILL it `at` seconds later, or as soon as it has written `max_new` files of new
    names, whichever comes first; check its tree dies. The cap keeps work for the next kill: an attempt that
    finished the whole job would leave the later ones nothing to interrupt."""
    before, t0 = set(files(home)), time.monotonic()
    new_files = lambda: len(set(files(home)) - before)   # noqa: E731
    tree = Tree(harvest_popen(home, *argv, env=env, log=log))
    while time.monotonic() - t0 < at and tree.proc.poll() is None:
        tree.poll()
        if new_files() >= max_new:
            break
        time.sleep(0.01)
    if tree.proc.poll() is not None:   # it finished first: nothing left to kill
        assert tree.proc.returncode == 0
        return {"at_s": round(at, 1), "killed": False, "new_files": new_files()}
    gone_in = tree.kill_and_check(within=5)
    return {"at_s": round(at, 1), "killed": True, "new_files": new_files(),
            "descendants": len(tree.seen), "gone_in_s": round(gone_in, 2)}


def kill_until(n: int, out: list, attempt) -> None:
    """`attempt()` until `n` of them killed their process (a run that ends before its kill time counts not),
    at most 2n times."""
    while sum(k["killed"] for k in out) < n and len(out) < 2 * n:
        out.append(attempt())


def timed(home, argv, env, log) -> float:
    t0 = time.monotonic()
    proc = harvest_popen(home, *argv, env=env, log=log)
    assert proc.wait(300) == 0, Path(log.name).read_text()[-3000:]
    return round(time.monotonic() - t0, 1)


def mined_rows(home):
    parts = sorted((Path(home) / "data" / "mined_boxes").glob("run_id=*/part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: (r["image_id"], r["finding"], r["rank"]))


@pytest.mark.timeout(600)
def test_kill_9_at_random_points_of_ingest_and_mine_then_rerun(make_nih, mining_base_home, prefect_api, tmp_path):
    """Against the session's Prefect server (PREFECT_API_URL): 4 kills of `harvest ingest nih` (1,000 PNGs, 4
    chunks), 3 of `harvest mine` (40 images, 10 shards), each at a seeded random time within the clean run's
    duration (start-up, decoding, commits, mining: wherever it falls) or right after its first new file (ingest)
    or second (mine), so that no attempt finishes the job; the last of each right after its first new file
    (mid-work even when a loaded machine stretches the start-up); then a rerun, compared with the clean run."""
    rng = random.Random(SEED)
    env = {**os.environ, "HARVEST_LOCK_TIMEOUT": "60"}
    log = open(tmp_path / "harvest.log", "ab")
    report = {"ingest": [], "mine": []}

    root = make_nih([(f"{k:08d}_000.png", "Mass" if k % 3 else "No Finding", k) for k in range(1, 1001)], size=64)
    ingest = ["ingest", "nih", "--root", str(root), "--sizes", "32"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    report["ingest_clean_s"] = timed(clean, ingest, env, log)
    kill_until(INGEST_KILLS - 1, report["ingest"], lambda: kill_at(   # at most 3 of the 4 chunks written
        killed, ingest, shard_files, rng.uniform(0.15, 0.7) * report["ingest_clean_s"], env, log, max_new=1))
    report["ingest"].append(kill_at(killed, ingest, shard_files, 300, env, log, max_new=1))   # whatever the load
    report["ingest_rerun_s"] = timed(killed, ingest, env, log)
    assert warehouse_rows(killed) == warehouse_rows(clean)
    assert len(warehouse_rows(killed)["images"]) == 1000
    assert cache_bytes(killed) == cache_bytes(clean)
    assert set(run_statuses(killed).values()) <= {"completed", "killed"}
    # a kill before the flow recorded its run leaves no row; every other killed run is marked by the next one
    assert 1 <= list(run_statuses(killed).values()).count("killed") <= sum(k["killed"] for k in report["ingest"])
    assert len(shard_files(killed)) == len(shard_files(clean))   # orphans swept

    parts = lambda home: list((Path(home) / "data" / "mined_boxes").glob("run_id=*/part-*.parquet"))
    mine = ["mine", "--model", "tiny-r18", "--split", "all", "--shard-size", "4", "--workers", "1"]
    clean_m, killed_m = (shutil.copytree(mining_base_home, tmp_path / name) for name in ("clean_m", "killed_m"))
    report["mine_clean_s"] = timed(clean_m, mine, env, log)
    kill_until(MINE_KILLS - 1, report["mine"], lambda: kill_at(   # at most 4 of the 10 parts written
        killed_m, mine, parts, rng.uniform(0.15, 0.7) * report["mine_clean_s"], env, log, max_new=2))
    report["mine"].append(kill_at(killed_m, mine, parts, 300, env, log, max_new=1))
    report["mine_rerun_s"] = timed(killed_m, mine, env, log)
    got, want = mined_rows(killed_m), mined_rows(clean_m)
    assert len(got) == len(want) > 0 and got == want
    assert len(parts(killed_m)) == len(parts(clean_m)) == 10
    assert set(run_statuses(killed_m).values()) <= {"completed", "killed"}
    log.close()
    print(f"\nreliability figures (seed {SEED}): {report}")
    assert sum(k["killed"] for k in report["ingest"] + report["mine"]) == INGEST_KILLS + MINE_KILLS
    for stage in ("ingest", "mine"):   # some kills landed mid-work (files written, the run unfinished)
        assert any(k["killed"] and k["new_files"] for k in report[stage]), report[stage]
