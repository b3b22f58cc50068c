"""Pseudo-label exports of one mining run: COCO, YOLO and NIH `BBox_List_2017.csv` (DESIGN.md sections 1, 4).

Boxes are read with DuckDB SQL from `mined_boxes` joined with `images` (for the frame). Only image ids,
findings, boxes and scores leave the warehouse: never patient ids, ages or sexes (no PHI in exports).
Every export folder holds `manifest.json`, which traces it back to its run, model, filters and code, with
the sha256 of every file. The folder is built next to `out_dir` and renamed into place, so a reader sees
the old export or the new one, never a mix.
"""
from __future__ import annotations

import csv
import ctypes
import json
import os
import shutil
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.files import sha256_file

from pipeline.home import Home
from pipeline.runs import code_version
from pipeline.vocab import FINDINGS, INDEX, normalize_finding
from warehouse.db import connect

FORMATS = ("coco", "yolo", "nih-csv")
MANIFEST = "manifest.json"
# BBox_List_2017.csv as NIH ships it: the unquoted header splits into `Bbox [x`, `y`, `w`, `h]` plus three
# empty columns, and Infiltration is spelled `Infiltrate` (DESIGN.md section 3).
NIH_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NIH_SPELLING = {"Infiltration": "Infiltrate"}

_BOXES_SQL = """
SELECT b.image_id, b.finding, b.rank, b.x, b.y, b.w, b.h, b.score
FROM mined_boxes b
WHERE b.run_id = $run_id
  AND ($min_score IS NULL OR b.score >= $min_score)
  AND ($ranks IS NULL OR list_contains($ranks, b.rank))
  AND ($findings IS NULL OR list_contains($findings, b.finding))
ORDER BY b.image_id, b.finding, b.rank
"""
# Every image the run mined, boxed or not after filtering: filters change annotations, not the image set.
_IMAGES_SQL = """
SELECT DISTINCT b.image_id, i.width, i.height
FROM mined_boxes b LEFT JOIN images i USING (image_id)
WHERE b.run_id = $run_id
ORDER BY b.image_id
"""


def export(home, run_id: str, fmt: str, out_dir, min_score: float | None = None,
           ranks: tuple[int, ...] | None = (1,), findings=None) -> Path:
    """Export the boxes of run `run_id` as `fmt` into the folder `out_dir`; return that folder.

    Filters: `min_score` keeps boxes with score >= it; `ranks` keeps those box ranks (None: all ranks;
    the default keeps the top box per image and finding); `findings` keeps those findings (any spelling
    that :func:`pipeline.vocab.normalize_finding` accepts). An existing export at `out_dir` is replaced.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    home = home if isinstance(home, Home) else Home.resolve(home)
    out_dir = Path(out_dir).expanduser().resolve()
    _check_replaceable(out_dir)
    filters = {"min_score": None if min_score is None else float(min_score),
               "ranks": None if ranks is None else sorted({int(r) for r in ranks}),
               "findings": None if findings is None else sorted({normalize_finding(f) for f in findings},
                                                                 key=INDEX.__getitem__)}
    images, boxes, trace = _read_run(home, run_id, filters)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        counts = _WRITERS[fmt](tmp, images, boxes)
        manifest = {"format": fmt, **trace, "filters": filters, "counts": counts,
                    "code_version": code_version(),
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "files": {p.relative_to(tmp).as_posix(): sha256_file(p)
                              for p in sorted(tmp.rglob("*")) if p.is_file()}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap `tmp` holds the old export
    return out_dir


def _read_run(home: Home, run_id: str, filters: dict) -> tuple[list[dict], list[dict], dict]:
    """Images (id, frame), filtered boxes and the run/model trace of one run, from the warehouse."""
    con = connect(home)
    try:
        run = _row(con, "SELECT run_id, flow, params, model_id, code_version, status, started_at, finished_at "
                        "FROM runs WHERE run_id = ?", run_id)
        if run is None:
            raise ValueError(f"run {run_id!r} is not in the runs table of {home.warehouse}; "
                             "list runs with `SELECT * FROM runs` and pass one that mined boxes")
        images = _dicts(con.execute(_IMAGES_SQL, {"run_id": run_id}))
        if not images:
            raise ValueError(f"run {run_id!r} has no mined boxes under {home.data / 'mined_boxes'}; "
                             "run `harvest mine` first or pass a mining run")
        missing = [im["image_id"] for im in images if im["width"] is None]
        if missing:
            raise ValueError(f"{len(missing)} mined image(s) are not in the images table, e.g. {missing[0]!r}; "
                             "re-ingest them so their frame (width, height) is known")
        boxes = _dicts(con.execute(_BOXES_SQL, {"run_id": run_id, **filters}))
        model_ids = [r[0] for r in con.execute(
            "SELECT DISTINCT model_id FROM mined_boxes WHERE run_id = ? ORDER BY 1", [run_id]).fetchall()]
        model_id = run["model_id"] or (model_ids[0] if len(model_ids) == 1 else None)
        model = _row(con, "SELECT model_id, parent_id, stage, arch, neck, config, checkpoint, checkpoint_sha256, "
                          "created_at FROM models WHERE model_id = ?", model_id)
    finally:
        con.close()
    for record in (run, model):
        for key in ("params", "config"):
            if record is not None and isinstance(record.get(key), str):
                record[key] = json.loads(record[key])  # DuckDB JSON columns come back as text
    return images, boxes, {"run_id": run_id, "model_id": model_id, "run": run, "model": model,
                           "box_model_ids": model_ids}


def _dicts(cursor) -> list[dict]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _row(con, sql: str, key) -> dict | None:
    rows = _dicts(con.execute(sql, [key]))
    return rows[0] if rows else None


def _counts(images: int, written: list[dict], **extra) -> dict:
    per_finding = Counter(b["finding"] for b in written)
    return {"images": images, "boxes": len(written), **extra,
            "per_finding": {name: per_finding[name] for name in FINDINGS if per_finding[name]}}


def _short(v: float) -> float:
    """Shortest decimal that reads back as the same float32 (boxes are stored as float32)."""
    return float(str(np.float32(v)))


def write_coco(out: Path, images: list[dict], boxes: list[dict]) -> dict:
    """`annotations.json` (COCO instances) and `detections.json` (the `COCO.loadRes` result list)."""
    ids = {im["image_id"]: i for i, im in enumerate(images, start=1)}
    annotations, detections = [], []
    for k, b in enumerate(boxes, start=1):
        bbox = [_short(b[c]) for c in "xywh"]
        det = {"image_id": ids[b["image_id"]], "category_id": INDEX[b["finding"]] + 1, "bbox": bbox,
               "score": _short(b["score"])}
        detections.append(det)
        annotations.append({"id": k, **det, "area": bbox[2] * bbox[3], "iscrowd": 0, "rank": int(b["rank"])})
    coco = {"info": {"description": "cxr-harvest pseudo-labels (mined boxes)"},
            "images": [{"id": ids[im["image_id"]], "file_name": im["image_id"],
                        "width": int(im["width"]), "height": int(im["height"])} for im in images],
            "annotations": annotations,
            "categories": [{"id": i, "name": name, "supercategory": "finding"}
                           for i, name in enumerate(FINDINGS, start=1)]}
    (out / "annotations.json").write_text(json.dumps(coco))
    (out / "detections.json").write_text(json.dumps(detections))
    return _counts(len(images), boxes)


def write_yolo(out: Path, images: list[dict], boxes: list[dict]) -> dict:
    """`labels/<stem>.txt` lines `class cx cy w h` in [0, 1] of the image frame, plus `data.yaml`.

    Boxes are clipped to the frame first; a box with nothing left inside is dropped and counted.
    Every image gets a label file, empty when it has no box (YOLO reads that as background).
    """
    frames = {im["image_id"]: (im["width"], im["height"]) for im in images}
    stems = Counter(Path(i).stem for i in frames)
    clash = [s for s, n in stems.items() if n > 1]
    if clash:
        raise ValueError(f"image ids share the file stem {clash[0]!r}; YOLO label files would collide")
    lines = {image_id: [] for image_id in frames}
    kept = []
    for b in boxes:
        W, H = frames[b["image_id"]]
        x0, x1 = np.clip([b["x"], b["x"] + b["w"]], 0, W)
        y0, y1 = np.clip([b["y"], b["y"] + b["h"]], 0, H)
        if x1 <= x0 or y1 <= y0:
            continue
        kept.append(b)
        lines[b["image_id"]].append(f"{INDEX[b['finding']]} {(x0 + x1) / 2 / W:.6f} {(y0 + y1) / 2 / H:.6f} "
                                    f"{(x1 - x0) / W:.6f} {(y1 - y0) / H:.6f}")
    (out / "labels").mkdir()
    for image_id, rows in lines.items():
        (out / "labels" / f"{Path(image_id).stem}.txt").write_text("".join(r + "\n" for r in rows))
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(FINDINGS))
    (out / "data.yaml").write_text(f"# cxr-harvest pseudo-labels; images are not copied.\n"
                                   f"nc: {len(FINDINGS)}\nnames:\n{names}")
    return _counts(len(images), kept, dropped_outside_frame=len(boxes) - len(kept))


def write_nih_csv(out: Path, images: list[dict], boxes: list[dict]) -> dict:
    """`BBox_List_2017.csv` in NIH's own layout, so `pipeline.ingest.nih.read_bbox_csv` re-ingests it."""
    with open(out / "BBox_List_2017.csv", "w", newline="") as f:
        f.write(NIH_HEADER + "\n")  # verbatim: the csv module would quote `Bbox [x,y,w,h]`
        rows = csv.writer(f, lineterminator="\n")
        for b in boxes:
            rows.writerow([b["image_id"], NIH_SPELLING.get(b["finding"], b["finding"]),
                           *(repr(_short(b[c])) for c in "xywh")])
    return _counts(len({b["image_id"] for b in boxes}), boxes)


_WRITERS = {"coco": write_coco, "yolo": write_yolo, "nih-csv": write_nih_csv}


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier export (a typo in --out must not delete data)."""
    if out_dir.exists() and not (out_dir.is_dir() and ((out_dir / MANIFEST).is_file() or not any(out_dir.iterdir()))):
        raise FileExistsError(f"{out_dir} exists and is not an export (no {MANIFEST}); "
                              "pass a new or empty --out folder, or an earlier export to replace")


def _swap_into_place(new: Path, dest: Path) -> None:
    """Make `new` appear at `dest` in one step; afterwards `new` holds the old export, if there was one.

    Linux renameat2(RENAME_EXCHANGE) swaps two folders atomically. Where it is missing, the old folder
    is moved aside first, which leaves a moment without `dest` (but never a half export).
    """
    if not dest.exists():
        os.rename(new, dest)
        return
    if _exchange(new, dest):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rename(dest, aside / dest.name)
    os.rename(new, dest)
    os.rename(aside, new)  # `new` was consumed above; reuse its name so the caller cleans up the old copy


def _exchange(a: Path, b: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
