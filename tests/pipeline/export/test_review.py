"""The review loop on a real warehouse: Label Studio and CVAT exports of a mining run, edited as a reviewer would,
imported back as `gt_boxes` (source 'review') with `reviews`, rejects for bad input, @review evaluation rows."""
from __future__ import annotations

import copy
import json
import shutil
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest

from pipeline.base.home import Home
from pipeline.base.vocab import FINDINGS
from pipeline.evaluation.run import protocol_results
from pipeline.export import write as ex
from pipeline.export import labelstudio
from pipeline.export.common import ImageFiles
from pipeline.export.labelstudio import URL_PREFIX, from_percent, image_path, to_percent
from pipeline.export.review import MalformedFile, import_review, reviewed
from tests.pipeline.export.test_export import BOXES, DICOM_ID, IMAGES, RUN, add_mining_run, exported, make_home
from warehouse.db import connect

FRAME = {i[0]: (i[1], i[2]) for i in IMAGES}
A, B, NEG = "00000001_000.png", "00000002_001.png", "00000003_000.png"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    home = make_home(root / "home")
    return home, ex.export(home, RUN, "labelstudio", root / "ls", ranks=None)


@pytest.fixture
def home(base, tmp_path):
    """A fresh copy of the home (imports write to it); the export is shared."""
    return Home(shutil.copytree(base[0].root, tmp_path / "home"))


def f32(*values) -> tuple:
    return tuple(float(np.float32(v)) for v in values)


def tasks(ls_dir) -> list[dict]:
    """The export's tasks as Label Studio's JSON export lists them: with task ids, no annotation yet."""
    out = [t for split in ("train", "test") for t in json.loads((ls_dir / f"tasks_{split}.json").read_text())]
    for k, t in enumerate(out, start=1):
        t["id"], t["annotations"] = k, []
    return out


def by_image(ts) -> dict:
    return {t["data"]["image_id"]: t for t in ts}


def annotate(t: dict, results: list, when: str, cancelled: bool = False) -> None:
    t["annotations"].append({"id": 100 + len(t["annotations"]), "result": copy.deepcopy(results),
                             "was_cancelled": cancelled, "created_at": when, "updated_at": when, "completed_by": 1})


def box(image_id: str, finding: str, x, y, w, h, rid: str = "new1") -> dict:
    W, H = FRAME[image_id]
    return {"id": rid, "type": "rectanglelabels", "from_name": "finding", "to_name": "image", "original_width": W,
            "original_height": H, "image_rotation": 0,
            "value": {"x": to_percent(x, W), "y": to_percent(y, H), "width": to_percent(w, W),
                      "height": to_percent(h, H), "rotation": 0, "rectanglelabels": [finding]}}


def gt_rows(home) -> list[tuple]:
    con = connect(home, read_only=True)
    try:
        return sorted((i, f, *f32(x, y, w, h)) for i, f, x, y, w, h in con.execute(
            "SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE source = 'review'").fetchall())
    finally:
        con.close()


def review_rejects(home) -> list[tuple]:
    con = connect(home, read_only=True)
    try:
        return con.execute("SELECT reason, path, detail FROM rejects WHERE stage = 'review' ORDER BY path").fetchall()
    finally:
        con.close()


def reviewer_edits(ls_dir) -> tuple[list[dict], list[tuple], set]:
    """What a reviewer does: on A moves the top Atelectasis box, deletes the rank-2 one and adds a Nodule (after an
    older annotation, and before a newer one they skipped); marks B negative (deletes both its boxes); leaves the
    DICOM image with its predictions only and skips NEG. Returns the export, the boxes and reviewed ids it means."""
    ts = tasks(ls_dir)
    t = by_image(ts)
    pred = {i: t[i]["predictions"][0]["result"] for i in t}
    atel = sorted([r for r in pred[A] if r["value"]["rectanglelabels"] == ["Atelectasis"]], key=lambda r: -r["score"])
    infil = [r for r in pred[A] if r["value"]["rectanglelabels"] == ["Infiltration"]]
    moved = copy.deepcopy(atel[0])
    moved["value"].update(x=to_percent(230, 1024), y=to_percent(550, 1024), width=to_percent(80, 1024),
                          height=to_percent(80, 1024))
    annotate(t[A], pred[A], "2026-11-20T10:00:00Z")                                  # an older review
    annotate(t[A], [moved, *infil, box(A, "Nodule", 400, 400, 30.5, 29.25)], "2026-11-21T10:00:00Z")
    annotate(t[A], [], "2026-11-22T10:00:00Z", cancelled=True)                       # skipped later: ignored
    annotate(t[B], [], "2026-11-21T11:00:00Z")                                       # a reviewed negative
    annotate(t[NEG], pred[NEG], "2026-11-21T12:00:00Z", cancelled=True)              # skipped only
    want = sorted([(A, "Atelectasis", *f32(230, 550, 80, 80)), (A, "Infiltration", *f32(100, 200, 300, 250)),
                   (A, "Nodule", *f32(400, 400, 30.5, 29.25))])
    return ts, want, {A, B}


def test_labelstudio_export_has_tasks_predictions_and_the_labeling_config(base, tmp_path):
    home, out = base
    assert sorted(p.name for p in out.iterdir()) == ["images", "label_config.xml", "manifest.json",
                                                     "tasks_test.json", "tasks_train.json"]
    config = ET.fromstring((out / "label_config.xml").read_text())
    rect = config.find("RectangleLabels")
    assert [e.get("value") for e in rect] == list(FINDINGS) and rect.get("canRotate") == "false"
    assert (rect.get("name"), rect.get("toName"), config.find("Image").get("value")) == ("finding", "image", "$image")
    ts = by_image(tasks(out))
    assert set(ts) == {i[0] for i in IMAGES}
    for image_id, t in ts.items():
        local = image_path(t["data"]["image"])
        assert t["data"]["image"].startswith(URL_PREFIX) and (out / local).is_file()
        assert local.startswith(f"images/{t['data']['split']}/")
        (p,) = t["predictions"]
        assert p["model_version"] == RUN
        assert p["score"] == max((r["score"] for r in p["result"]), default=0.0)
        for r in p["result"]:
            W, H = FRAME[image_id]
            assert (r["type"], r["original_width"], r["original_height"]) == ("rectanglelabels", W, H)
            assert all(0 <= r["value"][k] <= 100 for k in ("x", "y", "width", "height"))
    assert ts[NEG]["predictions"][0]["result"] == []                        # a negative: an empty prediction
    assert image_path(ts[DICOM_ID]["data"]["image"]) == f"images/train/{DICOM_ID}.png"   # decoded, never linked
    got = sorted((i, r["value"]["rectanglelabels"][0],
                  *f32(*(from_percent(r["value"][k], s) for k, s in
                         zip(("x", "y", "width", "height"), (*FRAME[i], *FRAME[i])))))
                 for i, t in ts.items() for r in t["predictions"][0]["result"])
    assert got == sorted((b[0], b[1], *f32(*b[3:7])) for b in exported(None))   # exact pixels, back from percent
    again = by_image(tasks(ex.export(home, RUN, "labelstudio", tmp_path / "again", ranks=None)))
    assert [r["id"] for r in again[A]["predictions"][0]["result"]] == \
        [r["id"] for r in ts[A]["predictions"][0]["result"]]              # region ids are stable


def test_labelstudio_write_time_check_refuses_moved_predictions(base, tmp_path):
    home, out = base
    boxes = [dict(zip(("image_id", "finding", "rank", "x", "y", "w", "h", "score"), b)) for b in exported(None)]
    labelstudio.verify(out, ImageFiles("link", {}), boxes)
    boxes[0]["x"] += 0.5
    with pytest.raises(ValueError, match="do not give back"):
        labelstudio.verify(out, ImageFiles("link", {}), boxes)


def test_labelstudio_images_none_and_another_url_prefix(tmp_path):
    home = make_home(tmp_path / "nih", [i for i in IMAGES if i[0] != DICOM_ID], [b for b in BOXES if b[0] != DICOM_ID])
    out = ex.export(home, RUN, "labelstudio", tmp_path / "ls", images="none", url_prefix="http://pacs.example/img/")
    root = json.loads((out / "manifest.json").read_text())["images"]["root"]
    urls = [t["data"]["image"] for t in tasks(out)]
    assert not (out / "images").exists() and all(u.startswith("http://pacs.example/img/images_001/images/") for u in urls)
    assert all((tmp_path / root / u.removeprefix("http://pacs.example/img/")).is_file() for u in urls)


def test_a_reviewed_labelstudio_export_comes_back_as_the_edited_boxes(base, home, tmp_path):
    ts, want, ids = reviewer_edits(base[1])
    path = tmp_path / "project-1-at-2026-11-21.json"
    path.write_text(json.dumps(ts))
    out = import_review(home, path)
    assert (out["format"], out["images"], out["boxes"], out["negatives"], out["rejects"], out["run_id"]) == \
        ("labelstudio", 2, 3, 1, 0, RUN)
    assert gt_rows(home) == want
    con = connect(home)
    boxes, reviewed_ids = reviewed(con)
    rows = con.execute("SELECT image_id, file, file_sha256, format, run_id, n_boxes FROM reviews ORDER BY 1").fetchall()
    con.close()
    assert reviewed_ids == ids and list(boxes.columns) == ["image_id", "finding", "x", "y", "w", "h"]
    assert sorted((r.image_id, r.finding, *f32(r.x, r.y, r.w, r.h)) for r in boxes.itertuples()) == want
    assert rows == [(A, str(path), out["sha256"], "labelstudio", RUN, 3), (B, str(path), out["sha256"], "labelstudio",
                                                                           RUN, 0)]

    assert import_review(home, path)["boxes"] == 3 and gt_rows(home) == want     # the same file again: no duplicates
    t = by_image(ts)
    annotate(t[A], [box(A, "Mass", 10, 10, 20, 20)], "2026-11-25T10:00:00Z")     # a newer file changes A only
    newer = tmp_path / "project-1-at-2026-11-25.json"
    newer.write_text(json.dumps(ts))
    import_review(home, newer)
    assert gt_rows(home) == [(A, "Mass", *f32(10, 10, 20, 20))]
    con = connect(home, read_only=True)
    assert con.execute("SELECT count(*) FROM reviews").fetchone()[0] == 2
    assert con.execute("SELECT file FROM reviews WHERE image_id = ?", [A]).fetchone()[0] == str(newer)
    con.close()


def test_bad_input_is_rejected_and_the_rest_is_imported(base, home, tmp_path):
    ts, want, _ = reviewer_edits(base[1])
    t = by_image(ts)
    annotate(t[NEG], [box(NEG, "Effusion", 10, 10, 50, 50)], "2026-11-21T13:00:00Z")   # a good review of NEG
    import_review(home, _write(tmp_path / "first.json", ts))
    t[A]["annotations"][1]["result"].append(box(A, "Lung Opacity", 10, 10, 20, 20, "bad1"))   # unknown finding
    t[B]["annotations"][0]["result"].append(box(B, "Mass", 1000, 1000, 50, 50, "bad2"))       # leaves the frame
    rotated = box(NEG, "Effusion", 10, 10, 50, 50, "bad3")
    rotated["value"]["rotation"] = 15
    annotate(t[NEG], [rotated], "2026-11-26T10:00:00Z")
    stranger = copy.deepcopy(t[B])
    stranger["id"], stranger["data"] = 99, {"image": URL_PREFIX + "images/test/99999999_000.png"}   # unknown image
    broken = {"id": 98, "data": {"image_id": DICOM_ID}, "annotations": [{"result": [{"type": "rectanglelabels",
                                                                                     "value": {"x": "left"}}]}]}
    path = _write(tmp_path / "second.json", [*ts, stranger, broken])
    out = import_review(home, path)
    assert (out["images"], out["rejects"], out["rejected_images"]) == (0, 5, 5)
    assert gt_rows(home) == sorted(want + [(NEG, "Effusion", *f32(10, 10, 50, 50))])   # earlier reviews stay
    rejects = review_rejects(home)
    assert sorted(r[0] for r in rejects) == ["box_outside_frame", "malformed", "rotated_box", "unknown_finding",
                                             "unknown_image"]
    reasons = {r[0]: r for r in rejects}
    assert "Lung Opacity" in reasons["unknown_finding"][2] and "bad1" in reasons["unknown_finding"][1]
    assert f"{A} is not imported" in reasons["unknown_finding"][2]
    assert "99999999_000.png" in reasons["unknown_image"][2] and "15" in reasons["rotated_box"][2]
    import_review(home, path)
    assert len(review_rejects(home)) == 5                 # a re-import replaces the file's rejects


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_files_that_are_not_reviews(base, home, tmp_path):
    (tmp_path / "notes.txt").write_text("not json at all")
    with pytest.raises(ValueError, match="is neither JSON nor XML"):
        import_review(home, tmp_path / "notes.txt")
    with pytest.raises(MalformedFile, match="neither a Label Studio export"):
        import_review(home, _write(tmp_path / "odd.json", {"hello": "world"}))
    assert [r[0] for r in review_rejects(home)] == ["malformed_file"]
    ts = tasks(base[1])                                    # predictions only: nothing was reviewed
    assert import_review(home, _write(tmp_path / "fresh.json", ts))["images"] == 0 and gt_rows(home) == []


def test_an_image_reviewed_twice_in_a_file_or_in_another_frame(base, home, tmp_path):
    ts = tasks(base[1])
    t = by_image(ts)
    annotate(t[A], [box(A, "Mass", 10, 10, 20, 20)], "2026-11-21T10:00:00Z")
    again = copy.deepcopy(t[A])
    again["id"], again["annotations"][0]["result"] = 77, []
    squeezed = box(B, "Mass", 10, 10, 20, 20)
    squeezed["original_width"] = 512                     # a 512x1024 picture is not B's 1024x1024 one
    annotate(t[B], [squeezed], "2026-11-21T10:00:00Z")
    out = import_review(home, _write(tmp_path / "twice.json", [*ts, again]))
    assert (out["images"], out["rejects"]) == (1, 2) and gt_rows(home) == [(A, "Mass", *f32(10, 10, 20, 20))]
    reasons = {r[0]: r for r in review_rejects(home)}
    assert set(reasons) == {"duplicate_image", "frame_mismatch"} and "task 77" in reasons["duplicate_image"][1]
    assert "not imported" not in reasons["duplicate_image"][2] and "not imported" in reasons["frame_mismatch"][2]


def test_cvat_coco_1_0_export_comes_back(base, home, tmp_path):
    out = ex.export(base[0], RUN, "coco", tmp_path / "coco", ranks=None)
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    # CVAT's COCO 1.0 export of a task made of the train images: its own category ids (labels in its order),
    # rectangles with empty segmentation, a polygon, and attributes; the reviewer moved, deleted and added boxes.
    cats = [{"id": k, "name": name, "supercategory": ""} for k, name in enumerate(reversed(FINDINGS), start=1)]
    cat = {c["name"]: c["id"] for c in cats}
    images = [{"id": k, "file_name": im["file_name"], "width": im["width"], "height": im["height"], "license": 0}
              for k, im in enumerate(train["images"], start=1)]
    img = {im["file_name"]: im["id"] for im in images}
    attrs = {"occluded": False, "rotation": 0.0}
    anns = [{"id": 1, "image_id": img[A], "category_id": cat["Atelectasis"], "bbox": [230.0, 550.0, 80.0, 80.0],
             "segmentation": [], "area": 6400.0, "iscrowd": 0, "attributes": attrs},
            {"id": 2, "image_id": img[A], "category_id": cat["Nodule"], "bbox": [400.0, 400.0, 30.0, 30.0],
             "segmentation": [[400.0, 400.0, 430.0, 400.0, 415.0, 430.0]], "area": 450.0, "iscrowd": 0,
             "attributes": attrs},
            {"id": 3, "image_id": img[DICOM_ID + ".png"], "category_id": cat["Cardiomegaly"],
             "bbox": [700.0, 1200.0, 640.0, 500.0], "segmentation": [], "area": 1.0, "iscrowd": 0, "attributes": attrs}]
    cvat = {"licenses": [], "info": {}, "categories": cats, "images": images, "annotations": anns}
    zipped = tmp_path / "task_1_dataset_coco 1.0.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("annotations/instances_default.json", json.dumps(cvat))
    result = import_review(home, zipped)
    assert (result["format"], result["images"], result["negatives"], result["rejects"]) == ("coco", 3, 1, 0)
    assert gt_rows(home) == sorted([(A, "Atelectasis", *f32(230, 550, 80, 80)), (A, "Nodule", *f32(400, 400, 30, 30)),
                                    (DICOM_ID, "Cardiomegaly", *f32(700, 1200, 640, 500))])
    assert reviewed(connect(home, read_only=True))[1] == {A, DICOM_ID, NEG}   # every listed image was reviewed

    anns[0]["attributes"] = {"rotation": 30.0}
    anns[1]["category_id"] = 99
    result = import_review(home, _write(tmp_path / "instances_default.json", cvat))
    assert (result["images"], result["rejects"]) == (2, 2)
    assert sorted(r[0] for r in review_rejects(home)) == ["rotated_box", "unknown_finding"]


def test_the_run_is_what_label_studio_keeps_and_asked_for_when_ambiguous(base, home, tmp_path):
    """Label Studio's JSON export lists a task's predictions by id and keeps the one its annotator saw in
    `annotation.prediction`: its model_version names the run, on a home with two mining runs too."""
    add_mining_run(home, "mine-other", BOXES[:1], [A])
    ts, want, _ = reviewer_edits(base[1])
    for t in ts:
        for a in t["annotations"]:
            a["prediction"] = {"id": 7, "model_version": RUN, "result": t["predictions"][0]["result"]}
        t["predictions"] = [7]
    out = import_review(home, _write(tmp_path / "kept.json", ts))
    assert out["run_id"] == RUN and gt_rows(home) == want
    for t in ts:
        for a in t["annotations"]:
            del a["prediction"]
    bare = _write(tmp_path / "bare.json", ts)
    with pytest.raises(ValueError, match=r"names no mining run and this home has 2 \(mine-20261126-a, mine-other\): "
                                         r"pass --run RUN_ID"):
        import_review(home, bare)
    assert import_review(home, bare, run_id="mine-other")["run_id"] == "mine-other"
    ts[0]["annotations"][0]["prediction"] = {"model_version": "mine-elsewhere"}
    with pytest.raises(ValueError, match="name mine-elsewhere, not one mining run of this home: pass --run"):
        import_review(home, _write(tmp_path / "stranger.json", ts))


def test_evaluation_scores_the_reviewed_images_as_at_review(base, home, tmp_path):
    ts, _, _ = reviewer_edits(base[1])
    import_review(home, _write(tmp_path / "reviewed.json", ts))
    con = connect(home)
    try:
        results, gts = protocol_results(con, RUN)
    finally:
        con.close()
    review = next(r for r in results if r["protocol"].str.endswith("@review").all())
    assert set(review["protocol"]) == {"bounded/iou@review", "all/iou@review", "all/iobb@review"}
    assert set(gts["review"]["image_id"]) == {A}
    infiltration = review[(review["protocol"] == "all/iou@review") & (review["finding"] == "Infiltration")]
    assert (infiltration["acc"] == 1.0).all() and (infiltration["n_images"] == 1).all()   # the box kept as mined
    atel = review[(review["protocol"] == "all/iou@review") & (review["finding"] == "Atelectasis")]
    assert atel.set_index("t").loc[0.7, "acc"] == 1.0 and atel.set_index("t").loc[0.7, "afp"] == 1.0   # moved a bit
    assert (review[review["finding"] == "Mass"]["n_gt"] == 0).all()   # B is a reviewed negative: no Mass truth


def test_an_older_home_without_reviews_reads_as_no_reviews(tmp_path):
    home = make_home(tmp_path / "home")
    con = connect(home)
    con.execute("DROP TABLE reviews")
    con.close()
    con = connect(home, read_only=True)
    boxes, ids = reviewed(con)
    con.close()
    assert boxes.empty and ids == set()
    con = connect(home)           # a writable connection brings the table
    assert con.execute("SELECT count(*) FROM reviews").fetchone()[0] == 0
    con.close()
