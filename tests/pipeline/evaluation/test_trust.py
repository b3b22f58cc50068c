"""Trust in a run's boxes (#22 item 3): measured on the tuning set only, stored with the run, applied by exports."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.base.home import Home
from pipeline.base.vocab import held_out
from pipeline.evaluation import trust
from pipeline.export.write import export
from pipeline.runs.parts import write_part
from warehouse.db import PARQUET_TABLES, connect

RUN, MODEL, SEED, FRACTION, SIZE = "mine-trust", "am3-trust", 7, 0.5, 64
HIT, MISS = (10.0, 10.0, 20.0, 20.0), (40.0, 40.0, 10.0, 10.0)   # the truth box is HIT


def test_best_cut_agrees_with_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 12))
        scores = rng.integers(0, 5, n) / 4          # ties on purpose
        hits = rng.integers(0, 3, n) * rng.integers(0, 2, n)
        n_gt = int(hits.sum() + rng.integers(0, 4))
        assert trust.best_cut(scores, hits, n_gt) == trust.best_cut_reference(list(scores), list(hits), n_gt)


def test_the_cut_keeps_the_boxes_that_hit():
    scores, hits = np.array([0.9, 0.8, 0.3, 0.2]), np.array([1, 1, 0, 0])
    assert trust.best_cut(scores, hits, 4) == 0.8        # P 1, Acc 0.5 beats keeping all (P 0.5, Acc 0.5)
    assert trust.best_cut(scores, np.ones(4, int), 4) == -np.inf   # every box hits: no cut


def test_wilson_interval_is_not_empty_at_the_ends():
    lo, hi = trust.wilson(np.array([0, 10, 5]), np.array([10, 10, 10]))
    assert lo[0] == 0 and hi[0] == pytest.approx(0.2775, abs=1e-4) and lo[1] == pytest.approx(0.7225, abs=1e-4)
    assert lo[2] == pytest.approx(0.2366, abs=1e-4) and hi[2] == pytest.approx(0.7634, abs=1e-4)


def _patients() -> tuple[list[str], list[str]]:
    """Patients that training (seed SEED, val_fraction FRACTION) holds out, and ones it trains on."""
    ps = [f"p{k:03d}" for k in range(400)]
    return [p for p in ps if held_out(p, SEED, FRACTION)][:60], [p for p in ps if not held_out(p, SEED, FRACTION)][:60]


def make_home(root, truth: bool = True) -> Home:
    """60 validation, 60 training and 30 test images with Effusion, Mass and Nodule labels and truth boxes, and
    a run whose boxes hit: Effusion everywhere; Mass on half the images, its misses scored lower; Nodule only on
    the test split (on validation it misses), and its `bbox_list` boxes on validation images are the boxes
    themselves (they must not count); Cardiomegaly with its rank-2 box, never its rank-1 one."""
    home = Home(root).make()
    src = root.parent / f"{root.name}-src"
    (src / "images").mkdir(parents=True)
    val, train = _patients()
    images = [(f"v{k:03d}.png", p, "train") for k, p in enumerate(val)] + \
        [(f"t{k:03d}.png", p, "train") for k, p in enumerate(train)] + \
        [(f"x{k:03d}.png", f"q{k:03d}", "test") for k in range(30)]
    con = connect(home)
    con.execute("INSERT INTO models VALUES (?, NULL, 'am3', 'resnet18', 'bilinear', ?, 'checkpoints/m.pt', 'x', "
                "NULL, now())", [MODEL, json.dumps({"seed": SEED, "data": {"val_fraction": FRACTION}})])
    con.execute("INSERT INTO runs VALUES ('ingest-1', 'ingest', ?, NULL, NULL, now(), now(), 'completed')",
                [json.dumps({"kind": "nih", "root": str(src)})])
    con.execute("INSERT INTO runs VALUES (?, 'mine', '{}', ?, NULL, now(), now(), 'completed')", [RUN, MODEL])
    boxes = []
    for k, (image_id, patient, split) in enumerate(images):
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(src / "images" / image_id)
        con.execute("INSERT INTO images VALUES (?, ?, 0, 50, 'F', 'PA', ?, ?, 0.1, 0.1, ?, 'nih', ?, now())",
                    [image_id, patient, SIZE, SIZE, split, f"sha-{image_id}"])
        for finding in ("Effusion", "Mass", "Nodule", "Cardiomegaly"):
            con.execute("INSERT INTO labels VALUES (?, ?)", [image_id, finding])
            if truth:
                con.execute("INSERT INTO gt_boxes VALUES (?, ?, ?, ?, ?, ?, 'truth')", [image_id, finding, *HIT])
        mass_hits = k % 2 == 0
        nodule_hits = split == "test"
        boxes += [(image_id, "Effusion", 1, *HIT, 0.5),
                  (image_id, "Mass", 1, *(HIT if mass_hits else MISS), 0.9 if mass_hits else 0.2),
                  (image_id, "Nodule", 1, *(HIT if nodule_hits else MISS), 0.7),
                  (image_id, "Cardiomegaly", 1, *MISS, 0.9), (image_id, "Cardiomegaly", 2, *HIT, 0.8)]
        if image_id.startswith("v"):
            con.execute("INSERT INTO gt_boxes VALUES (?, 'Nodule', ?, ?, ?, ?, 'bbox_list')", [image_id, *MISS])
    con.close()
    add_part(home, boxes, [i[0] for i in images], 0)
    return home


def add_part(home: Home, boxes: list[tuple], image_ids: list[str], shard: int) -> None:
    cols, n = list(zip(*boxes)), len(boxes)
    table = pa.table({"run_id": [RUN] * n, "model_id": [MODEL] * n, "image_id": cols[0], "finding": cols[1],
                      "rank": cols[2], "x": cols[3], "y": cols[4], "w": cols[5], "h": cols[6], "score": cols[7],
                      "prob": [0.9] * n, "threshold": [0.5] * n, "method": ["am"] * n},
                     schema=PARQUET_TABLES["mined_boxes"])
    write_part(home, RUN, shard, table, image_ids)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Home:
    return make_home(tmp_path_factory.mktemp("trust") / "home")


def test_trust_is_measured_on_validation_truth_only(home):
    con = connect(home)
    try:
        rows = trust.trust_run(con, RUN).set_index("finding")
    finally:
        con.close()
    assert set(rows["source"]) == {"truth@val"} and (rows["n_gt"] == 60).all()   # the 60 held-out images
    assert rows.loc["Effusion", "acc"] == 1.0 and rows.loc["Effusion", "kept"] and np.isnan(rows.loc["Effusion", "min_score"])
    mass = rows.loc["Mass"]   # half hit; the cut keeps those, so every kept box hits
    assert mass["acc"] == pytest.approx(0.5, abs=0.01) and mass["precision"] == 1.0 and mass["min_score"] == pytest.approx(0.9)
    assert mass["lo"] < 0.5 < mass["hi"] and mass["kept"]
    # Nodule hits only on the test split, and its bbox_list boxes would say it hits: neither is looked at
    assert rows.loc["Nodule", "acc"] == 0.0 and not rows.loc["Nodule", "kept"]
    # the rule picks the rank whose boxes hit: Cardiomegaly's second threshold level
    assert rows.loc["Cardiomegaly", "rank"] == 2 and rows.loc["Cardiomegaly", "acc"] == 1.0
    assert (rows.drop("Cardiomegaly")["rank"] == 1).all()


def test_default_export_keeps_trusted_findings_and_says_so(home, tmp_path):
    out = export(home, RUN, "coco", tmp_path / "coco", images="none")
    manifest = json.loads((out / "manifest.json").read_text())
    findings = manifest["trust"]["findings"]
    assert manifest["trust"]["applied"] and manifest["trust"]["source"] == "truth@val"
    assert {f for f, e in findings.items() if e["kept"]} == {"Effusion", "Mass", "Cardiomegaly"}
    assert findings["Cardiomegaly"]["rank"] == 2
    assert findings["Nodule"]["acc"] == 0.0 and findings["Mass"]["n_gt"] == 60
    assert findings["Nodule"]["why"] == "estimated Acc 0.00 below the floor 0.5" and "why" not in findings["Mass"]
    annotations = [a for split in out.glob("annotations/instances_*.json")
                   for a in json.loads(split.read_text())["annotations"]]
    categories = {c["id"]: c["name"] for c in json.loads(next(out.glob("annotations/instances_*.json")).read_text())
                  ["categories"]}
    kept = pd.Series([categories[a["category_id"]] for a in annotations]).value_counts()
    assert kept.to_dict() == {"Effusion": 150, "Cardiomegaly": 150, "Mass": 75}   # Mass: above the cut; no Nodule
    every = export(home, RUN, "coco", tmp_path / "all", images="none", trust_floor=None)
    assert json.loads((every / "manifest.json").read_text())["counts"]["boxes"] == 600   # rank 1 of each
    review = export(home, RUN, "labelstudio", tmp_path / "ls", images="none")   # for people: every finding
    assert json.loads((review / "manifest.json").read_text())["trust"]["applied"] is False
    strict = export(home, RUN, "coco", tmp_path / "strict", images="none", trust_floor=0.9)
    assert json.loads((strict / "manifest.json").read_text())["counts"]["per_finding"].keys() == {"Effusion",
                                                                                                 "Cardiomegaly"}


def test_new_boxes_in_the_run_measure_trust_again(tmp_path):
    home = make_home(tmp_path / "home")
    con = connect(home)
    try:
        first = trust.gate(con, RUN)
        assert trust.read(con, RUN)["basis"].iloc[0] == first["basis"].iloc[0]
    finally:
        con.close()
    val, _ = _patients()
    extra = [(f"w{k:03d}.png", p) for k, p in enumerate(val[:20])]
    con = connect(home)
    for image_id, patient in extra:
        con.execute("INSERT INTO images VALUES (?, ?, 0, 50, 'F', 'PA', 64, 64, 0.1, 0.1, 'train', 'nih', ?, now())",
                    [image_id, patient, f"sha-{image_id}"])
        con.execute("INSERT INTO gt_boxes VALUES (?, 'Nodule', ?, ?, ?, ?, 'truth')", [image_id, *HIT])
    con.close()
    add_part(home, [(i, "Nodule", 1, *HIT, 0.7) for i, _ in extra], [i for i, _ in extra], 1)
    con = connect(home)
    try:
        again = trust.gate(con, RUN).set_index("finding")
    finally:
        con.close()
    assert again.loc["Nodule", "n_gt"] == 80 and again.loc["Nodule", "acc"] == pytest.approx(20 / 80)


def test_reviewed_boxes_are_the_tuning_set_on_real_data(tmp_path):
    home = make_home(tmp_path / "home", truth=False)
    con = connect(home)
    try:
        assert trust.gate(con, RUN) is None              # no truth, no review: nothing to measure on
        with pytest.raises(trust.NoTuningSet, match="import-review"):
            trust.trust_run(con, RUN)
        for image_id in ("t000.png", "t001.png", "x000.png"):   # the test image's review is never used
            con.execute("INSERT INTO gt_boxes VALUES (?, 'Mass', ?, ?, ?, ?, 'review')", [image_id, *HIT])
        rows = trust.gate(con, RUN).set_index("finding")
    finally:
        con.close()
    assert rows.loc["Mass", "source"] == "review" and rows.loc["Mass", "n_gt"] == 2
    assert not rows.loc["Mass", "kept"]                  # too few boxes to trust (MIN_GT)
