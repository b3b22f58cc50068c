"""flows.mine on a real Dask cluster (scheduler + 2 worker processes on loopback) and a real Prefect server:
the sharded run gives exactly the rows of one single-process `mine_shard`; a killed flow resumes without
duplicates or holes; a worker killed mid-shard costs a retry, not a result."""
from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.mine import finished_parts, mine_flow, mining_config, mining_run_id, part_path, plan_shards
from pipeline.home import Home
from tests.flows.prefect_server import spawn_flow, wait_for
from warehouse import db

SHARD = 4   # 40 images -> 10 shards: enough in flight to kill something mid-run
MODEL = "tiny-r18"
SORT = [("image_id", "ascending"), ("finding", "ascending"), ("rank", "ascending")]


def run_dir(home) -> "os.PathLike":
    cfg = mining_config()
    return part_path(Home.resolve(home), mining_run_id(MODEL, cfg.config_hash(), "train"), 0).parent


def mined(home) -> pa.Table:
    """All parts of the run, read straight from Parquet (what `SELECT * FROM mined_boxes` sees)."""
    parts = sorted(run_dir(home).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p).replace_schema_metadata(None) for p in parts]).sort_by(SORT)


@pytest.fixture(scope="module")
def reference(base_home):
    """One single-process `mine_shard` over every train image: the rows the distributed run must equal."""
    import torch

    from pipeline.mining import mine_shard
    from pipeline.training.checkpoint import load_model

    torch.set_num_threads(1)   # the workers' setting (Dask's nanny sets OMP_NUM_THREADS=1)
    cfg = mining_config()
    con = db.connect(base_home, read_only=True)
    ids = sorted(r[0] for r in con.execute("SELECT image_id FROM images WHERE split = 'train'").fetchall())
    con.close()
    model, _ = load_model(base_home, MODEL)
    table = mine_shard(base_home, MODEL, ids, cfg, mining_run_id(MODEL, cfg.config_hash(), "train"), model=model)
    assert table.num_rows > 0, "the phantom set should give boxes; an empty reference proves nothing"
    return table.sort_by(SORT)


def assert_same_rows(home, reference):
    got = mined(home)
    assert got.schema.equals(reference.schema) and got.num_rows == reference.num_rows
    for name in got.column_names:   # keys exact; floats to float32 rounding (conv sums differ by batch size)
        a, b = got[name].to_numpy(), reference[name].to_numpy()
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert (a == b).all(), f"column {name} differs from the single-process run"
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


def test_sharded_run_equals_single_process(home, dask_cluster, reference, prefect_api):
    from prefect.client.orchestration import get_client

    summary = mine_flow(home=str(home), model=MODEL, shard_size=SHARD, dask_address=dask_cluster.scheduler_address)
    assert summary["shards_mined"] == summary["shards_total"] == 10 and summary["rows"] == reference.num_rows
    assert_same_rows(home, reference)
    assert run_status(home, summary["run_id"]) == "completed"
    with get_client(sync_client=True) as client:   # the summary artifact reached the shared server
        artifact = client.read_latest_artifacts()
    assert f"{summary['run_id']}-summary" in {a.key for a in artifact}
    again = mine_flow(home=str(home), model=MODEL, shard_size=SHARD, dask_address=dask_cluster.scheduler_address)
    assert again["shards_mined"] == 0 and again["rows"] == reference.num_rows   # a rerun skips every shard


def test_killed_flow_resumes_without_duplicates(home, dask_cluster, reference, tmp_path):
    parts = run_dir(home)
    proc = spawn_flow("flows.mine", "mine_flow", tmp_path / "flow.log", home=str(home), model=MODEL,
                      shard_size=SHARD, dask_address=dask_cluster.scheduler_address)
    try:
        wait_for(lambda: any(parts.glob("part-*.parquet")) or proc.poll() is not None, 180, what="first part")
        proc.send_signal(signal.SIGKILL)
        n_at_kill = len(list(parts.glob("part-*.parquet")))
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "flow.log").read_text()[-3000:]
    assert 1 <= n_at_kill < 10, "the flow was not killed mid-run"
    run_id = mining_run_id(MODEL, mining_config().config_hash(), "train")
    assert run_status(home, run_id) == "running"
    summary = mine_flow(home=str(home), model=MODEL, shard_size=SHARD, dask_address=dask_cluster.scheduler_address)
    assert summary["shards_mined"] >= 1 and summary["shards_skipped"] >= n_at_kill
    assert sorted(finished_parts(parts)) == list(range(10))
    assert_same_rows(home, reference)
    assert run_status(home, run_id) == "completed"


def test_lost_worker_costs_a_retry(home, dask_cluster, reference):
    from distributed import Client

    parts, killed = run_dir(home), {}

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
        summary = mine_flow(home=str(home), model=MODEL, shard_size=SHARD,
                            dask_address=dask_cluster.scheduler_address)
        killer.join(10)
        assert killed and killed["parts"] < 10, "no worker was busy mid-run: nothing was tested"
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 60, what="nanny restarts the worker")
        assert killed["pid"] not in client.run(os.getpid).values()
    assert summary["shards_total"] == 10
    assert_same_rows(home, reference)
