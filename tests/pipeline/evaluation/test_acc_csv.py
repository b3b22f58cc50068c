"""docs/results/phantom-acc.csv rows (#19): read from a real warehouse, equal to the protocol's Acc, with
intervals, and merged so that rewriting a setting replaces its rows and keeps every other one."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.acc_csv import COLUMNS, phantom_of, run_rows, write_home_rows, write_rows
from pipeline.evaluation.protocol import evaluate
from pipeline.runs.record import ingest_roots
from tests.pipeline.export.test_export import BOXES, RUN, make_home
from warehouse.db import connect

# phantom truth on the mined images: two hit by the run's boxes, one missed
TRUTH = [("00000001_000.png", "Atelectasis", 230.0, 550.0, 80.0, 75.0),
         ("00000001_000.png", "Infiltration", 700.0, 700.0, 100.0, 100.0),
         ("00000002_001.png", "Mass", 985.0, 995.0, 35.0, 29.0)]


@pytest.fixture
def home(tmp_path):
    home = make_home(tmp_path / "home")
    con = connect(home)
    con.executemany("INSERT INTO gt_boxes VALUES (?, ?, ?, ?, ?, ?, 'truth')", TRUTH)
    roots = ingest_roots(con, home)
    con.close()
    (roots[0] / "phantom_manifest.json").write_text(json.dumps({"seed": 123, "difficulty": 0.5, "n": 4}))
    return home


def test_rows_equal_the_protocol_and_carry_intervals(home):
    con = connect(home, read_only=True)
    try:
        assert phantom_of(con, home) == (123, 0.5)
        rows = run_rows(con, RUN, n_boot=100)
    finally:
        con.close()
    boxes = pd.DataFrame(BOXES, columns=["image_id", "finding", "rank", "x", "y", "w", "h", "score"])
    gt = pd.DataFrame(TRUTH, columns=["image_id", "finding", "x", "y", "w", "h"])
    for protocol, family in (("all/iou@truth", "iou"), ("all/iobb@truth", "iobb")):
        ref = evaluate(boxes, gt, RUN, protocols=(("all", family),))
        ref = ref[(ref["metric"] == "acc") & (ref["n_gt"] > 0)].set_index(["finding", "t"])["acc"]
        got = rows[rows["protocol"] == protocol].set_index(["finding", "t"])
        assert len(got) == len(ref) > 0
        np.testing.assert_allclose(got.loc[ref.index, "acc"], ref, atol=1e-12)
        assert (got["lo"] <= got["acc"] + 1e-12).all() and (got["acc"] <= got["hi"] + 1e-12).all()
    hit = rows[(rows["protocol"] == "all/iou@truth") & (rows["t"].round(2) == 0.3)].set_index("finding")["acc"]
    assert hit["Atelectasis"] == 1.0 and hit["Infiltration"] == 0.0


def test_rewriting_a_setting_replaces_its_rows_only(home, tmp_path):
    path = tmp_path / "acc.csv"
    write_home_rows(home, path, "r", {"am3-kp": RUN, "am1": RUN}, n_boot=20)
    first = pd.read_csv(path)
    assert list(first.columns) == COLUMNS
    assert set(first["setting"]) == {"am3-kp", "am1"}
    assert set(first.loc[first["setting"] == "am1", "protocol"]) == {"all/iou@truth"}
    assert {"all/iou@truth", "all/iobb@truth"} <= set(first.loc[first["setting"] == "am3-kp", "protocol"])
    text = path.read_text()
    write_home_rows(home, path, "r", {"am1": RUN}, n_boot=20)
    assert path.read_text() == text                      # the same rows again: not one byte moves
    again = pd.read_csv(path)
    assert len(again) == len(first)                      # replaced, not appended
    assert (again["phantom_seed"] == 123).all() and (again["difficulty"] == 0.5).all()


def test_point_rows_keep_one_number_format_and_old_rows_keep_their_bytes(tmp_path):
    """Rows without an interval arrive from DuckDB with NULL `lo`/`hi` (an object column): the numbers must still
    be written as %.4f, or merging one run rewrites every row of the table."""
    rows = pd.DataFrame({"protocol": ["all/iou@truth", "bounded/iou@truth"], "finding": ["Mass", "Mass"],
                         "t": [0.3, 0.3], "acc": [0.25, 0.5], "lo": [0.0, None], "hi": [0.4, None], "n_gt": [4, 4]})
    rows = rows.astype({"lo": object, "hi": object})
    path = tmp_path / "acc.csv"
    write_rows(path, rows, recipe="r", setting="a", phantom_seed=1, difficulty=0.5, hardware_label="cpu")
    first = path.read_text()
    write_rows(path, rows, recipe="r", setting="b", phantom_seed=1, difficulty=0.5, hardware_label="cpu")
    cells = pd.read_csv(path, dtype=str, keep_default_na=False)[["t", "acc", "lo", "hi"]].to_numpy().ravel()
    assert all(re.fullmatch(r"\d\.\d{4}", c) for c in cells if c)   # one format, whatever the rows brought
    assert [line for line in path.read_text().splitlines() if ",a," in line] == first.splitlines()[1:]
