"""The Ultralytics YOLO layout: the writer and its write-time check (what `check_det_dataset` reads)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from pipeline.base.vocab import FINDINGS, INDEX, SPLITS
from pipeline.export.common import ImageFiles, by_split, counts

NAME = "yolo"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}  # both YOLO's and PIL's


def write(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, dest: Path) -> dict:
    """Ultralytics layout: `images/<split>/<name>`, `labels/<split>/<stem>.txt` (lines `class cx cy w h` in
    [0, 1] of the frame; empty for a negative, which YOLO reads as background) and `data.yaml`."""
    splits = by_split(images)
    for split, ims in splits.items():
        stems = Counter(Path(files.name(im)).stem for im in ims)
        clash = [s for s, n in stems.items() if n > 1]
        if clash:
            raise ValueError(f"images of the {split} split share the file stem {clash[0]!r}; "
                             "YOLO label files would collide")
    frames = {im["image_id"]: (im["width"], im["height"]) for im in images}
    lines: dict[str, list[str]] = {iid: [] for iid in frames}
    for b in boxes:
        W, H = frames[b["image_id"]]
        lines[b["image_id"]].append(f"{INDEX[b['finding']]} {(b['x'] + b['w'] / 2) / W:.6f} "
                                    f"{(b['y'] + b['h'] / 2) / H:.6f} {b['w'] / W:.6f} {b['h'] / H:.6f}")
    for split, ims in splits.items():
        (out / "labels" / split).mkdir(parents=True)
        for im in ims:
            name = files.place(im, out, f"images/{split}")
            (out / "labels" / split / f"{Path(name).stem}.txt").write_text(
                "".join(r + "\n" for r in lines[im["image_id"]]))
    folders = {s: f"images/{s}" for s in splits}
    keys = {"train": folders.get("train") or next(iter(folders.values())),
            "val": folders.get("val") or folders.get("test") or folders.get("train") or next(iter(folders.values())),
            **({"test": folders["test"]} if "test" in folders else {})}
    note = ("" if "val" in folders else
            f"# The warehouse has no val split: val is {keys['val']} (training carves its own val from train).\n")
    (out / "data.yaml").write_text(
        "# cxr-harvest pseudo-labels in the Ultralytics layout. `path` is this folder where it was written;\n"
        "# after moving the folder, delete that line (paths then resolve against this file's folder).\n" + note
        + yaml.safe_dump({"path": str(dest), **keys, "nc": len(FINDINGS), "names": dict(enumerate(FINDINGS))},
                         sort_keys=False))
    return counts(images, boxes)


def verify(out: Path, _files: ImageFiles) -> None:
    """The Ultralytics layout as `check_det_dataset` and its label loader read it: `train`/`val` keys naming
    existing folders, `names` of `nc` classes, and for every image `labels/.../<stem>.txt` (img2label_paths)
    with lines `class cx cy w h`, class < nc, coordinates in [0, 1]."""
    data = yaml.safe_load((out / "data.yaml").read_text())
    if not {"train", "val", "names", "nc"} <= set(data) or len(data["names"]) != data["nc"]:
        raise ValueError(f"data.yaml lacks train, val, names or nc: {sorted(data)}")
    for key in SPLITS:
        if key in data and not (out / data[key]).is_dir():
            raise ValueError(f"data.yaml {key}: {data[key]} is not a folder of the export")
    for image in (out / "images").rglob("*"):
        if not image.is_file():
            continue
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{image.name}: not an image suffix YOLO reads")
        label = out / "labels" / image.parent.relative_to(out / "images") / f"{image.stem}.txt"
        for line in label.read_text().splitlines():  # FileNotFoundError names a missing label file
            cls, *xywh = line.split()
            if not (cls.isdigit() and int(cls) < data["nc"] and len(xywh) == 4
                    and all(0.0 <= float(v) <= 1.0 for v in xywh)):
                raise ValueError(f"{label.name}: bad YOLO line {line!r}")
