"""CVAT's own "CVAT for images 1.1" XML (docs.cvat.ai, dataset_management/formats/format-xml): per split, the layout
of a CVAT task export, the writer, its write-time check, and the reader `harvest import-review` uses for CVAT's
exports in that format.

A file is `<annotations>` holding `<version>1.1</version>`, `<meta><task>` (name, size, mode `annotation`, the labels
with their attributes) and one `<image id name width height>` per image, ids 0.. in the lexical order of the names,
as CVAT numbers a task's frames. A box is `<box label xtl ytl xbr ybr occluded source z_order>` in pixels of the
image, with `<attribute name="score">`.
"""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pipeline.base.vocab import FINDINGS
from pipeline.export.common import ImageFiles, MalformedFile, ReviewItem, by_split, counts, name_candidates, positive

NAME = "cvat"
XML = "annotations.xml"
LABELS = "cvat_labels.json"
SCORE = "score"
CORNERS = ("xtl", "ytl", "xbr", "ybr")


def write(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, _dest: Path, *, run_id: str) -> dict:
    """Per split, what CVAT's task export holds: `<split>/annotations.xml` and `<split>/images/` (with --images none,
    names are paths under the image root); `cvat_labels.json`: the 14 findings for a project's Raw label editor."""
    per_image: dict[str, list[dict]] = {}
    for b in boxes:
        per_image.setdefault(b["image_id"], []).append(b)
    for split, ims in by_split(images).items():
        names = {im["image_id"]: files.place(im, out, f"{split}/images") for im in ims}
        root = ET.Element("annotations")
        ET.SubElement(root, "version").text = "1.1"
        task = ET.SubElement(ET.SubElement(root, "meta"), "task")
        _texts(task, (("name", f"{run_id} {split}"), ("size", str(len(ims))), ("mode", "annotation"),
                      ("overlap", "0"), ("flipped", "False")))
        labels = ET.SubElement(task, "labels")
        for finding in FINDINGS:
            label = ET.SubElement(labels, "label")
            _texts(label, (("name", finding), ("type", "rectangle")))
            _texts(ET.SubElement(ET.SubElement(label, "attributes"), "attribute"), (
                ("name", SCORE), ("mutable", "False"), ("input_type", "text"), ("default_value", ""), ("values", "")))
        for k, im in enumerate(sorted(ims, key=lambda im: names[im["image_id"]])):
            image = ET.SubElement(root, "image", id=str(k), name=names[im["image_id"]], width=str(im["width"]),
                                  height=str(im["height"]))
            for b in per_image.get(im["image_id"], []):
                x, y, w, h = (float(b[c]) for c in "xywh")   # float32 values: x + w is exact in float64
                box = ET.SubElement(image, "box", label=b["finding"], source="auto", occluded="0", z_order="0",
                                    **dict(zip(CORNERS, map(repr, (x, y, x + w, y + h)))))
                ET.SubElement(box, "attribute", name=SCORE).text = repr(float(np.float32(b["score"])))
        ET.indent(root)
        ET.ElementTree(root).write(out / split / XML, encoding="utf-8", xml_declaration=True)
    (out / LABELS).write_text(json.dumps(
        [{"name": name, "type": "rectangle", "attributes": []} for name in FINDINGS], indent=1) + "\n")
    return counts(images, boxes)


def _texts(parent: ET.Element, pairs) -> None:
    for tag, text in pairs:
        ET.SubElement(parent, tag).text = text


def verify(out: Path, files: ImageFiles, boxes: list[dict]) -> None:
    """Each split's file against the published structure (`check_structure`), its images where CVAT's layout puts
    them, and `import-review`'s reader giving back the exported boxes exactly."""
    ids, got = {b["image_id"] for b in boxes}, []
    for path in sorted(out.glob(f"*/{XML}")):
        root = ET.parse(path).getroot()
        check_structure(root, f"{path.parent.name}/{XML}")
        missing = [im.get("name") for im in root.iter("image")
                   if files.mode != "none" and not (path.parent / "images" / im.get("name")).is_file()]
        if missing:
            raise ValueError(f"{path.parent.name}/images/{missing[0]} is not written")
        for item in review_items(root):
            found = [n for n in item.names if n in ids]
            if item.problems or (item.boxes and not found):
                raise ValueError(f"{path.parent.name}/{XML}: {item.where} does not read back: {item.problems[:1]}")
            got += [(found[0], b["finding"], *(float(np.float32(b[c])) for c in "xywh")) for b in item.boxes]
    want = [(b["image_id"], b["finding"], *(float(np.float32(b[c])) for c in "xywh")) for b in boxes]
    if sorted(got) != sorted(want):
        raise ValueError(f"CVAT export: the {len(want)} exported boxes do not read back ({len(got)} read)")


def check_structure(root: ET.Element, where: str) -> None:
    """CVAT for images 1.1 as published: `annotations` > `version` 1.1, `meta` > `task` with `name`, `size` (the image
    count), `mode` annotation and `labels` > `label` (`name`, `attributes` > `attribute` with `name`, `input_type`);
    `image` elements with ids 0..n-1 in the lexical order of their names and positive `width`, `height`; `box`
    elements with a declared `label`, `occluded` 0 or 1, a `source`, `xtl < xbr`, `ytl < ybr` inside the image, and
    `attribute` children that their label declares."""
    def fail(detail: str):
        raise ValueError(f"{where}: not CVAT for images 1.1: {detail}")
    task = root.find("meta/task")
    if root.tag != "annotations" or root.findtext("version") != "1.1" or task is None:
        fail("needs <annotations> with <version>1.1</version> and <meta><task>")
    declared = {lab.findtext("name"): {a.findtext("name") for a in lab.iterfind("attributes/attribute")
                                       if a.findtext("input_type")} for lab in task.iterfind("labels/label")}
    images = root.findall("image")
    if task.findtext("mode") != "annotation" or task.findtext("size") != str(len(images)) or not declared:
        fail("<task> needs mode annotation, size = the image count, and labels")
    names = [im.get("name") for im in images]
    if [im.get("id") for im in images] != [str(k) for k in range(len(images))] or names != sorted(names):
        fail("image ids must be 0..n-1 in the lexical order of the names")
    for im in images:
        W, H = _number(im.get("width")), _number(im.get("height"))
        if not (im.get("name") and positive(W, H)):
            fail(f"image {im.get('id')} needs a name and a positive width and height")
        for box in im.iterfind("box"):
            xtl, ytl, xbr, ybr = (_number(box.get(c)) for c in CORNERS)
            if not (box.get("label") in declared and box.get("occluded") in ("0", "1") and box.get("source")
                    and 0 <= xtl < xbr <= W and 0 <= ytl < ybr <= H
                    and {a.get("name") for a in box.iterfind("attribute")} <= declared[box.get("label")]):
                fail(f"a box of image {im.get('name')} breaks the box element's rules: {box.attrib}")


def _number(text) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


# ------------------------------------------------------------------------------------------ reading

def review_items(roots) -> list[ReviewItem]:
    """Every image of a CVAT for images file (or a list of them) with its boxes in pixels of the image's frame.
    Tags (image-level labels) are not boxes and are passed over; another shape is a reject, as is a rotated box."""
    items: list[ReviewItem] = []
    for root in roots if isinstance(roots, list) else [roots]:
        if not isinstance(root, ET.Element) or root.tag != "annotations":
            raise MalformedFile("a CVAT XML file has an <annotations> root")
        if root.find("image") is None and root.find("track") is not None:
            raise MalformedFile("a CVAT for video file (tracks): export the task as CVAT for images 1.1")
        for im in root.iterfind("image"):
            W, H = _number(im.get("width")), _number(im.get("height"))
            if not (im.get("name") and positive(W, H)):
                item = ReviewItem(len(items), f"image #{im.get('id')}", [])
                item.bad("malformed", "a CVAT image needs a name and a positive width and height")
            else:
                item = ReviewItem(len(items), f"image {im.get('id')} ({im.get('name')})",
                                  name_candidates(im.get("name")), scale=(W, H), frame=(W, H))
                for k, shape in enumerate(im):
                    _read_shape(item, shape, f"{item.where}, {shape.tag} #{k}")
            items.append(item)
    return items


def _read_shape(item: ReviewItem, shape: ET.Element, where: str) -> None:
    if shape.tag == "tag":
        return
    if shape.tag != "box":
        item.bad("unsupported_shape", f"<{shape.tag}>: only boxes are read", where)
        return
    xtl, ytl, xbr, ybr = (_number(shape.get(c)) for c in CORNERS)
    rotation = _number(shape.get("rotation", "0"))
    if not all(map(math.isfinite, (xtl, ytl, xbr, ybr, rotation))) or not shape.get("label"):
        item.bad("malformed", f"a box needs a label and numbers xtl, ytl, xbr, ybr: {shape.attrib}", where)
    elif rotation % 360:
        item.bad("rotated_box", f"the box is rotated by {rotation:g} degrees; only axis-aligned boxes are stored",
                 where)
    else:
        item.boxes.append({"finding": shape.get("label"), "x": xtl, "y": ytl, "w": xbr - xtl, "h": ybr - ytl,
                           "where": where})
