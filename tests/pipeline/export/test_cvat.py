"""CVAT for images 1.1: the export against the published structure and read by Datumaro's CVAT reader (where installed,
Makefile TEST_READERS), and CVAT's export of the reviewed task back through `harvest import-review`."""
from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from pipeline.base.vocab import FINDINGS
from pipeline.export import cvat, write as ex
from pipeline.export.review import import_review, reviewed
from tests.pipeline.export.test_export import DICOM_ID, IMAGES, RUN, SPLIT, exported, make_home
from tests.pipeline.export.test_review import A, NEG, f32, gt_rows, review_rejects
from tests.pipeline.export.test_review import home  # noqa: F401 (the fixture: a fresh copy of this module's base home)
from warehouse.db import connect


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cvat")
    home = make_home(root / "home")
    return home, ex.export(home, RUN, "cvat", root / "cvat", ranks=None)


def name(image_id: str) -> str:
    return image_id + ".png" if image_id == DICOM_ID else image_id


def parse(out: Path, split: str) -> ET.Element:
    return ET.parse(out / split / cvat.XML).getroot()


def test_the_export_is_a_cvat_task_export_per_split(base):
    out = base[1]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "cvat_labels.json", "manifest.json", "test/annotations.xml", "test/images/00000002_001.png",
        "train/annotations.xml", "train/images/00000001_000.png", "train/images/00000003_000.png",
        f"train/images/{DICOM_ID}.png"]
    root = parse(out, "train")
    assert (root.findtext("version"), root.findtext("meta/task/name"), root.findtext("meta/task/size"),
            root.findtext("meta/task/mode")) == ("1.1", f"{RUN} train", "3", "annotation")
    labels = root.findall("meta/task/labels/label")
    assert [lab.findtext("name") for lab in labels] == list(FINDINGS)
    assert {(a.findtext("name"), a.findtext("input_type")) for lab in labels
            for a in lab.iterfind("attributes/attribute")} == {("score", "text")}
    assert [(im.get("id"), im.get("name"), im.get("width"), im.get("height")) for im in root.iter("image")] == [
        ("0", "00000001_000.png", "1024", "1024"), ("1", "00000003_000.png", "1024", "1024"),
        ("2", f"{DICOM_ID}.png", "2000", "2500")]
    got = []
    for split in ("train", "test"):
        for im in parse(out, split).iter("image"):
            for b in im.iterfind("box"):
                xtl, ytl, xbr, ybr = (float(b.get(c)) for c in cvat.CORNERS)
                assert (b.get("source"), b.get("occluded"), b.get("z_order")) == ("auto", "0", "0")
                got.append((im.get("name"), b.get("label"), *f32(xtl, ytl, xbr - xtl, ybr - ytl,
                                                                  float(b.findtext("attribute[@name='score']")))))
    want = [(name(b[0]), b[1], *f32(*b[3:8])) for b in exported(None)]   # clipped, the one outside dropped
    assert sorted(got) == sorted(want) and len(got) == 7
    assert [lab["name"] for lab in json.loads((out / cvat.LABELS).read_text())] == list(FINDINGS)


def _set(path: str, key: str, value: str):
    return lambda root: root.find(path).set(key, value)


@pytest.mark.parametrize("spoil, match", [
    (lambda root: setattr(root.find("version"), "text", "1.0"), "version"),
    (lambda root: setattr(root.find("meta/task/size"), "text", "4"), "size = the image count"),
    (_set("image", "id", "1"), "lexical order"),
    (_set("image", "width", "0"), "positive width"),
    (_set("image/box", "label", "Lung Opacity"), "box element"),
    (_set("image/box", "xbr", "1024.5"), "box element"),
    (_set("image/box", "xtl", "left"), "box element"),
    (_set("image/box", "occluded", "no"), "box element"),
    (lambda root: root.find("image/box/attribute").set("name", "rank"), "box element")])
def test_the_structure_check_refuses_what_cvat_would_not_read(base, spoil, match):
    root = copy.deepcopy(parse(base[1], "train"))
    cvat.check_structure(root, "train")
    spoil(root)
    with pytest.raises(ValueError, match=match):
        cvat.check_structure(root, "train")


def test_datumaro_reads_the_export(base):
    pytest.importorskip("datumaro", reason="datumaro is not installed (`make test` installs it)")
    from datumaro.components.annotation import AnnotationType
    from datumaro.components.dataset import Dataset

    frame = {name(i): (w, h) for i, w, h, *_ in IMAGES}
    for split in ("train", "test"):
        dataset = Dataset.import_from(str(base[1] / split), "cvat")
        labels = dataset.categories()[AnnotationType.label]
        got = []
        for item in dataset:
            file = Path(item.media.path)
            assert file.parent == base[1] / split / "images" and item.media.data.shape[:2] == frame[file.name][::-1]
            got += [(file.name, labels[a.label].name, *a.get_bbox(), float(a.attributes["score"]))
                    for a in item.annotations if a.type == AnnotationType.bbox]
        want = [(name(b[0]), b[1], *f32(*b[3:8])) for b in exported(None) if SPLIT[b[0]] == split]
        assert [g[:2] for g in sorted(got)] == [w[:2] for w in sorted(want)] and got
        for g, w in zip(sorted(got), sorted(want)):   # Datumaro rounds coordinates to 2 decimals, as CVAT writes them
            assert g[2:] == pytest.approx(w[2:], abs=0.006)


def reviewed_task(out: Path) -> ET.Element:
    """The train task as a reviewer leaves it: on A the top Atelectasis box moved (source manual), the rank-2 one
    deleted, a Nodule drawn and an image tag added; the DICOM image's boxes all deleted; NEG untouched."""
    root = copy.deepcopy(parse(out, "train"))
    image = {im.get("name"): im for im in root.iter("image")}
    atelectasis = [b for b in image[A].iterfind("box") if b.get("label") == "Atelectasis"]
    image[A].remove(atelectasis[1])
    atelectasis[0].attrib.update(xtl="230", ytl="550", xbr="310", ybr="630", source="manual")
    ET.SubElement(image[A], "box", label="Nodule", source="manual", occluded="0", xtl="400", ytl="400", xbr="430.5",
                  ybr="429.25", z_order="0")
    ET.SubElement(image[A], "tag", label="Nodule", source="manual")
    for b in image[DICOM_ID + ".png"].findall("box"):
        image[DICOM_ID + ".png"].remove(b)
    return root


def test_cvat_s_export_of_the_reviewed_task_comes_back(base, home, tmp_path):
    root = reviewed_task(base[1])
    zipped = tmp_path / "task_7_dataset_cvat for images 1.1.zip"     # CVAT's task export: the XML and the images
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr(cvat.XML, ET.tostring(root, encoding="utf-8", xml_declaration=True))
        for p in (base[1] / "train" / "images").iterdir():
            z.write(p, f"images/{p.name}")
    out = import_review(home, zipped)
    assert (out["format"], out["images"], out["boxes"], out["negatives"], out["rejects"], out["run_id"]) == \
        ("cvat", 3, 3, 2, 0, RUN)
    assert gt_rows(home) == sorted([(A, "Atelectasis", *f32(230, 550, 80, 80)), (A, "Infiltration",
                                    *f32(100, 200, 300, 250)), (A, "Nodule", *f32(400, 400, 30.5, 29.25))])
    assert reviewed(connect(home, read_only=True))[1] == {A, DICOM_ID, NEG}

    image = {im.get("name"): im for im in root.iter("image")}
    ET.SubElement(image[NEG], "polygon", label="Effusion", source="manual", occluded="0", points="1,1;9,1;5,9")
    image[A].find("box").set("rotation", "30")
    ET.SubElement(image[DICOM_ID + ".png"], "box", label="Lung Opacity", source="manual", occluded="0", xtl="1",
                  ytl="1", xbr="9", ybr="9")
    plain = tmp_path / "annotations.xml"
    ET.ElementTree(root).write(plain, encoding="utf-8", xml_declaration=True)
    again = import_review(home, plain)
    assert (again["images"], again["rejects"], again["rejected_images"]) == (0, 3, 3)
    assert sorted(r[0] for r in review_rejects(home)) == ["rotated_box", "unknown_finding", "unsupported_shape"]
    assert len(gt_rows(home)) == 3 and reviewed(connect(home, read_only=True))[1] == {A, DICOM_ID, NEG}   # as before
