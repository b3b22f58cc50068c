"""CVAT's "COCO 1.0" dataset for review: COCO with empty `segmentation`, checked with the COCO reader
`harvest import-review` uses."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.base.vocab import FINDINGS
from pipeline.export import coco
from pipeline.export.common import ImageFiles, quiet

NAME = "cvat"


def write(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, dest: Path) -> dict:
    """CVAT's "COCO 1.0" dataset layout (`images/<split>/`, `annotations/instances_<split>.json`, a subset per
    split), with empty `segmentation`: CVAT imports a COCO annotation as a rectangle only then (a polygon stays a
    polygon). `cvat_labels.json`: the 14 findings for a project's Raw label editor."""
    counts = coco.write(out, images, boxes, files, dest, polygons=False)
    (out / "cvat_labels.json").write_text(json.dumps(
        [{"name": name, "type": "rectangle", "attributes": []} for name in FINDINGS], indent=1) + "\n")
    return counts


def verify(out: Path, files: ImageFiles, boxes: list[dict]) -> None:
    """pycocotools loads each subset; every annotation is a rectangle for CVAT (empty `segmentation`); images are
    where CVAT's layout puts them; and `harvest import-review`'s COCO reader gives back the exported boxes."""
    from pycocotools.coco import COCO

    ids, got = {b["image_id"] for b in boxes}, []
    for ann in sorted((out / "annotations").glob("instances_*.json")):
        split = ann.stem.removeprefix("instances_")
        dataset = quiet(COCO, str(ann)).dataset
        if any(a.get("segmentation") != [] for a in dataset["annotations"]):
            raise ValueError(f"{ann.name}: CVAT reads an annotation as a rectangle only with empty segmentation")
        missing = [i["file_name"] for i in dataset["images"] if not (out / "images" / split / i["file_name"]).is_file()]
        if files.mode != "none" and missing:
            raise ValueError(f"{ann.name}: images/{split}/{missing[0]} is not written")
        for item in coco.review_items(dataset):
            found = [n for n in item.names if n in ids]
            if item.problems or (item.boxes and not found):
                raise ValueError(f"{ann.name}: {item.where} does not read back: {item.problems[:1]}")
            got += [(found[0], b["finding"], *(float(np.float32(b[c])) for c in "xywh")) for b in item.boxes]
    want = [(b["image_id"], b["finding"], *(float(np.float32(b[c])) for c in "xywh")) for b in boxes]
    if sorted(got) != sorted(want):
        raise ValueError(f"CVAT export: the {len(want)} exported boxes do not read back ({len(got)} read)")
