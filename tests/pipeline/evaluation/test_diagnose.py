"""The localization diagnosis (#11 item 1): the fast statistics equal the cell-by-cell reference, give the
answers a hand-made map must give, and run over every stage of a model's lineage on a real phantom home."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.diagnose import (STATS, diagnose, localization_stats, main, map_stats,
                                          map_stats_reference)
from pipeline.evaluation.maxboxacc import Heatmap
from tests.conftest import register_tiny_model


@pytest.mark.parametrize("seed", range(8))
def test_fast_statistics_equal_the_reference(seed):
    rng = np.random.default_rng(seed)
    gh, gw = rng.integers(3, 20, 2)
    hm = rng.random((gh, gw)).astype(np.float32)
    width, height = rng.uniform(200, 1100, 2)
    boxes = np.c_[rng.uniform(-50, width, (3, 1)), rng.uniform(-50, height, (3, 1)),
                  rng.uniform(1, width, (3, 1)), rng.uniform(1, height, (3, 1))][: 1 + seed % 3]
    fast, slow = map_stats(hm, boxes, width, height), map_stats_reference(hm, boxes, width, height)
    assert fast.keys() == slow.keys() == set(STATS)
    for k in STATS:
        assert fast[k] == pytest.approx(slow[k], rel=1e-9, nan_ok=True), k


def test_a_map_that_points_at_the_box_and_one_that_covers_everything():
    peaked = np.zeros((8, 8))
    peaked[2, 5] = 1.0    # cell centre (5.5, 2.5) * 128 px = (704, 320)
    box = np.array([[640, 256, 128, 128]])   # exactly cell (2, 5)
    s = map_stats(peaked, box, 1024, 1024)
    assert s["pointing"] == 1 and s["inside"] == 1 and s["outside"] == 0 and s["share_ge_0.5"] == 1 / 64
    flat = np.ones((8, 8))
    s = map_stats(flat, box, 1024, 1024)
    assert s["share_ge_0.5"] == 1 and s["contrast"] == 1
    wrong = np.zeros((8, 8))
    wrong[7, 0] = 1.0
    assert map_stats(wrong, box, 1024, 1024)["pointing"] == 0


def test_statistics_are_averaged_per_map_and_finding():
    gt = pd.DataFrame([("a", "Mass", 0, 0, 512, 512), ("b", "Mass", 512, 512, 512, 512)],
                      columns=["image_id", "finding", "x", "y", "w", "h"])
    hit, miss = np.zeros((4, 4)), np.zeros((4, 4))
    hit[0, 0], miss[0, 0] = 1, 1   # top-left: inside a's box, outside b's
    maps = {"cam": [Heatmap("a", "Mass", hit, 1024, 1024), Heatmap("b", "Mass", miss, 1024, 1024)]}
    table = localization_stats(maps, gt)
    assert table.to_dict("records")[0]["pointing"] == 0.5 and table["n"].tolist() == [2]


@pytest.fixture(scope="module")
def staged_home(tmp_path_factory):
    """A phantom (exact truth) in a 64 px cache, and a two-stage lineage of untrained models."""
    from pipeline.ingest.nih import ingest_nih
    from pipeline.phantom import generate

    base = tmp_path_factory.mktemp("diagnose")
    generate(base / "phantom", n=40, seed=3, size=128, workers=1, progress=False)
    home = base / "home"
    ingest_nih(home, base / "phantom", sizes=(64,))
    register_tiny_model(home, "s-base", seed=0)
    register_tiny_model(home, "s-am1", seed=1, stage="am1", parent_id="s-base")
    return home


def test_every_stage_of_the_lineage_is_diagnosed(staged_home, tmp_path, capsys):
    from warehouse import db
    con = db.connect(staged_home, read_only=True)
    ids = [r[0] for r in con.execute("SELECT DISTINCT image_id FROM gt_boxes WHERE source = 'truth'").fetchall()]
    con.close()
    df = diagnose(staged_home, "s-am1", image_ids=ids)
    assert df["stage"].unique().tolist() == ["base", "am1"]
    assert set(df["map"]) == {"cam", "fused"}
    assert ((df[["pointing", "share_ge_0.5"]] >= 0) & (df[["pointing", "share_ge_0.5"]] <= 1)).all().all()
    assert df.groupby(["stage", "map"])["n"].sum().nunique() == 1   # every stage saw the same pairs
    # two stages with other weights: their maps, hence statistics, differ
    a, b = (df[df["stage"] == s].set_index(["map", "finding"])["inside"] for s in ("base", "am1"))
    assert not np.allclose(a, b)


def test_the_command_writes_its_tables(staged_home, tmp_path, capsys):
    assert main(["--home", str(staged_home), "--model", "s-am1", "--split", "test", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "diagnosis.csv")
    assert set(table["stage"]) == {"base", "am1"} and (tmp_path / "diagnosis.md").read_text().startswith("|")
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("fused pointing game, last stage: ")
