"""flows.mine on a real Dask cluster (scheduler + 2 worker processes on loopback) and a real Prefect server:
the sharded run gives exactly the rows of one single-process `mine_shard`; a killed flow resumes without
duplicates or holes; a worker killed mid-shard costs a retry, not a result."""
from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.mine import mine_flow, mining_config
from pipeline.base.home import Home
from pipeline.runs.parts import finished_parts, mining_run_id, plan_shards, run_dir
from tests.flows.prefect_server import spawn_flow, wait_for
from warehouse import db

SHARD = 4   # 40 images -> 10 shards: enough in flight to kill something mid-run
SPLIT = "all"
MODEL = "tiny-r18"
# One forward batch per shard, so the single-process run sees the very same batches: rows must match bit for
# bit (batch size is an execution setting: it does not change the run id).
CONFIG = {"batch_size": SHARD}
RUN_ID = mining_run_id(MODEL, mining_config(CONFIG).config_hash(), SPLIT)
SORT = [("image_id", "ascending"), ("finding", "ascending"), ("rank", "ascending")]


def flow_kwargs(home, cluster) -> dict:
    return dict(home=str(home), model=MODEL, split=SPLIT, shard_size=SHARD, config=CONFIG,
                dask_address=cluster.scheduler_address)


def mine(home, cluster) -> dict:
    return mine_flow(**flow_kwargs(home, cluster))


def parts_dir(home) -> Path:
    return run_dir(Home.resolve(home), RUN_ID)


def mined(home) -> pa.Table:
    """All parts of the run, read straight from Parquet (what `SELECT * FROM mined_boxes` sees)."""
    parts = sorted(parts_dir(home).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p).replace_schema_metadata(None) for p in parts]).sort_by(SORT)


@pytest.fixture(scope="module")
def reference(mining_base_home):
    """One single-process `mine_shard` over every image: the rows the distributed run must equal."""
    import torch

    from pipeline.mining import mine_shard
    from pipeline.training.checkpoint import load_model

    con = db.connect(mining_base_home, read_only=True)
    ids = sorted(r[0] for r in con.execute("SELECT image_id FROM images").fetchall())
    con.close()
    assert len(ids) == 40
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the workers' setting (Dask's nanny sets OMP_NUM_THREADS=1)
    try:
        model, _ = load_model(mining_base_home, MODEL)
        table = mine_shard(mining_base_home, MODEL, ids, mining_config(CONFIG), RUN_ID, model=model)
    finally:
        torch.set_num_threads(threads)
    assert table.num_rows > 0, "the phantom set should give boxes; an empty reference proves nothing"
    return table.sort_by(SORT)


def assert_same_rows(home, reference):
    got = mined(home)
    assert got.num_rows == reference.num_rows
    assert got.equals(reference), "the sharded rows differ from the single-process rows"
    con = db.connect(home, read_only=True)   # and through the warehouse view, with no duplicate key
    try:
        dup = con.execute("SELECT count(*) FROM (SELECT image_id, finding, rank FROM mined_boxes "
                          "GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
        n = con.execute("SELECT count(*) FROM mined_boxes").fetchone()[0]
    finally:
        con.close()
    assert dup == 0 and n == reference.num_rows


def run_status(home, run_id) -> str:
    con = db.connect(home, read_only=True)
    try:
        return con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
    finally:
        con.close()


def test_plan_shards_resumes_and_survives_a_changed_shard_size():
    ids = [f"{i:03d}" for i in range(10)]
    assert plan_shards(ids, 4, {}) == [(0, ids[0:4]), (1, ids[4:8]), (2, ids[8:10])]
    assert plan_shards(ids, 4, {1: ids[4:8]}) == [(0, ids[0:4]), (2, ids[8:10])]
    # parts written with shard size 3 (0-2, 3-5), rerun with size 4: no image mined twice or dropped
    jobs = plan_shards(ids, 4, {0: ids[0:3], 1: ids[3:6]})
    todo = [i for _, part in jobs for i in part]
    assert sorted(todo) == ids[6:] and len(set(todo)) == len(todo)
    assert {j for j, _ in jobs}.isdisjoint({0, 1})


def test_sharded_run_equals_single_process(mining_home, dask_cluster, reference, prefect_api):
    from prefect.client.orchestration import get_client

    summary = mine(mining_home, dask_cluster)
    assert summary["shards_mined"] == summary["shards_total"] == 10 and summary["rows"] == reference.num_rows
    assert 1 <= summary["model_loads"] <= 2, "each of the 2 workers loads the model once, not once per shard"
    assert_same_rows(mining_home, reference)
    assert run_status(mining_home, summary["run_id"]) == "completed"
    with get_client(sync_client=True) as client:   # the summary artifact reached the shared server
        artifact = client.read_latest_artifacts()
    assert f"{summary['run_id']}-summary" in {a.key for a in artifact}
    again = mine(mining_home, dask_cluster)
    assert again["shards_mined"] == 0 and again["rows"] == reference.num_rows   # a rerun skips every shard


def harvest(argv) -> int:
    """`harvest` with only the mine verb registered, as flows/cli.py does (its other verbs are not under test)."""
    from flows.mine import register

    parser = argparse.ArgumentParser(prog="harvest")
    parser.add_argument("--home")
    register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_mines_and_prints_a_summary(mining_home, dask_cluster, reference, tmp_path, capsys):
    (tmp_path / "mining.yaml").write_text(f"batch_size: {SHARD}\n")
    argv = ["--home", str(mining_home), "mine", "--model", MODEL, "--split", SPLIT, "--shard-size", str(SHARD),
            "--dask-address", dask_cluster.scheduler_address, "--config", str(tmp_path / "mining.yaml")]
    assert harvest(argv) == 0
    out = capsys.readouterr().out
    assert f"run_id             {RUN_ID}" in out and f"rows               {reference.num_rows}" in out
    assert_same_rows(mining_home, reference)
    with pytest.raises(SystemExit) as exit_:
        harvest(["mine", "--help"])
    assert exit_.value.code == 0 and "--dask-address" in capsys.readouterr().out


def test_failed_shard_fails_the_run_and_a_rerun_mines_only_it(mining_home, dask_cluster, reference):
    con = db.connect(mining_home)   # drop one image from the cache index: its shard fails on every retry
    lost = con.execute("SELECT c.* FROM cache_entries c JOIN images i USING (source_sha256) "
                       "ORDER BY i.image_id LIMIT 1").fetchone()
    con.execute("DELETE FROM cache_entries WHERE source_sha256 = ? AND size = ?", [lost[0], lost[1]])
    con.close()
    with pytest.raises(RuntimeError, match="1 of 10 shard"):
        mine(mining_home, dask_cluster)
    assert run_status(mining_home, RUN_ID) == "failed"
    assert sorted(finished_parts(parts_dir(mining_home))) == list(range(1, 10))   # the other shards finished
    con = db.connect(mining_home)
    con.execute("INSERT INTO cache_entries VALUES (?, ?, ?, ?)", list(lost))
    con.close()
    summary = mine(mining_home, dask_cluster)
    assert summary["shards_mined"] == 1 and summary["shards_skipped"] == 9
    assert_same_rows(mining_home, reference)
    assert run_status(mining_home, RUN_ID) == "completed"


def test_killed_flow_resumes_without_duplicates(mining_home, dask_cluster, reference, tmp_path):
    parts = parts_dir(mining_home)
    proc = spawn_flow("flows.mine", "mine_flow", tmp_path / "flow.log",
                      **flow_kwargs(mining_home, dask_cluster))
    try:
        wait_for(lambda: any(parts.glob("part-*.parquet")) or proc.poll() is not None, 180, what="first part")
        proc.send_signal(signal.SIGKILL)
        n_at_kill = len(list(parts.glob("part-*.parquet")))
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "flow.log").read_text()[-3000:]
    assert 1 <= n_at_kill < 10, "the flow was not killed mid-run"
    assert run_status(mining_home, RUN_ID) == "running"
    summary = mine(mining_home, dask_cluster)
    assert summary["shards_mined"] >= 1 and summary["shards_skipped"] >= n_at_kill
    assert sorted(finished_parts(parts)) == list(range(10))
    assert_same_rows(mining_home, reference)
    assert run_status(mining_home, RUN_ID) == "completed"


def test_lost_worker_costs_a_retry(mining_home, dask_cluster, reference):
    from distributed import Client

    parts, killed = parts_dir(mining_home), {}

    def kill_a_busy_worker():
        wait_for(lambda: any(parts.glob("part-*.parquet")), 180, what="first part")
        busy = [addr for addr, keys in client.processing().items() if keys]
        if busy:
            killed["pid"] = client.run(os.getpid, workers=busy[:1])[busy[0]]
            killed["parts"] = len(list(parts.glob("part-*.parquet")))
            os.kill(killed["pid"], signal.SIGKILL)

    with Client(dask_cluster) as client:
        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        summary = mine(mining_home, dask_cluster)
        killer.join(10)
        assert killed and killed["parts"] < 10, "no worker was busy mid-run: nothing was tested"
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 60, what="nanny restarts the worker")
        assert killed["pid"] not in client.run(os.getpid).values()
    assert summary["shards_total"] == 10
    assert_same_rows(mining_home, reference)
