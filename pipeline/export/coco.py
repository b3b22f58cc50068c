"""COCO instances: the writer, its write-time check (pycocotools reads it back, the images' frames are checked) and
the reader `harvest import-review` uses for COCO files (CVAT's COCO 1.0 export among them)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.base.vocab import FINDINGS, INDEX
from pipeline.export.common import (ImageFiles, MalformedFile, ReviewItem, by_split, counts, image_size,
                                    name_candidates, positive, quiet, short)

NAME = "coco"


def write(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, _dest: Path) -> dict:
    """Per split: `annotations/instances_<split>.json` (COCO instances: bbox, its polygon as `segmentation`,
    `area`, `iscrowd`) and `annotations/detections_<split>.json` (the `COCO.loadRes` list), images in
    `images/<split>/` (`file_name` relative to it; with --images none, relative to the image root)."""
    ids = {im["image_id"]: k for k, im in enumerate(sorted(images, key=lambda im: im["image_id"]), start=1)}
    per_image: dict[str, list[dict]] = {}
    for b in boxes:
        per_image.setdefault(b["image_id"], []).append(b)
    (out / "annotations").mkdir()
    k = 0
    for split, ims in by_split(images).items():
        annotations, detections, entries = [], [], []
        for im in ims:
            entries.append({"id": ids[im["image_id"]], "file_name": files.place(im, out, f"images/{split}"),
                            "width": int(im["width"]), "height": int(im["height"])})
            for b in per_image.get(im["image_id"], []):
                k += 1
                x, y, w, h = (short(b[c]) for c in "xywh")
                det = {"image_id": ids[b["image_id"]], "category_id": INDEX[b["finding"]] + 1, "bbox": [x, y, w, h],
                       "score": short(b["score"])}
                detections.append(det)
                annotations.append({"id": k, **det, "area": w * h, "iscrowd": 0, "rank": int(b["rank"]),
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        coco = {"info": {"description": f"cxr-harvest pseudo-labels (mined boxes), {split} split"},
                "images": entries, "annotations": annotations,
                "categories": [{"id": i, "name": name, "supercategory": "finding"}
                               for i, name in enumerate(FINDINGS, start=1)]}
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        (out / "annotations" / f"detections_{split}.json").write_text(json.dumps(detections))
    return counts(images, boxes)


def verify(out: Path, files: ImageFiles) -> None:
    """pycocotools (`COCO`, `loadRes`), COCO's own reader, on every split, and the frame of each written image
    against its entry (what torchvision's `CocoDetection` would read; the tests load every export in it, plain and
    wrapped for transforms v2, which costs an import of torch at every export, about 10 s on 2 cores)."""
    from pycocotools.coco import COCO
    for ann in sorted((out / "annotations").glob("instances_*.json")):
        split = ann.stem.removeprefix("instances_")
        gt = quiet(COCO, str(ann))
        for a in gt.dataset["annotations"]:
            if not ({"segmentation", "area", "iscrowd", "bbox"} <= set(a)):
                raise ValueError(f"{ann.name}: annotation {a['id']} lacks segmentation, area, iscrowd or bbox")
        dets = json.loads((out / "annotations" / f"detections_{split}.json").read_text())
        if dets:
            quiet(gt.loadRes, dets)
        if files.mode == "none":
            continue
        for entry in gt.dataset["images"]:
            size = image_size(out / "images" / split / entry["file_name"])
            if size != (entry["width"], entry["height"]):
                raise ValueError(f"{ann.name}: image {entry['file_name']} is {size[0]}x{size[1]}, not "
                                 f"{entry['width']}x{entry['height']}")


# ------------------------------------------------------------------------------------------ reading

def review_items(data) -> list[ReviewItem]:
    """Every image of a COCO file (or a list of them) with its boxes in pixels; categories are matched by name
    (CVAT numbers its labels its own way) and `bbox` is read (a polygon counts by its bounding box)."""
    items = []
    for part in data if isinstance(data, list) else [data]:
        if not (isinstance(part, dict) and all(isinstance(part.get(k), list)
                                               for k in ("images", "annotations", "categories"))):
            raise MalformedFile("a COCO file has `images`, `annotations` and `categories` lists")
        names = {c.get("id"): c.get("name") for c in part["categories"] if isinstance(c, dict)}
        by_id: dict = {}
        for k, im in enumerate(part["images"]):
            if not (isinstance(im, dict) and positive(im.get("width"), im.get("height"))):
                item = ReviewItem(len(items), f"image #{k}", [])
                item.bad("malformed", "a COCO image needs an id, a file_name and a positive width and height")
            else:   # boxes in pixels of the file's frame: scale and frame are its width and height
                frame = (im["width"], im["height"])
                item = ReviewItem(len(items), f"image {im.get('id')} ({im.get('file_name')})",
                                  name_candidates(im.get("file_name")), scale=frame, frame=frame)
                by_id.setdefault(im.get("id"), item)
            items.append(item)
        for a in part["annotations"]:
            _read_annotation(a, by_id, names, items)
    return items


def _read_annotation(a, by_id: dict, names: dict, items: list[ReviewItem]) -> None:
    item = by_id.get(a.get("image_id")) if isinstance(a, dict) else None
    where = f"annotation {a.get('id') if isinstance(a, dict) else '?'}"
    if item is None:
        orphan = ReviewItem(len(items), where, [])
        orphan.bad("unknown_image", "the annotation's image_id is not in the file's images")
        items.append(orphan)
        return
    where = f"{item.where}, {where}"
    bbox, attrs = a.get("bbox"), a.get("attributes") if isinstance(a.get("attributes"), dict) else {}
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
            and all(map(math.isfinite, bbox))):
        item.bad("malformed", f"bbox must be 4 finite numbers, not {json.dumps(bbox)[:100]}", where)
    elif float(attrs.get("rotation") or 0) % 360:
        item.bad("rotated_box", f"the box is rotated by {attrs['rotation']} degrees; only axis-aligned boxes are "
                                "stored", where)
    elif a.get("category_id") not in names:
        item.bad("unknown_finding", f"category_id {a.get('category_id')!r} is not in the file's categories", where)
    else:
        item.boxes.append({"finding": names[a["category_id"]], **dict(zip("xywh", map(float, bbox))), "where": where})
