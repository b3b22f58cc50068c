"""Exports checked by their real consumers: pycocotools, a YOLO label parser, NIH CSV re-ingestion."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline import export as ex
from pipeline.files import sha256_file
from pipeline.home import Home
from pipeline.vocab import FINDINGS, INDEX, normalize_finding
from warehouse.db import PARQUET_TABLES, connect, write_parquet_atomic

RUN, MODEL = "mine-20261126-a", "m-stage2-0001"
PHI = "PHI-PATIENT-7f3c91"  # a marker that must never leave the warehouse
# image_id, width, height: NIH names and a pseudonymous DICOM id, two frames.
IMAGES = [("00000001_000.png", 1024, 1024), ("00000002_001.png", 1024, 1024), ("d-5f2a9c.dcm", 2000, 2500)]
# image_id, finding, rank, x, y, w, h, score
BOXES = [
    ("00000001_000.png", "Atelectasis", 1, 225.08474, 547.0192, 86.77966, 79.18644, 0.91),
    ("00000001_000.png", "Atelectasis", 2, 600.5, 100.25, 50.0, 40.0, 0.35),
    ("00000001_000.png", "Infiltration", 1, 100.0, 200.0, 300.0, 250.0, 0.62),
    ("00000002_001.png", "Mass", 1, 980.0, 990.0, 120.0, 80.0, 0.77),          # crosses the right/bottom edge
    ("00000002_001.png", "Pleural_Thickening", 1, 10.0, 20.0, 30.0, 40.0, 0.12),
    ("d-5f2a9c.dcm", "Cardiomegaly", 1, 700.0, 1200.0, 640.0, 500.0, 0.88),
    ("d-5f2a9c.dcm", "Cardiomegaly", 2, 650.0, 1150.0, 700.0, 560.0, 0.55),
    ("d-5f2a9c.dcm", "Cardiomegaly", 3, 2100.0, 100.0, 50.0, 50.0, 0.20),     # wholly outside the frame
]


def make_home(root: Path) -> Home:
    """A warehouse with three images, one model, one mining run and its mined_boxes part."""
    home = Home(root).make()
    con = connect(home)
    for i, (image_id, w, h) in enumerate(IMAGES):
        con.execute("INSERT INTO images VALUES (?, ?, 0, 63, 'F', 'PA', ?, ?, 0.14, 0.14, 'test', ?, NULL, now())",
                    [image_id, f"{PHI}-{i}", w, h, "dicom" if image_id.endswith(".dcm") else "nih"])
    con.execute("INSERT INTO models VALUES (?, 'm-stage1-0001', 'stage2', 'resnet18', 'bilinear', ?, "
                "'checkpoints/m.pt', 'abc123', NULL, now())", [MODEL, json.dumps({"lr": 0.01, "input_size": 256})])
    con.execute("INSERT INTO runs VALUES (?, 'mine', ?, ?, 'v0.1-3-gdeadbee', now(), now(), 'completed')",
                [RUN, json.dumps({"T": 3, "shard_size": 2000}), MODEL])
    con.close()
    cols = list(zip(*BOXES))
    n = len(BOXES)
    table = pa.table({"run_id": [RUN] * n, "model_id": [MODEL] * n, "image_id": cols[0], "finding": cols[1],
                      "rank": cols[2], "x": cols[3], "y": cols[4], "w": cols[5], "h": cols[6], "score": cols[7],
                      "prob": [0.9] * n, "threshold": [0.5] * n}, schema=PARQUET_TABLES["mined_boxes"])
    write_parquet_atomic(table, home.data / "mined_boxes" / f"run_id={RUN}" / "part-00000.parquet")
    return home


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Home:
    return make_home(tmp_path_factory.mktemp("export") / "home")


def expected(ranks=(1,), min_score=None, findings=None) -> list[tuple]:
    return [b for b in BOXES if (ranks is None or b[2] in ranks) and (min_score is None or b[7] >= min_score)
            and (findings is None or b[1] in findings)]


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return fn(*args)


def test_coco_loads_and_evaluates_in_pycocotools(home, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = ex.export(home, RUN, "coco", tmp_path / "coco", ranks=None)
    gt = quiet(COCO, str(out / "annotations.json"))
    assert len(gt.getImgIds()) == len(IMAGES)
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == list(FINDINGS)
    assert len(gt.getAnnIds()) == len(BOXES)
    by_name = {im["file_name"]: im for im in gt.loadImgs(gt.getImgIds())}
    assert {(k, v["width"], v["height"]) for k, v in by_name.items()} == set(IMAGES)
    ann = gt.loadAnns(gt.getAnnIds(imgIds=[by_name["00000001_000.png"]["id"]], catIds=[INDEX["Atelectasis"] + 1]))
    top = min(ann, key=lambda a: a["rank"])
    assert top["bbox"] == pytest.approx([225.08474, 547.0192, 86.77966, 79.18644], rel=1e-6)
    assert top["score"] == pytest.approx(0.91) and top["iscrowd"] == 0
    assert top["area"] == pytest.approx(86.77966 * 79.18644, rel=1e-5)

    dets = quiet(gt.loadRes, str(out / "detections.json"))
    ev = COCOeval(gt, dets, "bbox")
    quiet(ev.evaluate)
    quiet(ev.accumulate)
    quiet(ev.summarize)
    assert ev.stats[0] == pytest.approx(1.0)  # the boxes scored against themselves: AP@[.5:.95] = 1


def test_coco_against_shifted_truth_scores_below_one(home, tmp_path):
    """The detections list is a real loadRes input: moved boxes lose AP."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = ex.export(home, RUN, "coco", tmp_path / "coco")
    gt = json.loads((out / "annotations.json").read_text())
    for a in gt["annotations"]:
        a["bbox"][0] += a["bbox"][2] * 0.6  # IoU 0.25 with the original
    (tmp_path / "shifted.json").write_text(json.dumps(gt))
    coco = quiet(COCO, str(tmp_path / "shifted.json"))
    ev = COCOeval(coco, quiet(coco.loadRes, str(out / "detections.json")), "bbox")
    for step in (ev.evaluate, ev.accumulate, ev.summarize):
        quiet(step)
    assert ev.stats[1] == pytest.approx(0.0)  # AP@.5


def read_yolo(out: Path) -> dict[str, list[list[float]]]:
    return {p.stem: [[float(v) for v in line.split()] for line in p.read_text().splitlines()]
            for p in sorted((out / "labels").glob("*.txt"))}


def test_yolo_labels_normalised_clipped_and_named(home, tmp_path):
    out = ex.export(home, RUN, "yolo", tmp_path / "yolo", ranks=None)
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["nc"] == len(FINDINGS) and [data["names"][i] for i in range(data["nc"])] == list(FINDINGS)
    labels = read_yolo(out)
    assert set(labels) == {Path(i).stem for i, _, _ in IMAGES}  # every image, boxed or not
    rows = [r for rs in labels.values() for r in rs]
    assert len(rows) == len(BOXES) - 1  # the box wholly outside its frame is dropped ...
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["dropped_outside_frame"] == 1  # ... and counted
    assert manifest["counts"]["boxes"] == sum(manifest["counts"]["per_finding"].values()) == len(rows)
    for cls, *xywh in rows:
        assert cls == int(cls) and 0 <= cls < data["nc"]
        assert all(0.0 <= v <= 1.0 for v in xywh)
    mass = [r for r in labels["00000002_001"] if r[0] == INDEX["Mass"]][0]
    # x 980..1100 clipped to 980..1024, y 990..1070 clipped to 990..1024
    assert mass[1:] == pytest.approx([1002 / 1024, 1007 / 1024, 44 / 1024, 34 / 1024], abs=1e-6)
    cardio = [r for r in labels["d-5f2a9c"] if r[0] == INDEX["Cardiomegaly"]]
    assert cardio[0][1:] == pytest.approx([1020 / 2000, 1450 / 2500, 640 / 2000, 500 / 2500], abs=1e-6)


def test_nih_csv_has_nih_layout_and_reingests(home, tmp_path):
    out = ex.export(home, RUN, "nih-csv", tmp_path / "nih", ranks=None)
    csv = out / "BBox_List_2017.csv"
    lines = csv.read_text().splitlines()
    import gzip
    import importlib.util
    xrv = importlib.util.find_spec("torchxrayvision")  # its data file only: importing it loads torch
    real = Path(xrv.submodule_search_locations[0]) / "data" / "BBox_List_2017.csv.gz"
    with gzip.open(real, "rt") as f:
        assert lines[0] == f.readline().rstrip("\n")
    assert "Infiltrate" in csv.read_text() and "Infiltration" not in csv.read_text()

    nih = pytest.importorskip("pipeline.ingest.nih", reason="the lead's NIH reader is not in yet")
    df = nih.read_bbox_csv(csv)
    finding = df["finding"] if "finding" in df else df["finding_raw"].map(normalize_finding)  # as ingestion does
    got = sorted(zip(df["image_id"], finding, df["x"], df["y"], df["w"], df["h"]))
    want = sorted((b[0], b[1], *b[3:7]) for b in BOXES)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    # Boxes are stored as float32; the CSV holds the shortest decimal of each, so it reads back exactly.
    np.testing.assert_array_equal(np.float32([g[2:] for g in got]), np.float32([w[2:] for w in want]))


@pytest.mark.parametrize("kwargs", [dict(), dict(ranks=None), dict(ranks=(1, 2)), dict(min_score=0.5),
                                    dict(ranks=None, min_score=0.5), dict(findings=["Cardiomegaly", "Infiltrate"]),
                                    dict(ranks=None, findings=["Cardiomegaly"], min_score=0.6)])
def test_filters_change_counts(home, tmp_path, kwargs):
    out = ex.export(home, RUN, "nih-csv", tmp_path / "f", **kwargs)
    rows = (out / "BBox_List_2017.csv").read_text().splitlines()[1:]
    names = {"Infiltrate": "Infiltration"}
    if "findings" in kwargs:
        kwargs["findings"] = [names.get(f, f) for f in kwargs["findings"]]
    want = expected(**kwargs)
    assert sorted((r.split(",")[0], names.get(r.split(",")[1], r.split(",")[1])) for r in rows) == \
        sorted((b[0], b[1]) for b in want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["boxes"] == len(want)
    assert sum(manifest["counts"]["per_finding"].values()) == len(want)


def test_filters_keep_the_image_set(home, tmp_path):
    out = ex.export(home, RUN, "coco", tmp_path / "c", findings=["Hernia"])
    coco = json.loads((out / "annotations.json").read_text())
    assert len(coco["images"]) == len(IMAGES) and coco["annotations"] == []


def test_manifest_traces_run_model_and_files(home, tmp_path):
    out = ex.export(home, RUN, "yolo", tmp_path / "m", min_score=0.3, findings=["Mass"])
    m = json.loads((out / "manifest.json").read_text())
    assert (m["run_id"], m["model_id"], m["format"]) == (RUN, MODEL, "yolo")
    assert m["run"]["params"] == {"T": 3, "shard_size": 2000} and m["run"]["code_version"] == "v0.1-3-gdeadbee"
    assert m["model"]["config"] == {"lr": 0.01, "input_size": 256} and m["model"]["arch"] == "resnet18"
    assert m["filters"] == {"min_score": 0.3, "ranks": [1], "findings": ["Mass"]}
    assert m["code_version"] and m["created_at"].endswith("+00:00")
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == files
    assert all(m["files"][f] == sha256_file(out / f) for f in files)


def test_export_replaces_an_existing_one_atomically(home, tmp_path):
    dest = tmp_path / "exports" / "run"
    ex.export(home, RUN, "yolo", dest, ranks=None)
    (dest / "stale.txt").write_text("from the old export")
    old_inode = os.stat(dest).st_ino
    assert ex.export(home, RUN, "coco", dest) == dest.resolve()
    assert sorted(p.name for p in dest.iterdir()) == ["annotations.json", "detections.json", "manifest.json"]
    assert os.stat(dest).st_ino != old_inode  # a new folder took the name, not a rewrite in place
    assert [p.name for p in dest.parent.iterdir()] == ["run"]  # no temp or old folder left behind


def test_failed_export_leaves_the_old_one(home, tmp_path, monkeypatch):
    dest = tmp_path / "run"
    ex.export(home, RUN, "coco", dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def crash(*_):
        raise RuntimeError("writer killed")
    monkeypatch.setitem(ex._WRITERS, "yolo", crash)  # fault injection half-way through an export
    with pytest.raises(RuntimeError, match="writer killed"):
        ex.export(home, RUN, "yolo", dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


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
                text = p.read_text()
                assert PHI not in text, p
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
    from pipeline.vocab import UnknownFinding
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
        rc = main(["--home", str(home.root), "export", "--run", RUN, "--format", "yolo", "--ranks", "all",
                   "--min-score", "0.5", "--findings", "Cardiomegaly", "Mass"])
        assert rc == 0
        assert main(["--home", str(home.root), "export", "--run", "no-such-run", "--format", "coco"]) == 1
        assert "not in the runs table" in capsys.readouterr().err
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["export-summary"])))
    out = home.exports / RUN / "yolo"
    manifest = json.loads((out / "manifest.json").read_text())
    want = expected(ranks=None, min_score=0.5, findings=["Cardiomegaly", "Mass"])
    assert manifest["counts"]["boxes"] == len(want) == 3
    assert manifest["filters"] == {"min_score": 0.5, "ranks": None, "findings": ["Cardiomegaly", "Mass"]}
    assert len(arts) == 1 and str(out) in arts[0].data and "| Cardiomegaly | 2 |" in arts[0].data
    con = connect(home, read_only=True)
    runs = con.execute("SELECT status, params FROM runs WHERE flow = 'export' ORDER BY started_at").fetchall()
    con.close()
    assert [(s, json.loads(p)["run_id"]) for s, p in runs] == [("completed", RUN), ("failed", "no-such-run")]
