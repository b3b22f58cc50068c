"""Exports checked by their real consumers: pycocotools and torchvision, the Ultralytics layout (its own checker
in test_travel.py), NIH CSV re-ingestion into a fresh home."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from pipeline.base.files import sha256_file
from pipeline.base.home import Home
from pipeline.base.vocab import FINDINGS, INDEX
from pipeline.config.harvest import EXPORT_FORMATS
from pipeline.export import common, write as ex
from pipeline.runs.parts import write_part
from tests.pipeline.images.dicom_fixtures import chest, write_dicom
from warehouse.db import PARQUET_TABLES, connect

RUN, MODEL = "mine-20261126-a", "m-stage2-0001"
PHI = "PHI-PATIENT-7f3c91"  # a marker that must never leave the warehouse
DICOM_PHI = ("Doe^Jane", "PID-0001")  # in the DICOM file's header
DICOM_ID = "d-5f2a9c.dcm"
# image_id, width, height, split, labels: NIH names and a pseudonymous DICOM id, two frames, a negative.
IMAGES = [("00000001_000.png", 1024, 1024, "train", ["Atelectasis"]),  # Infiltration is mined, not labeled
          ("00000002_001.png", 1024, 1024, "test", ["Mass", "Pleural_Thickening"]),
          (DICOM_ID, 2000, 2500, "train", ["Cardiomegaly"]),
          ("00000003_000.png", 1024, 1024, "train", [])]                        # mined, no box: a negative
SPLIT = {i[0]: i[3] for i in IMAGES}
# image_id, finding, rank, x, y, w, h, score
BOXES = [
    ("00000001_000.png", "Atelectasis", 1, 225.08474, 547.0192, 86.77966, 79.18644, 0.91),
    ("00000001_000.png", "Atelectasis", 2, 600.5, 100.25, 50.0, 40.0, 0.35),
    ("00000001_000.png", "Infiltration", 1, 100.0, 200.0, 300.0, 250.0, 0.62),
    ("00000002_001.png", "Mass", 1, 980.0, 990.0, 120.0, 80.0, 0.77),          # crosses the right/bottom edge
    ("00000002_001.png", "Pleural_Thickening", 1, 10.0, 20.0, 30.0, 40.0, 0.12),
    (DICOM_ID, "Cardiomegaly", 1, 700.0, 1200.0, 640.0, 500.0, 0.88),
    (DICOM_ID, "Cardiomegaly", 2, 650.0, 1150.0, 700.0, 560.0, 0.55),
    (DICOM_ID, "Cardiomegaly", 3, 2100.0, 100.0, 50.0, 50.0, 0.20),     # wholly outside the frame
]
OUTSIDE = BOXES[-1]
CLIPPED = {BOXES[3]: (980.0, 990.0, 44.0, 34.0)}  # x 980..1100 -> 980..1024, y 990..1070 -> 990..1024


def exported(ranks=(1,), min_score=None, findings=None) -> list[tuple]:
    """The boxes an export holds: filtered, clipped to the frame, the one wholly outside dropped."""
    return [(*b[:3], *CLIPPED.get(b, b[3:7]), b[7]) for b in BOXES
            if b != OUTSIDE and (ranks is None or b[2] in ranks) and (min_score is None or b[7] >= min_score)
            and (findings is None or b[1] in findings)]


def make_home(root: Path, images=IMAGES, boxes=BOXES) -> Home:
    """A warehouse with four images (their files under recorded ingest roots), one model, one mining run
    whose part covers all four images and boxes three."""
    home = Home(root).make()
    nih, dicom = root.parent / f"{root.name}-src" / "nih", root.parent / f"{root.name}-src" / "dicom"
    (nih / "images_001" / "images").mkdir(parents=True)
    dicom.mkdir(parents=True)
    sha = {}
    for k, (image_id, w, h, _, _) in enumerate(images):
        if image_id == DICOM_ID:
            path = write_dicom(dicom / "Doe^Jane.dcm", chest(h, w), PatientName=DICOM_PHI[0])
        else:
            path = nih / "images_001" / "images" / image_id
            Image.fromarray(np.full((h, w), 40 * k % 256, np.uint8)).save(path, compress_level=1)
        sha[image_id] = sha256_file(path)
    con = connect(home)
    for i, (image_id, w, h, split, labels) in enumerate(images):
        con.execute("INSERT INTO images VALUES (?, ?, 0, 63, 'F', 'PA', ?, ?, 0.14, 0.14, ?, ?, ?, now())",
                    [image_id, f"{PHI}-{i}", w, h, split, "dicom" if image_id == DICOM_ID else "nih",
                     sha[image_id]])
        for finding in labels:
            con.execute("INSERT INTO labels VALUES (?, ?)", [image_id, finding])
    con.execute("INSERT INTO models VALUES (?, 'm-stage1-0001', 'stage2', 'resnet18', 'bilinear', ?, "
                "'checkpoints/m.pt', 'abc123', NULL, now())", [MODEL, json.dumps({"lr": 0.01, "input_size": 256})])
    for kind, src in (("nih", nih), ("dicom", dicom)):
        con.execute("INSERT INTO runs VALUES (?, 'ingest', ?, NULL, NULL, now(), now(), 'completed')",
                    [f"ingest-{kind}", json.dumps({"kind": kind, "root": str(src), "sizes": [256]})])
    con.close()
    add_mining_run(home, RUN, boxes, [i[0] for i in images])
    return home


def add_mining_run(home: Home, run_id: str, boxes, image_ids) -> None:
    """A completed mining run of MODEL whose one part covers `image_ids` and holds `boxes` (BOXES' tuples)."""
    con = connect(home)
    con.execute("INSERT INTO runs VALUES (?, 'mine', ?, ?, 'v0.1-3-gdeadbee', now(), now(), 'completed')",
                [run_id, json.dumps({"T": 3, "shard_size": 2000}), MODEL])
    con.close()
    cols = list(zip(*boxes))
    n = len(boxes)
    table = pa.table({"run_id": [run_id] * n, "model_id": [MODEL] * n, "image_id": cols[0], "finding": cols[1],
                      "rank": cols[2], "x": cols[3], "y": cols[4], "w": cols[5], "h": cols[6], "score": cols[7],
                      "prob": [0.9] * n, "threshold": [0.5] * n, "method": ["am"] * n},
                     schema=PARQUET_TABLES["mined_boxes"])
    write_part(home, run_id, 0, table, list(image_ids))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Home:
    return make_home(tmp_path_factory.mktemp("export") / "home")


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return fn(*args)


def coco_split(out: Path, split: str):
    from pycocotools.coco import COCO
    return quiet(COCO, str(out / "annotations" / f"instances_{split}.json"))


def test_coco_per_split_with_negatives_loads_and_evaluates_in_pycocotools(home, tmp_path):
    from pycocotools.cocoeval import COCOeval

    out = ex.export(home, RUN, "coco", tmp_path / "coco", ranks=None)
    assert sorted(p.name for p in (out / "annotations").iterdir()) == [
        "detections_test.json", "detections_train.json", "instances_test.json", "instances_train.json"]
    names = {}
    for split in ("train", "test"):
        gt = coco_split(out, split)
        assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(FINDINGS)
        names[split] = {im["file_name"]: im for im in gt.loadImgs(gt.getImgIds())}
        for name in names[split]:
            assert (out / "images" / split / name).is_file()  # file_name resolves under images/<split>
        for a in gt.loadAnns(gt.getAnnIds()):
            x, y, w, h = a["bbox"]
            assert a["segmentation"] == [[x, y, x + w, y, x + w, y + h, x, y + h]]
            assert a["iscrowd"] == 0 and a["area"] == pytest.approx(w * h)
    assert set(names["train"]) == {"00000001_000.png", "00000003_000.png", DICOM_ID + ".png"}  # negative kept
    assert set(names["test"]) == {"00000002_001.png"}
    assert {k: (v["width"], v["height"]) for k, v in names["train"].items()}[DICOM_ID + ".png"] == (2000, 2500)
    gt = coco_split(out, "train")
    assert len(gt.getAnnIds()) == len([b for b in exported(None) if SPLIT[b[0]] == "train"])
    assert gt.getAnnIds(imgIds=[names["train"]["00000003_000.png"]["id"]]) == []
    ann = gt.loadAnns(gt.getAnnIds(imgIds=[names["train"]["00000001_000.png"]["id"]],
                                   catIds=[INDEX["Atelectasis"] + 1]))
    top = min(ann, key=lambda a: a["rank"])
    assert top["bbox"] == pytest.approx([225.08474, 547.0192, 86.77966, 79.18644], rel=1e-6)
    assert top["score"] == pytest.approx(0.91)

    ev = COCOeval(gt, quiet(gt.loadRes, str(out / "annotations" / "detections_train.json")), "bbox")
    for step in (ev.evaluate, ev.accumulate, ev.summarize):
        quiet(step)
    assert ev.stats[0] == pytest.approx(1.0)  # the boxes scored against themselves: AP@[.5:.95] = 1
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["negatives"] == 1 and m["counts"]["splits"] == {
        "train": {"images": 3, "boxes": 5}, "test": {"images": 1, "boxes": 2}}
    assert m["images"]["mode"] == "link" and m["images"]["linked"] == 3 and m["images"]["decoded"] == 1


def test_coco_images_are_the_sources_linked_or_copied(home, tmp_path):
    src = Path(json.loads(connect(home, read_only=True).execute(
        "SELECT params FROM runs WHERE run_id = 'ingest-nih'").fetchone()[0])["root"]) / "images_001" / "images"
    linked = ex.export(home, RUN, "coco", tmp_path / "l")
    copied = ex.export(home, RUN, "coco", tmp_path / "c", images="copy")
    for out, same in ((linked, True), (copied, False)):
        image = out / "images" / "train" / "00000001_000.png"
        assert image.read_bytes() == (src / "00000001_000.png").read_bytes()
        assert os.path.samefile(image, src / "00000001_000.png") is same
    dicom = np.asarray(Image.open(linked / "images" / "train" / f"{DICOM_ID}.png"))
    assert dicom.shape == (2500, 2000) and dicom.dtype == np.uint8 and dicom.max() > dicom.min()


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_a_source_edited_in_place_stops_the_export_in_one_line(tmp_path, mode):
    """Same name, same frame, other pixels: the sha256 of its `images` row tells, and no export is left."""
    home = make_home(tmp_path / "home")
    src = tmp_path / "home-src" / "nih" / "images_001" / "images" / "00000002_001.png"
    Image.fromarray(np.full((1024, 1024), 7, np.uint8)).save(src, compress_level=1)
    with pytest.raises(ValueError) as err:
        ex.export(home, RUN, "coco", tmp_path / "out", images=mode)
    assert "00000002_001.png ingested (its sha256 differs)" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_coco_loads_in_torchvision_with_and_without_v2(home, tmp_path):
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

    out = ex.export(home, RUN, "coco", tmp_path / "coco", ranks=None)
    plain = CocoDetection(str(out / "images" / "train"), str(out / "annotations" / "instances_train.json"))
    with contextlib.redirect_stdout(io.StringIO()):
        v2 = wrap_dataset_for_transforms_v2(plain, target_keys="all")
    seen = set()
    for k in range(len(plain)):
        image, target = plain[k]
        _, t2 = v2[k]
        info = plain.coco.imgs[plain.ids[k]]
        seen.add(info["file_name"])
        assert image.size == (info["width"], info["height"])
        assert len(t2.get("boxes", [])) == len(t2.get("masks", [])) == len(target)
        if target:
            assert tuple(t2["boxes"].canvas_size) == (info["height"], info["width"])
            assert (t2["boxes"][:, 2:] <= t2["boxes"].new_tensor([info["width"], info["height"]])).all()
    assert DICOM_ID + ".png" in seen and "00000003_000.png" in seen


def test_coco_images_none_names_paths_under_the_recorded_root(home, tmp_path):
    from torchvision.datasets import CocoDetection

    with pytest.raises(ValueError, match="DICOM"):  # a DICOM file's name may carry PHI
        ex.export(home, RUN, "coco", tmp_path / "n", images="none")
    nih = make_home(tmp_path / "nih", [i for i in IMAGES if i[0] != DICOM_ID], [b for b in BOXES if b[0] != DICOM_ID])
    out = ex.export(nih, RUN, "coco", tmp_path / "n", images="none")
    assert not (out / "images").exists()
    root = Path(json.loads((out / "manifest.json").read_text())["images"]["root"])
    for split in ("train", "test"):
        ds = CocoDetection(str(root), str(out / "annotations" / f"instances_{split}.json"))
        for k in range(len(ds)):
            assert ds[k][0].size == (1024, 1024)
        assert {im["file_name"] for im in ds.coco.imgs.values()} == {  # the path in the NIH dataset
            f"images_001/images/{i}" for i, s in SPLIT.items() if s == split and i != DICOM_ID}


def test_coco_against_shifted_truth_scores_below_one(home, tmp_path):
    """The detections list is a real loadRes input: moved boxes lose AP."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = ex.export(home, RUN, "coco", tmp_path / "coco")
    gt = json.loads((out / "annotations" / "instances_train.json").read_text())
    for a in gt["annotations"]:
        a["bbox"][0] += a["bbox"][2] * 0.6  # IoU 0.25 with the original
    (tmp_path / "shifted.json").write_text(json.dumps(gt))
    coco = quiet(COCO, str(tmp_path / "shifted.json"))
    ev = COCOeval(coco, quiet(coco.loadRes, str(out / "annotations" / "detections_train.json")), "bbox")
    for step in (ev.evaluate, ev.accumulate, ev.summarize):
        quiet(step)
    assert ev.stats[1] == pytest.approx(0.0)  # AP@.5


def read_yolo(out: Path, split: str) -> dict[str, list[list[float]]]:
    return {p.stem: [[float(v) for v in line.split()] for line in p.read_text().splitlines()]
            for p in sorted((out / "labels" / split).glob("*.txt"))}


def img2label(path: Path) -> Path:
    """Ultralytics' img2label_paths: the last /images/ becomes /labels/, the suffix .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(path).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def test_yolo_has_the_ultralytics_layout(home, tmp_path):
    out = ex.export(home, RUN, "yolo", tmp_path / "yolo", ranks=None)
    text = (out / "data.yaml").read_text()
    data = yaml.safe_load(text)
    assert "path" not in data and data["nc"] == len(FINDINGS) and str(tmp_path) not in text
    assert [data["names"][i] for i in range(data["nc"])] == list(FINDINGS)
    # no train patient is held out under the model's (default) config: val is train, never the evaluation split
    assert (data["train"], data["val"], data["test"]) == ("images/train", "images/train", "images/test")
    assert "val is the train split, so its metrics are not" in text
    for split in ("train", "test"):
        images = sorted((out / data[split]).iterdir())
        assert {p.name for p in images} == {(i + ".png" if i == DICOM_ID else i) for i, s in SPLIT.items() if s == split}
        for image in images:  # every image has its label file where Ultralytics looks for it
            assert img2label(image).is_file()
        assert len(list((out / "labels" / split).iterdir())) == len(images)
    labels = {**read_yolo(out, "train"), **read_yolo(out, "test")}
    assert labels["00000003_000"] == []  # the negative: an empty label file
    rows = [r for rs in labels.values() for r in rs]
    assert len(rows) == len(BOXES) - 1  # the box wholly outside its frame is dropped ...
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["dropped_outside_frame"] == 1  # ... and counted
    assert manifest["counts"]["boxes"] == sum(manifest["counts"]["per_finding"].values()) == len(rows)
    for cls, *xywh in rows:
        assert cls == int(cls) and 0 <= cls < data["nc"]
        assert all(0.0 <= v <= 1.0 for v in xywh)
    mass = [r for r in labels["00000002_001"] if r[0] == INDEX["Mass"]][0]
    assert mass[1:] == pytest.approx([1002 / 1024, 1007 / 1024, 44 / 1024, 34 / 1024], abs=1e-6)
    cardio = [r for r in labels[DICOM_ID] if r[0] == INDEX["Cardiomegaly"]]
    assert cardio[0][1:] == pytest.approx([1020 / 2000, 1450 / 2500, 640 / 2000, 500 / 2500], abs=1e-6)
    with pytest.raises(ValueError, match="needs its images"):
        ex.export(home, RUN, "yolo", tmp_path / "none", images="none")


def test_nih_csv_has_nih_layout_and_reingests(home, tmp_path):
    from pipeline.ingest.nih import ingest_nih

    out = ex.export(home, RUN, "nih-csv", tmp_path / "nih", ranks=None)
    csv = out / "BBox_List_2017.csv"
    lines = csv.read_text().splitlines()
    import gzip
    xrv = importlib.util.find_spec("torchxrayvision")  # its data file only: importing it loads torch
    real = Path(xrv.submodule_search_locations[0]) / "data" / "BBox_List_2017.csv.gz"
    with gzip.open(real, "rt") as f:
        assert lines[0] == f.readline().rstrip("\n")
    assert "Infiltrate" in csv.read_text() and "Infiltration" not in csv.read_text()
    scores = (out / "BBox_scores.csv").read_text().splitlines()
    assert len(scores) == len(lines) and all(s.startswith(l + ",") for s, l in zip(scores[1:], lines[1:]))

    fresh = Home(tmp_path / "fresh")
    counts = ingest_nih(fresh, out, sizes=(32,), workers=1)
    assert counts["rejects"] == 0 and counts["images"] == len(IMAGES)
    con = connect(fresh, read_only=True)
    got = sorted(con.execute("SELECT image_id, finding, x, y, w, h FROM gt_boxes").fetchall())
    images = dict((r[0], r[1:]) for r in con.execute("SELECT image_id, width, height, split FROM images").fetchall())
    labels = sorted(con.execute("SELECT image_id, finding FROM labels").fetchall())
    con.close()
    name = {DICOM_ID: DICOM_ID + ".png"}  # a DICOM is exported decoded, as <id>.png
    want = sorted((name.get(b[0], b[0]), b[1], *b[3:7]) for b in exported(None))
    assert [g[:2] for g in got] == [w[:2] for w in want]
    # Boxes are stored as float32; the CSV holds the shortest decimal of each, so it reads back exactly.
    np.testing.assert_array_equal(np.float32([g[2:] for g in got]), np.float32([w[2:] for w in want]))
    assert images == {name.get(i, i): (w, h, s) for i, w, h, s, _ in IMAGES}
    # the image's labels plus the findings of its boxes (a box of an unlabeled finding would be rejected)
    assert ("00000001_000.png", "Infiltration") in labels and ("00000002_001.png", "Mass") in labels
    assert not [lab for lab in labels if lab[0] == "00000003_000.png"]


@pytest.mark.parametrize("kwargs", [dict(), dict(ranks=None), dict(ranks=(1, 2)), dict(min_score=0.5),
                                    dict(ranks=None, min_score=0.5), dict(findings=["Cardiomegaly", "Infiltrate"]),
                                    dict(ranks=None, findings=["Cardiomegaly"], min_score=0.6)])
def test_filters_change_counts(home, tmp_path, kwargs):
    out = ex.export(home, RUN, "nih-csv", tmp_path / "f", **kwargs)
    rows = (out / "BBox_List_2017.csv").read_text().splitlines()[1:]
    names = {"Infiltrate": "Infiltration"}
    if "findings" in kwargs:
        kwargs["findings"] = [names.get(f, f) for f in kwargs["findings"]]
    want = exported(**kwargs)
    assert sorted((r.split(",")[0], names.get(r.split(",")[1], r.split(",")[1])) for r in rows) == \
        sorted((b[0] + ".png" if b[0] == DICOM_ID else b[0], b[1]) for b in want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["boxes"] == len(want)
    assert sum(manifest["counts"]["per_finding"].values()) == len(want)


def test_filters_keep_the_image_set(home, tmp_path):
    out = ex.export(home, RUN, "coco", tmp_path / "c", findings=["Hernia"])
    cocos = [json.loads(p.read_text()) for p in (out / "annotations").glob("instances_*.json")]
    assert sum(len(c["images"]) for c in cocos) == len(IMAGES) and all(c["annotations"] == [] for c in cocos)


def test_manifest_traces_run_model_and_files(home, tmp_path):
    out = ex.export(home, RUN, "yolo", tmp_path / "m", min_score=0.3, findings=["Mass"])
    m = json.loads((out / "manifest.json").read_text())
    assert (m["run_id"], m["model_id"], m["format"]) == (RUN, MODEL, "yolo")
    assert m["run"]["params"] == {"T": 3, "shard_size": 2000} and m["run"]["code_version"] == "v0.1-3-gdeadbee"
    assert m["model"]["config"] == {"lr": 0.01, "input_size": 256} and m["model"]["arch"] == "resnet18"
    assert m["filters"] == {"min_score": 0.3, "ranks": [1], "findings": ["Mass"], "trust_floor": 0.5}
    assert m["trust"]["applied"] is False and "no tuning set" in m["trust"]["reason"]   # no truth, no review
    assert m["code_version"] and m["created_at"].endswith("+00:00")
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    images = {f for f in files if f.startswith("images/")}
    assert len(images) == len(IMAGES)  # images are not hashed: the warehouse's source_sha256 names them
    assert set(m["files"]) == files - images and {"data.yaml", "labels/test/00000002_001.txt"} <= set(m["files"])
    assert all(m["files"][f] == sha256_file(out / f) for f in files - images)


def test_export_replaces_an_existing_one_atomically(home, tmp_path):
    dest = tmp_path / "exports" / "run"
    ex.export(home, RUN, "yolo", dest, ranks=None)
    (dest / "stale.txt").write_text("from the old export")
    old_inode = os.stat(dest).st_ino
    assert ex.export(home, RUN, "coco", dest) == dest.resolve()
    assert sorted(p.name for p in dest.iterdir()) == ["annotations", "images", "manifest.json"]
    assert os.stat(dest).st_ino != old_inode  # a new folder took the name, not a rewrite in place
    assert [p.name for p in dest.parent.iterdir()] == ["run"]  # no temp or old folder left behind


def test_failed_export_leaves_the_old_one(home, tmp_path, monkeypatch):
    dest = tmp_path / "run"
    ex.export(home, RUN, "coco", dest)
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def crash(*_):
        raise RuntimeError("writer killed")
    monkeypatch.setattr(ex.FORMATS["yolo"], "write", crash)  # fault injection half-way through an export
    with pytest.raises(RuntimeError, match="writer killed"):
        ex.export(home, RUN, "yolo", dest)
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("fmt, spoil, match", [
    ("yolo", lambda out: (out / "labels" / "train" / "00000001_000.txt").write_text("14 0.5 0.5 0.1 0.1\n"),
     "bad YOLO line"),
    ("yolo", lambda out: (out / "labels" / "train" / "00000003_000.txt").unlink(), "00000003_000.txt"),
    ("coco", lambda out: (out / "images" / "test" / "00000002_001.png").unlink(), "00000002_001.png"),
    ("nih-csv", lambda out: (out / "Data_Entry_2017.csv").write_text(
        (out / "Data_Entry_2017.csv").read_text().replace("Atelectasis|Infiltration", "Atelectasis")),
     "would be rejected")])
def test_write_time_check_refuses_a_broken_export(home, tmp_path, monkeypatch, fmt, spoil, match):
    """Each export is reloaded by its format's reader before it is put in place: a broken one never lands."""
    write = ex.FORMATS[fmt].write

    def spoiled(out, *args):
        counts = write(out, *args)
        spoil(out)
        return counts
    monkeypatch.setattr(ex.FORMATS[fmt], "write", spoiled)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ex.export(home, RUN, fmt, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_swap_fallback_without_renameat2(tmp_path, monkeypatch):
    old, new = tmp_path / "x", tmp_path / ".x.new"
    old.mkdir(), new.mkdir()
    (old / "a").write_text("old"), (new / "b").write_text("new")
    monkeypatch.setattr(ex, "_exchange", lambda a, b: False)
    ex._swap_into_place(new, old)
    assert [p.name for p in old.iterdir()] == ["b"]
    assert (new / "x" / "a").read_text() == "old"  # the caller removes `new`


def test_refuses_to_replace_a_folder_that_is_not_an_export(home, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not an export"):
        ex.export(home, RUN, "coco", tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_no_phi_in_any_export(home, tmp_path):
    for fmt in ex.FORMATS:
        out = ex.export(home, RUN, fmt, tmp_path / fmt, ranks=None)
        for p in out.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert all(m.encode() not in data for m in (PHI, *DICOM_PHI)), p  # PNGs of DICOMs included
                if p.suffix == ".png":
                    continue
                text = data.decode()
                if p.name == "Data_Entry_2017.csv":  # NIH's header names the columns: they hold no PHI
                    rows = [r.split(",") for r in text.splitlines()[1:]]
                    assert all(r[3].startswith("p-") and r[4] == r[5] == "" for r in rows), rows
                    assert len({r[3] for r in rows}) == len(IMAGES)  # a keyed pseudonym per patient
                    continue
                assert '"age"' not in text and '"sex"' not in text and "patient" not in text.lower(), p


def test_errors_name_the_cause(home, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        ex.export(home, RUN, "voc", tmp_path / "x")
    with pytest.raises(ValueError, match="not in the runs table"):
        ex.export(home, "no-such-run", "coco", tmp_path / "x")
    con = connect(home)
    con.execute("INSERT OR REPLACE INTO runs VALUES ('ingest-1', 'ingest', '{}', NULL, NULL, now(), now(), 'completed')")
    con.close()
    with pytest.raises(ValueError, match="no mined boxes"):
        ex.export(home, "ingest-1", "coco", tmp_path / "x")
    from pipeline.base.vocab import UnknownFinding
    with pytest.raises(UnknownFinding):
        ex.export(home, RUN, "coco", tmp_path / "x", findings=["Tumour"])
    assert not (tmp_path / "x").exists()


def test_cli_runs_the_flow_and_leaves_an_artifact(tmp_path, monkeypatch, capsys):
    """`harvest export` end to end on a temporary Prefect server (flows/export.py)."""
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.cli import build_parser, main
    home = make_home(tmp_path / "home")
    help_text = build_parser()._subparsers._group_actions[0].choices["export"].format_help()
    assert "--min-score" in help_text and "nih-csv" in help_text

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL
        monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())   # as a user's server: no loopback one
        rc = main(["--home", str(home.root), "export", "--run", RUN, "--format", "yolo", "--ranks", "all",
                   "--min-score", "0.5", "--findings", "Cardiomegaly", "Mass"])
        assert rc == 0
        assert main(["--home", str(home.root), "export", "--run", "no-such-run", "--format", "coco"]) == 1
        err = capsys.readouterr().err   # refused before the flow starts (flows/_verbs.py require_run)
        assert "no run 'no-such-run'" in err and "harvest status" in err
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["export-summary"])))
    out = home.exports / RUN / "yolo"
    manifest = json.loads((out / "manifest.json").read_text())
    want = exported(ranks=None, min_score=0.5, findings=["Cardiomegaly", "Mass"])
    assert manifest["counts"]["boxes"] == len(want) == 3
    assert manifest["filters"] == {"min_score": 0.5, "ranks": None, "findings": ["Cardiomegaly", "Mass"],
                                   "trust_floor": 0.5}
    assert len(arts) == 1 and str(out) in arts[0].data and "| Cardiomegaly | 2 |" in arts[0].data
    con = connect(home, read_only=True)
    runs = con.execute("SELECT status, params FROM runs WHERE flow = 'export' ORDER BY started_at").fetchall()
    con.close()
    assert [(s, json.loads(p)["run_id"]) for s, p in runs] == [("completed", RUN)]


def test_a_dicom_source_is_hashed_once_per_process_and_again_once_rewritten(tmp_path):
    """`harvest export` checks its sources, then its flow finds them again: the second pass reads no DICOM file
    (a cached hash made wrong on purpose is believed), and a file rewritten since is read anew."""
    home = make_home(tmp_path / "home")
    dcm = tmp_path / "home-src" / "dicom" / "Doe^Jane.dcm"
    ex.preflight(home, RUN, "coco")
    st = dcm.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert common._SHA_BY_STAT[key] == sha256_file(dcm)
    common._SHA_BY_STAT[key] = "0" * 64
    with pytest.raises(FileNotFoundError, match=DICOM_ID):
        ex.preflight(home, RUN, "coco")
    dcm.write_bytes(dcm.read_bytes())   # the same bytes, a new version of the file
    assert ex.preflight(home, RUN, "coco")[3].sources[DICOM_ID] == dcm.resolve()


def test_the_format_names_config_checks_are_the_registered_formats():
    assert tuple(ex.FORMATS) == EXPORT_FORMATS
    assert all(ex.FORMATS[name].NAME == name for name in EXPORT_FORMATS)
