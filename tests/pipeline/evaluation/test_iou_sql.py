"""The SQL overlap path over the real warehouse equals the numpy path; results round-trip into eval_results."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.evaluation.iou import number_gt, overlap_pairs, overlap_pairs_sql
from pipeline.evaluation.protocol import evaluate, evaluate_warehouse, write_results
from warehouse.db import PARQUET_TABLES, connect, refresh_views, write_parquet_atomic

FINDINGS = ["Atelectasis", "Mass", "Nodule"]


def synthetic(rng, n_images=30):
    images, gts, boxes = [], [], []
    for i in range(n_images):
        iid = f"{i:05d}_000.png"
        images.append((iid, "test" if i % 3 else "val"))
        for c in FINDINGS:
            if rng.random() < 0.6:
                for _ in range(rng.integers(1, 3)):
                    gts.append((iid, c, *rng.uniform(0, 500, 2).round(1), *rng.uniform(10, 400, 2).round(1)))
            for r in range(1, rng.integers(0, 4) + 1):
                boxes.append(("r1", "m1", iid, c, r, *rng.uniform(0, 500, 2), *rng.uniform(10, 400, 2),
                              rng.random(), 0.9, 0.5))
    # a second run on the same images must not leak into run r1
    boxes += [("r2", "m1", b[2], b[3], b[4], 0.0, 0.0, 1.0, 1.0, 0.1, 0.9, 0.5) for b in boxes]
    cols = [f.name for f in PARQUET_TABLES["mined_boxes"] if f.name != "method"]
    return (pd.DataFrame(images, columns=["image_id", "split"]),
            pd.DataFrame(gts, columns=["image_id", "finding", "x", "y", "w", "h"]),
            pd.DataFrame(boxes, columns=cols))


@pytest.fixture()
def warehouse(tmp_path):
    images, gt, boxes = synthetic(np.random.default_rng(0))
    con = connect(tmp_path)
    for iid, split in images.itertuples(index=False):
        con.execute("INSERT INTO images (image_id, patient_id, width, height, split, source, ingested_at) "
                    "VALUES (?, 'p', 1024, 1024, ?, 'phantom', now())", [iid, split])
    con.executemany("INSERT INTO gt_boxes VALUES (?, ?, ?, ?, ?, ?, 'phantom')", gt.values.tolist())
    schema = PARQUET_TABLES["mined_boxes"]
    for run_id, part in boxes.groupby("run_id"):   # the mining layout: one hive partition per run
        write_parquet_atomic(pa.Table.from_pandas(part.assign(method="am"), schema=schema, preserve_index=False),
                             tmp_path / "data" / "mined_boxes" / f"run_id={run_id}" / "part-00000.parquet")
    refresh_views(con, tmp_path / "data")
    yield con, images, gt, boxes
    con.close()


def test_sql_and_numpy_overlaps_are_identical(warehouse):
    con, images, gt, boxes = warehouse
    # what the warehouse hands back: FLOAT coordinates, exactly as stored
    stored = con.execute("SELECT * FROM mined_boxes WHERE run_id = 'r1'").df()
    assert len(stored) == (boxes.run_id == "r1").sum() > 50
    test_ids = images.query("split == 'test'").image_id.tolist()
    for image_ids in (None, test_ids):
        g = number_gt(gt if image_ids is None else gt[gt.image_id.isin(image_ids)])
        for kind in ("iou", "iobb"):
            py = overlap_pairs(stored, g, kind)
            sql = overlap_pairs_sql(con, kind, run_id="r1", image_ids=image_ids)
            assert len(py) > 50 and (py.overlap > 0).sum() > 5
            pd.testing.assert_frame_equal(py, sql, check_exact=True, check_dtype=False)


@pytest.mark.parametrize("split", [None, "test"])
def test_evaluate_warehouse_equals_dataframe_path(warehouse, split):
    con, images, gt, _ = warehouse
    stored = con.execute("SELECT * FROM mined_boxes WHERE run_id = 'r1'").df()
    if split:
        gt = gt[gt.image_id.isin(images.query("split == @split").image_id)]
    expected = evaluate(stored, gt, "r1", findings=FINDINGS)
    got = evaluate_warehouse(con, "r1", split=split, findings=FINDINGS)
    pd.testing.assert_frame_equal(expected, got, check_exact=True)
    assert got.acc.between(0, 1).all() and (got.acc > 0).any()


def test_write_results_replaces_same_run_and_protocol(warehouse):
    con = warehouse[0]
    res = evaluate_warehouse(con, "r1", findings=FINDINGS)
    assert write_results(con, res) == len(res)
    write_results(con, res)                                   # a rerun replaces, never duplicates
    write_results(con, res.assign(run_id="r2"))
    stored = con.execute("SELECT * FROM eval_results WHERE run_id = 'r1' ORDER BY protocol, finding, t").df()
    assert len(stored) == len(res)
    want = res.sort_values(["protocol", "finding", "t"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(stored, want, check_dtype=False)
    assert con.execute("SELECT count(*) FROM eval_results").fetchone()[0] == 2 * len(res)
