"""The downstream detector (#13): method column, anchors, config errors, COCO AP and Acc equal to their
references, and a tiny detector trained on a real mining run of phantom images (lineage, resume after a kill,
reviewed boxes, predictions as mined_boxes rows)."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from tests.conftest import register_tiny_model, scratch
from warehouse import db

CLASSIFIER, RUN = "tiny-cls", "mine-all-tiny"
TINY = {"model": {"representation": 16, "rpn_top_n": [40, 20], "box_batch": 16},
        "train": {"epochs": 2, "batch_size": 4, "warmup_steps": 2, "negatives": 0.5},
        "runtime": {"device": "cpu", "amp": "none", "save_every_steps": 2}}


def build_home(base, n: int = 48):
    """A phantom ingested at 64 px, a tiny ResNet-18 classifier registered with a training config, and its
    mining run of every image written as `harvest mine` writes it (one part, its image list, a `runs` row)."""
    from pipeline.base.home import Home
    from pipeline.config.mining import MiningConfig
    from pipeline.ingest.nih import ingest_nih
    from pipeline.mining import mine_shard
    from pipeline.phantom import generate
    from pipeline.runs.parts import write_part
    from pipeline.runs.record import finish_run, start_run

    generate(base / "phantom", n=n, seed=0, size=128, workers=1, progress=False)
    home = base / "home"
    ingest_nih(home, base / "phantom", sizes=(64,))
    register_tiny_model(home, CLASSIFIER, neck="baseline", input_size=64, config={
        "seed": 0, "model": {"arch": "resnet18", "neck": "baseline", "imagenet": False},
        "data": {"input_size": 64, "val_fraction": 0.2}})
    con = db.connect(home, read_only=True)
    ids = sorted(r[0] for r in con.execute("SELECT image_id FROM images").fetchall())
    con.close()
    start_run(home, "mine", {"split": "all"}, CLASSIFIER, RUN)
    write_part(Home.resolve(home), RUN, 0, mine_shard(home, CLASSIFIER, ids, MiningConfig(), RUN), ids)
    finish_run(home, RUN)
    return home


@pytest.fixture(scope="module")
def base_home(tmp_path_factory):
    with scratch(tmp_path_factory, "detector") as base:
        yield build_home(base)


# ---------------------------------------------------------------- the method column

def test_parts_without_method_read_as_am(tmp_path):
    schema = db.PARQUET_TABLES["mined_boxes"]
    row = {"run_id": ["old"], "model_id": ["m"], "image_id": ["a.png"], "finding": ["Mass"], "rank": [1],
           "x": [1.0], "y": [2.0], "w": [3.0], "h": [4.0], "score": [0.5], "prob": [0.9], "threshold": [0.5]}
    old = pa.schema([f for f in schema if f.name != "method"])   # a part written before the column existed
    db.write_parquet_atomic(pa.table(row, schema=old), tmp_path / "data/mined_boxes/run_id=old/part-00000.parquet")
    new = pa.table({**row, "run_id": ["det"], "method": ["detector"]}, schema=schema)
    db.write_parquet_atomic(new, tmp_path / "data/mined_boxes/run_id=det/part-00000.parquet")
    for read_only in (False, True):
        con = db.connect(tmp_path, read_only=read_only)
        rel = con.execute("SELECT * FROM mined_boxes ORDER BY run_id")
        assert [d[0] for d in rel.description] == schema.names
        assert [(r[0], r[-1]) for r in rel.fetchall()] == [("det", "detector"), ("old", "am")]
        assert con.execute("SELECT count(*) FROM mined_boxes WHERE method = 'am'").fetchone()[0] == 1
        con.close()


def test_mining_writes_am(base_home):
    con = db.connect(base_home, read_only=True)
    assert con.execute("SELECT DISTINCT method FROM mined_boxes").fetchall() == [("am",)]
    con.close()


# ---------------------------------------------------------------- pieces

def test_fit_anchors():
    from pipeline.detector.model import N_LEVELS, fit_anchors

    rng = np.random.default_rng(0)
    wh = np.exp(rng.normal(np.log(40), 0.5, (300, 2)))
    a = fit_anchors(wh, 256)
    assert len(a["sizes"]) == N_LEVELS and np.all(np.diff(a["sizes"]) > 0)
    assert a["sizes"][0] < np.median(np.sqrt(wh.prod(1))) < a["sizes"][-1]
    assert len(a["ratios"]) == 3 and a["ratios"][0] < 1 < a["ratios"][-1]
    assert fit_anchors(np.zeros((0, 2)), 256) == {"sizes": [16.0, 32.0, 64.0, 128.0], "ratios": [0.5, 1.0, 2.0]}
    assert np.all(np.diff(fit_anchors(np.full((10, 2), 30.0), 256)["sizes"]) > 0)   # equal sizes made distinct


@pytest.mark.parametrize("bad, message", [
    ({"train": {"epochs": 0}}, "train.epochs = 0: must be >= 1"),
    ({"boxes": {"findings": ["Mass", "Lump"]}}, "boxes.findings = ['Lump']"),
    ({"boxes": {"rank": [1]}}, "unknown key(s) boxes.rank"),
    ({"model": {"input_size": 100}}, "model.input_size = 100"),
])
def test_config_errors_name_the_key(bad, message):
    from pipeline.config.detector import DetectorConfig

    with pytest.raises(ValueError) as err:
        DetectorConfig.load(bad)
    assert message in str(err.value) and "\n" not in str(err.value)


def synthetic(seed: int = 0, n_images: int = 30):
    """Truth and two runs' ranked boxes (some near the truth, some anywhere) on `n_images` images."""
    rng = np.random.default_rng(seed)
    ids = [f"{k:03d}.png" for k in range(n_images)]
    gt, boxes = [], []
    for iid in ids:
        for f in ("Mass", "Nodule", "Effusion"):
            if rng.random() < 0.5:
                continue
            g = [(iid, f, *rng.uniform(0, 600, 2), *rng.uniform(40, 300, 2)) for _ in range(rng.integers(1, 3))]
            gt += g
            for rank in range(1, rng.integers(1, 4) + 1):
                x, y, w, h = g[0][2:] if rng.random() < 0.6 else (*rng.uniform(0, 600, 2), *rng.uniform(40, 300, 2))
                j = rng.normal(0, 0.15, 4) * [w, h, w, h]
                boxes.append((iid, f, rank, x + j[0], y + j[1], w + abs(j[2]), h + abs(j[3]), rng.random()))
        if rng.random() < 0.3:   # a box of a finding without truth on this image
            boxes.append((iid, "Mass", 9, 10.0, 10.0, 50.0, 50.0, rng.random()))
    gt = pd.DataFrame(gt, columns=["image_id", "finding", "x", "y", "w", "h"])
    boxes = pd.DataFrame(boxes, columns=["image_id", "finding", "rank", "x", "y", "w", "h", "score"])
    return ids, gt, boxes.drop_duplicates(["image_id", "finding", "rank"])


def test_coco_ap_equals_pycocotools():
    from pipeline.detector.evaluate import COCO_IOUS, coco_ap, coco_matches

    ids, gt, boxes = synthetic()
    findings = ["Mass", "Nodule", "Effusion"]
    matches, ev = coco_matches(boxes, gt, ids, findings)
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        ev.accumulate()
    for k, f in enumerate(findings):
        p = ev.eval["precision"][:, :, k, 0, 0]
        ref = np.array([row[row > -1].mean() for row in p])
        assert np.allclose(coco_ap(matches, f), ref, atol=1e-12), f
    assert len(COCO_IOUS) == 11 and COCO_IOUS[0] == 0.3 and COCO_IOUS[1] == 0.5
    # a resample that takes every image twice is the same set, twice: the same AP
    assert np.allclose(coco_ap(matches, "Mass", np.full(len(ids), 2)), coco_ap(matches, "Mass"))


def test_acc_counts_equal_the_protocol():
    from pipeline.evaluation.bootstrap import acc_counts, acc_values
    from pipeline.evaluation.protocol import IOU_THRESHOLDS, evaluate

    ids, gt, boxes = synthetic(1)
    findings = ["Mass", "Nodule", "Effusion"]
    counts = acc_counts(boxes, gt, ids, findings)
    ref = evaluate(boxes, gt, "r", findings=findings, protocols=(("all", "iou"),))
    for f in findings:
        acc, afp = acc_values(counts, f)
        r = ref[ref["finding"] == f].sort_values("t")
        assert np.allclose(acc, r["acc"]) and np.allclose(afp, r["afp"]), f
        assert list(r["t"]) == list(IOU_THRESHOLDS)


def test_bootstrap_intervals_hold_the_estimate():
    from pipeline.detector.evaluate import compare

    ids, gt, boxes = synthetic(2, n_images=40)
    worse = boxes.assign(x=boxes["x"] + 80.0)
    t = compare({"am": worse, "detector": boxes}, gt, ids, findings=("Mass", "Nodule", "Effusion"), n_boot=50,
                differences=[("detector", "am")])
    assert set(t["method"]) == {"am", "detector", "detector - am"}
    ok = t.dropna(subset=["value", "lo"])
    assert (ok["lo"] <= ok["value"] + 1e-9).all() and (ok["value"] <= ok["hi"] + 1e-9).all()
    d = t[(t["finding"] == "mean") & (t["metric"] == "acc@0.3") & (t["method"] == "detector - am")].iloc[0]
    assert d.value > 0 and d.lo > 0   # boxes moved off their truth are clearly worse


# ---------------------------------------------------------------- training, lineage, resume, predictions

class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def trained(base_home, tmp_path_factory):
    from pipeline.detector.train import train_detector

    with scratch(tmp_path_factory, "clean") as base:
        home = shutil.copytree(base_home, base / "home")
        yield home, train_detector(home, RUN, TINY)


def test_training_registers_the_detector_with_its_lineage(trained):
    from pipeline.detector.data import mining_source, training_images
    from pipeline.detector.train import plan
    from pipeline.training.checkpoint import load_checkpoint, model_row

    home, model_id = trained
    row = model_row(home, model_id)
    config = json.loads(row["config"])
    assert row["stage"] == "detector" and row["parent_id"] == CLASSIFIER
    assert config["mining_run"] == RUN and config["classifier"] == CLASSIFIER and config["target_boxes"] > 0
    assert model_row(home, "latest")["model_id"] == CLASSIFIER   # `harvest mine --model latest` never a detector
    meta = load_checkpoint(home / row["checkpoint"])["meta"]
    src = mining_source(home, RUN)
    train_ids = training_images(home, src)
    assert meta["train_images"] == train_ids and len(meta["metrics"]["history"]) == 2
    con = db.connect(home, read_only=True)
    splits = dict(con.execute("SELECT image_id, split FROM images").fetchall())
    con.close()
    assert {splits[i] for i in train_ids} == {"train"}   # the classifier's training split, val carved out
    assert len(train_ids) < sum(s == "train" for s in splits.values())
    assert plan(home, RUN, TINY).model_id == model_id   # deterministic id: a rerun reuses it


def test_killed_training_resumes_to_the_same_weights(base_home, trained, tmp_path, caplog):
    from pipeline.detector.train import train_detector
    from pipeline.training.checkpoint import load_checkpoint

    clean, model_id = trained
    home = shutil.copytree(base_home, tmp_path / "home")

    def kill(mid, epoch, step):
        if (epoch, step) == (1, 3):
            raise Killed()
    with pytest.raises(Killed):
        train_detector(home, RUN, TINY, on_step=kill)
    last = load_checkpoint(home / "checkpoints" / model_id / "last.pt")
    assert (last["epoch"], last["step"]) == (1, 2)
    redone = []
    caplog.set_level(logging.INFO, "pipeline.detector")
    caplog.clear()   # the killed run's records too are captured where an earlier test left the logger at INFO
    assert train_detector(home, RUN, TINY, on_step=lambda *a: redone.append(a)) == model_id
    assert redone[0] == (model_id, 1, 3)
    steps = [r.getMessage() for r in caplog.records if "/2 step " in r.getMessage()]   # progress, not silence
    n = redone[-1][2]
    assert steps[0].startswith(f"detector {model_id} epoch 2/2 step 3/{n} loss ")   # the resumed epoch's steps
    assert steps[-1].startswith(f"detector {model_id} epoch 2/2 step {n}/{n} loss ") and len(steps) >= n - 2
    a = load_checkpoint(clean / "checkpoints" / model_id / "final.pt")["model"]
    b = load_checkpoint(home / "checkpoints" / model_id / "final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_filters_and_reviewed_boxes(base_home, tmp_path):
    from pipeline.config.detector import BoxesConfig
    from pipeline.detector.data import mining_source, training_images, training_targets

    home = shutil.copytree(base_home, tmp_path / "home")
    ids = training_images(home, mining_source(home, RUN))
    every = training_targets(home, RUN, ids, BoxesConfig(ranks=(1, 2, 3)))
    first = training_targets(home, RUN, ids, BoxesConfig())
    assert len(first.boxes) < len(every.boxes) and len(first.boxes) == first.boxes[["image_id", "finding"]] \
        .drop_duplicates().shape[0]
    findings = sorted(set(first.boxes["finding"]))
    one = training_targets(home, RUN, ids, BoxesConfig(findings=(findings[0],)))
    assert set(one.boxes["finding"]) == {findings[0]}
    high = training_targets(home, RUN, ids, BoxesConfig(ranks=(1, 2, 3), min_score=0.5))
    con = db.connect(home)
    scores = con.execute("SELECT score FROM mined_boxes WHERE run_id = ? AND image_id IN (SELECT unnest(?))",
                         [RUN, ids]).fetchall()
    assert len(high.boxes) == sum(s >= 0.5 for (s,) in scores)
    # reviews: one image corrected to a single box, one reviewed as negative
    a, b = sorted(set(first.boxes["image_id"]))[:2]
    con.execute("INSERT INTO gt_boxes VALUES (?, 'Mass', 10, 20, 30, 40, 'review')", [a])
    for iid, n in ((a, 1), (b, 0)):
        con.execute("INSERT INTO reviews VALUES (?, 'r.json', 'sha', 'coco', ?, ?, now())", [iid, RUN, n])
    con.close()
    rev = training_targets(home, RUN, ids, BoxesConfig())
    assert rev.reviewed_images == [a, b]
    assert rev.boxes[rev.boxes["image_id"] == a][["finding", "x", "y", "w", "h"]].values.tolist() == \
        [["Mass", 10.0, 20.0, 30.0, 40.0]]
    assert not (rev.boxes["image_id"] == b).any()
    assert training_targets(home, RUN, ids, BoxesConfig(reviewed=False)).boxes.equals(first.boxes)


def test_trust_floor_trains_on_what_a_trusted_export_keeps(base_home, tmp_path):
    """`boxes.trust_floor`: per finding the rank and cut of the run's trust rows, only trusted findings. The tiny
    run has no tuning truth (its few validation images hold no box), so first `ranks` applies, as in an export;
    then trust rows are stored by hand so that two findings pass, with other ranks and cuts."""
    from pipeline.config.detector import BoxesConfig, DetectorConfig
    from pipeline.detector.data import mining_source, training_images, training_targets
    from pipeline.evaluation import trust

    home = shutil.copytree(base_home, tmp_path / "home")
    ids = training_images(home, mining_source(home, RUN))
    untuned = training_targets(home, RUN, ids, BoxesConfig(trust_floor=0.5))
    assert not untuned.trust["applied"] and untuned.boxes.equals(training_targets(home, RUN, ids, BoxesConfig()).boxes)
    con = db.connect(home)
    mined = con.execute("SELECT image_id, finding, rank, score FROM mined_boxes WHERE run_id = ? AND "
                        "image_id IN (SELECT unnest(?))", [RUN, ids]).df()
    a = mined[mined["rank"] == 2]["finding"].value_counts().index[0]
    b = mined[(mined["finding"] != a) & (mined["score"] >= 0.5)]["finding"].value_counts().index[0]
    findings = sorted(set(mined["finding"]))
    rows = pd.DataFrame({"run_id": RUN, "finding": findings, "source": "review", "t": 0.3, "n_gt": 20,
                         "n_images": 20, "rank": 1, "min_score": np.nan, "acc": 0.0, "lo": 0.0, "hi": 0.1,
                         "precision": 0.0, "floor": 0.5, "kept": False, "basis": trust.basis(con, RUN)})
    rows.loc[rows["finding"] == a, ["acc", "rank", "min_score"]] = [0.9, 2, np.nan]
    rows.loc[rows["finding"] == b, ["acc", "rank", "min_score"]] = [0.7, 1, 0.5]
    trust.store(con, rows[trust.COLUMNS])
    con.close()
    got = training_targets(home, RUN, ids, BoxesConfig(trust_floor=0.6, ranks=(3,), reviewed=False))
    want = mined[((mined["finding"] == a) & (mined["rank"] == 2)) |
                 ((mined["finding"] == b) & (mined["rank"] == 1) & (mined["score"] >= 0.5))]
    assert got.trust["applied"] and set(want["finding"]) == {a, b} and \
        sorted(map(tuple, got.boxes[["image_id", "finding"]].values.tolist())) == \
        sorted(map(tuple, want[["image_id", "finding"]].values.tolist()))
    only = training_targets(home, RUN, ids, BoxesConfig(trust_floor=0.8))
    assert only.boxes["finding"].unique().tolist() == [a], only.trust
    assert training_targets(home, RUN, ids, BoxesConfig(trust_floor=0.95)).boxes.empty
    # the floor is part of a detector's identity only when set: ids of detectors trained before it stay
    assert "trust_floor" not in DetectorConfig().identity()["boxes"]
    assert DetectorConfig.from_dict({"boxes": {"trust_floor": 0.5}}).identity()["boxes"]["trust_floor"] == 0.5


def test_predictions_are_mined_boxes_rows(trained):
    from pipeline.config.detector import PredictSection
    from pipeline.detector.predict import load_detector, predict_table

    home, model_id = trained
    model, meta = load_detector(home, model_id)
    con = db.connect(home, read_only=True)
    images = con.execute("SELECT image_id, width, height FROM images ORDER BY 1").df()
    labels = con.execute("SELECT image_id, finding FROM labels").df()
    con.close()
    cfg = PredictSection(score_threshold=0.0, per_finding=2)
    table = predict_table(home, model, meta, list(images["image_id"]), "detect-x", cfg)
    assert table.schema.equals(db.PARQUET_TABLES["mined_boxes"])
    rows = table.to_pandas()
    assert len(rows) and set(rows["method"]) == {"detector"} and set(rows["model_id"]) == {model_id}
    assert rows["rank"].between(1, 2).all()
    assert not rows.duplicated(["image_id", "finding", "rank"]).any()
    labeled = set(map(tuple, labels.values))
    assert all((i, f) in labeled for i, f in zip(rows["image_id"], rows["finding"]))   # labeled findings only
    frame = rows.merge(images, on="image_id")
    assert (frame["x"] >= -1e-3).all() and (frame["x"] + frame["w"] <= frame["width"] + 1e-3).all()
    first = rows.sort_values(["image_id", "finding", "rank"]).groupby(["image_id", "finding"])
    assert (first["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
