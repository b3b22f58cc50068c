"""The Ultralytics YOLO layout: the writer and its write-time check (what `check_det_dataset` reads)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from pipeline.base.vocab import FINDINGS, INDEX, SPLITS
from pipeline.export.common import ImageFiles, by_split, counts

NAME = "yolo"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}  # both YOLO's and PIL's


def write(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, _dest: Path) -> dict:
    """Ultralytics layout: `images/<split>/<name>`, `labels/<split>/<stem>.txt` (lines `class cx cy w h` in
    [0, 1] of the frame; empty for a negative, which YOLO reads as background) and `data.yaml` (train, val: the
    validation split, or train when the run has none; test: the evaluation split; paths relative to its folder)."""
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
    keys = {"train": folders["train"], "val": folders.get("val", folders["train"]),
            **({"test": folders["test"]} if "test" in folders else {})}
    note = ("# val: the validation split of the mining model's training (manifest.json `splits`).\n" if "val" in folders
            else "# No image of this run is in the validation split: val is the train split, so its metrics are not\n"
                 "# held out (manifest.json `splits`).\n")
    (out / "data.yaml").write_text(
        "# cxr-harvest pseudo-labels in the Ultralytics layout. No `path` key: Ultralytics resolves train, val and\n"
        "# test against this file's folder, so the folder can be copied or moved as it is.\n" + note
        + ("# test: the evaluation split. Keep it for a final `yolo val split=test`, never for choosing epochs.\n"
           if "test" in folders else "")
        + yaml.safe_dump({**keys, "nc": len(FINDINGS), "names": dict(enumerate(FINDINGS))}, sort_keys=False))
    return counts(images, boxes)


def verify(out: Path, _files: ImageFiles) -> None:
    """The Ultralytics layout as `check_det_dataset` and its label loader read it: no `path` (the folder travels),
    `train`/`val` keys naming folders `images/<split>` of the export, val not the test split, `names` of `nc`
    classes, and for every image `labels/.../<stem>.txt` (img2label_paths) with lines `class cx cy w h`, class < nc,
    coordinates in [0, 1]."""
    data = yaml.safe_load((out / "data.yaml").read_text())
    if not {"train", "val", "names", "nc"} <= set(data) or len(data["names"]) != data["nc"] or "path" in data:
        raise ValueError(f"data.yaml lacks train, val, names or nc, or names a path: {sorted(data)}")
    for key in SPLITS:
        if key in data and not (Path(data[key]) == Path("images", Path(data[key]).name) and (out / data[key]).is_dir()):
            raise ValueError(f"data.yaml {key}: {data[key]} is not a folder images/<split> of the export")
    if data["val"] == data.get("test"):
        raise ValueError("data.yaml: val is the test split, the evaluation split")
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
