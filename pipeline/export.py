"""Pseudo-label exports of one mining run: COCO, YOLO, NIH `BBox_List_2017.csv`, and for review Label Studio tasks
and CVAT's COCO 1.0 (docs/design.md#purpose, #flows).

Every export holds every image the run mined, negatives (images without a kept box) included, per warehouse
split (`images.split`: `train` and `test` for NIH, whatever ingestion stored otherwise; no `val` is carved
here), with image paths that resolve:

- `--images link` (default): the source files are hard-linked beside the labels (copied when the export is
  on another filesystem); `copy` always copies. Sources are found under the roots of the completed ingest
  runs (`runs.params.root`) or `image_roots`. DICOM files are never linked (their headers carry PHI): they
  are decoded again, in their full frame, to `<image_id>.png`. A found file whose frame differs from the
  warehouse's (`images.width/height`, the frame of the boxes) stops the export.
- `--images none`: no image is written; paths are relative to the recorded image root, named in
  `manifest.json` (`images.root`). Not for YOLO (its readers find labels by editing image paths) nor for
  DICOM sources (file names may carry PHI).

Boxes are those of `mined_boxes` clipped to their frame; a box with nothing inside is dropped and counted.
Only image ids, findings, boxes, scores, image-level labels, view, pixel spacing and a keyed patient
pseudonym (NIH CSV) leave the warehouse: never patient ids, ages or sexes. Each export is reloaded with its
format's own reader before it is put in place (`_VERIFY`). `manifest.json` traces it to its run, model,
filters and code, with the sha256 of every file but the images (the warehouse's `source_sha256` names
those). The folder is built next to `out_dir` and renamed into place: a reader sees the old export or the
new one, never a mix.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import yaml

from pipeline.base.files import sha256_file
from pipeline.base.home import Home
from pipeline.labelstudio import LABEL_CONFIG, URL_PREFIX, image_url, label_config, task, verify_labelstudio
from pipeline.runs.parts import mined_image_ids
from pipeline.runs.record import code_version, writer
from pipeline.base.vocab import FINDINGS, INDEX, NO_FINDING, SPLITS, normalize_finding
from warehouse.db import connect


FORMATS = ("coco", "yolo", "nih-csv", "labelstudio", "cvat")
IMAGE_MODES = ("link", "copy", "none")
MANIFEST = "manifest.json"
# BBox_List_2017.csv as NIH ships it: the unquoted header splits into `Bbox [x`, `y`, `w`, `h]` plus three
# empty columns, and Infiltration is spelled `Infiltrate` (docs/design.md#data-contracts).
NIH_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NIH_SPELLING = {"Infiltration": "Infiltrate"}
DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                     "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}  # both YOLO's and PIL's

_BOXES_SQL = """
SELECT b.image_id, b.finding, b.rank, b.x, b.y, b.w, b.h, b.score
FROM mined_boxes b
WHERE b.run_id = $run_id
  AND ($min_score IS NULL OR b.score >= $min_score)
  AND ($ranks IS NULL OR list_contains($ranks, b.rank))
  AND ($findings IS NULL OR list_contains($findings, b.finding))
ORDER BY b.image_id, b.finding, b.rank
"""
# Every image the run mined, boxed or not: filters change annotations, not the image set.
_IMAGES_SQL = """
WITH ids AS (SELECT DISTINCT unnest($ids::VARCHAR[]) AS image_id),
     lab AS (SELECT image_id, list(finding ORDER BY finding) AS labels FROM labels GROUP BY image_id)
SELECT ids.image_id, i.width, i.height, i.split, i.source, i.view, i.spacing_x, i.spacing_y, i.patient_id,
       coalesce(lab.labels, []::VARCHAR[]) AS labels
FROM ids LEFT JOIN images i USING (image_id) LEFT JOIN lab USING (image_id)
ORDER BY ids.image_id
"""


def export(home, run_id: str, fmt: str, out_dir, min_score: float | None = None,
           ranks: tuple[int, ...] | None = (1,), findings=None, images: str = "link",
           image_roots=(), url_prefix: str = URL_PREFIX) -> Path:
    """Export the boxes of run `run_id` as `fmt` into the folder `out_dir`; return that folder.

    Filters: `min_score` keeps boxes with score >= it; `ranks` keeps those box ranks (None: all ranks;
    the default keeps the top box per image and finding); `findings` keeps those findings (any spelling
    that :func:`pipeline.base.vocab.normalize_finding` accepts). `images`: link | copy | none (module docstring);
    `image_roots`: folders searched for the source files before the recorded ingest roots; `url_prefix`
    (labelstudio): what `data.image` starts with, before the image's path. An existing export at `out_dir` is
    replaced.
    """
    home = home if isinstance(home, Home) else Home.resolve(home)
    out_dir = Path(out_dir).expanduser().resolve()
    _check_replaceable(out_dir)
    filters = {"min_score": None if min_score is None else float(min_score),
               "ranks": None if ranks is None else sorted({int(r) for r in ranks}),
               "findings": None if findings is None else sorted({normalize_finding(f) for f in findings},
                                                                 key=INDEX.__getitem__)}
    rows, raw_boxes, trace, files = preflight(home, run_id, fmt, images, image_roots, filters)
    boxes = [c for b in raw_boxes if (c := _clip(b, rows[b["image_id"]]))]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write, verify = _WRITERS[fmt], _VERIFY[fmt]
        if fmt == "labelstudio":   # predictions name the run; the check reads them back into these boxes
            write = partial(write, run_id=run_id, url_prefix=url_prefix)
            verify = partial(verify, boxes=boxes, url_prefix=url_prefix)
        elif fmt == "cvat":
            verify = partial(verify, boxes=boxes)
        counts = write(tmp, list(rows.values()), boxes, files, out_dir)
        counts["dropped_outside_frame"] = len(raw_boxes) - len(boxes)
        verify(tmp, files)
        manifest = {"format": fmt, **trace, "filters": filters, "counts": counts,
                    "images": files.summary(),
                    "code_version": code_version(),
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "files": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                              if p.is_file() and p.relative_to(tmp).parts[0] != "images"}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap `tmp` holds the old export
    return out_dir


def preflight(home, run_id: str, fmt: str, images: str = "link", image_roots=(), filters: dict | None = None):
    """What `export` checks before it writes anything: the format, the image mode, and that every source image
    is found (one-line errors naming the fix). Returns the run's images, boxes, trace and `ImageFiles`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if images not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {images!r}; choose one of {', '.join(IMAGE_MODES)}")
    if fmt == "yolo" and images == "none":
        raise ValueError("YOLO readers find a label by replacing /images/ with /labels/ in its image's path, "
                         "so a YOLO export needs its images: use --images link or copy")
    home = home if isinstance(home, Home) else Home.resolve(home)
    filters = filters or {"min_score": None, "ranks": None, "findings": None}
    rows, raw_boxes, trace, roots = _read_run(home, run_id, filters, pseudonyms=fmt == "nih-csv")
    files = ImageFiles.locate(home, list(rows.values()), images, [*map(Path, image_roots or ()), *roots])
    return rows, raw_boxes, trace, files


def _read_run(home: Home, run_id: str, filters: dict, pseudonyms: bool):
    """Images (id -> row), filtered boxes, the run/model trace and the recorded ingest roots, from the warehouse."""
    con = writer(home)
    try:
        run = _row(con, "SELECT run_id, flow, params, model_id, code_version, status, started_at, finished_at "
                        "FROM runs WHERE run_id = ?", run_id)
        if run is None:
            raise ValueError(f"run {run_id!r} is not in the runs table of {home.warehouse}; "
                             "list runs with `SELECT * FROM runs` and pass one that mined boxes")
        boxes = _dicts(con.execute(_BOXES_SQL, {"run_id": run_id, **filters}))
        boxed = [r[0] for r in con.execute("SELECT DISTINCT image_id FROM mined_boxes WHERE run_id = ?",
                                           [run_id]).fetchall()]
        ids = sorted(set(boxed) | set(mined_image_ids(home, run_id)))
        if not ids:
            raise ValueError(f"run {run_id!r} has no mined boxes under {home.data / 'mined_boxes'}; "
                             "run `harvest mine` first or pass a mining run")
        images = _dicts(con.execute(_IMAGES_SQL, {"ids": ids}))
        missing = [im["image_id"] for im in images if im["width"] is None]
        if missing:
            raise ValueError(f"{len(missing)} mined image(s) are not in the images table, e.g. {missing[0]!r}; "
                             "re-ingest them so their frame (width, height) is known")
        model_ids = [r[0] for r in con.execute(
            "SELECT DISTINCT model_id FROM mined_boxes WHERE run_id = ? ORDER BY 1", [run_id]).fetchall()]
        model_id = run["model_id"] or (model_ids[0] if len(model_ids) == 1 else None)
        model = _row(con, "SELECT model_id, parent_id, stage, arch, neck, config, checkpoint, checkpoint_sha256, "
                          "created_at FROM models WHERE model_id = ?", model_id)
        roots = []
        for (params,) in con.execute("SELECT params FROM runs WHERE flow = 'ingest' "
                                     "ORDER BY started_at DESC").fetchall():
            params = json.loads(params) if isinstance(params, str) else params or {}
            inside = params.get("root_in_home")   # a source inside the home: found where the home is now
            found = ([home.root / inside] if inside else []) + ([Path(params["root"])] if params.get("root") else [])
            roots += [root for root in found if root not in roots]
    finally:
        con.close()
    salt = None
    if pseudonyms:
        from pipeline.images.dicom import pseudonym
        from pipeline.ingest.dicom import home_salt
        salt = home_salt(home)
    for im in images:  # the patient id never leaves this function; NIH CSV gets a keyed pseudonym
        patient = im.pop("patient_id")
        im["patient"] = pseudonym("patient", patient, salt) if pseudonyms else None
    for record in (run, model):
        for key in ("params", "config"):
            if record is not None and isinstance(record.get(key), str):
                record[key] = json.loads(record[key])  # DuckDB JSON columns come back as text
    trace = {"run_id": run_id, "model_id": model_id, "run": run, "model": model, "box_model_ids": model_ids}
    return {im["image_id"]: im for im in images}, boxes, trace, roots


def _dicts(cursor) -> list[dict]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _row(con, sql: str, key) -> dict | None:
    rows = _dicts(con.execute(sql, [key]))
    return rows[0] if rows else None


def _clip(b: dict, im: dict) -> dict | None:
    """The box clipped to its image's frame (unchanged when inside); None when nothing is left inside."""
    W, H = im["width"], im["height"]
    if b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["w"] <= W and b["y"] + b["h"] <= H:
        return b
    x0, x1 = np.clip([b["x"], b["x"] + b["w"]], 0, W)
    y0, y1 = np.clip([b["y"], b["y"] + b["h"]], 0, H)
    if x1 <= x0 or y1 <= y0:
        return None
    return {**b, "x": float(x0), "y": float(y0), "w": float(x1 - x0), "h": float(y1 - y0)}


def _short(v: float) -> float:
    """Shortest decimal that reads back as the same float32 (boxes are stored as float32)."""
    return float(str(np.float32(v)))


def _by_split(images: list[dict]) -> dict[str, list[dict]]:
    order = {s: k for k, s in enumerate(SPLITS)}
    out: dict[str, list[dict]] = {}
    for im in sorted(images, key=lambda im: (order.get(im["split"], len(order)), im["split"], im["image_id"])):
        out.setdefault(im["split"], []).append(im)
    return out


def _counts(images: list[dict], written: list[dict]) -> dict:
    per_finding = Counter(b["finding"] for b in written)
    split_of = {im["image_id"]: im["split"] for im in images}
    boxes_per_split = Counter(split_of[b["image_id"]] for b in written)
    boxed = {b["image_id"] for b in written}
    return {"images": len(images), "boxes": len(written), "negatives": len(images) - len(boxed),
            "splits": {s: {"images": len(ims), "boxes": boxes_per_split[s]} for s, ims in _by_split(images).items()},
            "per_finding": {name: per_finding[name] for name in FINDINGS if per_finding[name]}}


# ------------------------------------------------------------------------------------------ images

@dataclass
class ImageFiles:
    """Where each exported image comes from, and how it is written beside the labels."""
    mode: str
    sources: dict[str, Path]                # image_id -> source file (link, copy) or path under `root` (none)
    decode: set[str] = field(default_factory=set)   # DICOM ids: decoded to PNG, never linked
    root: Path | None = None                # none: the recorded image root the paths are relative to
    salt: bytes | None = None
    written: Counter = field(default_factory=Counter)
    folders: dict[str, str] = field(default_factory=dict)  # image folders written (none: the root)

    @classmethod
    def locate(cls, home: Home, images: list[dict], mode: str, roots: list[Path]) -> "ImageFiles":
        from pipeline.ingest.nih import image_files
        dicom = [im for im in images if im["source"] == "dicom"]
        if dicom and mode == "none":
            raise ValueError(f"{len(dicom)} image(s) come from DICOM files, whose names may carry PHI: "
                             "use --images link or copy, which write them decoded as PNG")
        sources: dict[str, Path] = {}
        wanted = {im["image_id"] for im in images} - {im["image_id"] for im in dicom}
        for root in roots:
            if not wanted:
                break
            for name, path in image_files(root).items():
                if name in wanted:
                    sources[name] = Path(path).resolve()
                    wanted.discard(name)
        salt = None
        if dicom:
            from pipeline.ingest.dicom import home_salt
            salt = home_salt(home)
            sources.update(_find_dicoms(home, dicom, roots))
        missing = sorted(wanted | {im["image_id"] for im in dicom if im["image_id"] not in sources})
        if missing and mode != "none":
            where = ", ".join(map(str, roots)) or "no ingest root is recorded"
            raise FileNotFoundError(f"{len(missing)} source image(s) not found, e.g. {missing[0]!r} (searched: "
                                    f"{where}); pass --image-root DIR where they are, or --images none to write "
                                    "paths relative to the recorded image root")
        root = None
        if mode == "none":
            if not roots:
                raise FileNotFoundError("no ingest root is recorded in the runs table: pass --image-root DIR")
            for name in missing:  # not on this machine: NIH's own layout under the latest root
                sources[name] = roots[0].resolve() / "images" / name
            under = {r.resolve() for r in roots for p in sources.values() if p.is_relative_to(r.resolve())}
            root = under.pop() if len(under) == 1 else Path(os.path.commonpath([p.parent for p in sources.values()]))
            sources = {k: Path(os.path.relpath(p, root)) for k, p in sources.items()}
        return cls(mode, sources, {im["image_id"] for im in dicom}, root, salt)

    def name(self, im: dict) -> str:
        """The exported file's name: the source's, or `<image_id>.png` for a decoded DICOM."""
        iid = im["image_id"]
        return f"{iid}.png" if iid in self.decode else iid

    def place(self, im: dict, out: Path, sub: str) -> str:
        """Write `im` into the folder `out/sub` (unless mode none); return its path as an annotation names it:
        relative to that folder, or with mode none to the image root."""
        self.folders[sub] = sub if self.mode != "none" else str(self.root)
        if self.mode == "none":
            return self.sources[im["image_id"]].as_posix()
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / self.name(im)
        src = self.sources[im["image_id"]]
        if im["image_id"] in self.decode:
            from PIL import Image

            from pipeline.images.dicom import read_dicom
            pixels = read_dicom(src, salt=self.salt).pixels
            _check_frame(im, pixels.shape[1], pixels.shape[0], "decoded DICOM")
            Image.fromarray(pixels).save(dest, compress_level=1)
            self.written["decoded"] += 1
            return dest.name
        from PIL import Image
        with Image.open(src) as img:
            _check_frame(im, *img.size, str(src))
        if self.mode == "link":
            try:
                os.link(src, dest)
                self.written["linked"] += 1
                return dest.name
            except OSError:  # another filesystem (EXDEV), or links not allowed there: copy
                pass
        shutil.copyfile(src, dest)
        self.written["copied"] += 1
        return dest.name

    def summary(self) -> dict:
        return {"mode": self.mode, "root": None if self.root is None else str(self.root),
                "folders": self.folders, **{k: self.written[k] for k in ("linked", "copied", "decoded")}}


def _check_frame(im: dict, width: int, height: int, what: str) -> None:
    if (width, height) != (im["width"], im["height"]):
        raise ValueError(f"{what} is {width}x{height} but {im['image_id']} was ingested as {im['width']}x"
                         f"{im['height']} (the frame of its boxes): the file changed since ingestion; re-ingest it")


def _find_dicoms(home: Home, dicom: list[dict], roots: list[Path]) -> dict[str, Path]:
    """DICOM image id -> file, matched by content: the sha256 of each file under the roots (names may carry PHI)."""
    from pipeline.ingest.dicom import dicom_files
    con = connect(home, read_only=True)
    try:
        wanted = {im["image_id"] for im in dicom}
        by_sha = {sha: iid for sha, iid in con.execute(
            "SELECT source_sha256, image_id FROM images WHERE source = 'dicom'").fetchall() if iid in wanted}
    finally:
        con.close()
    found = {}
    for root in roots:
        for path in dicom_files(root) if root.is_dir() and len(found) < len(by_sha) else []:
            iid = by_sha.get(content_sha256(path))
            if iid is not None and iid not in found:
                found[iid] = path.resolve()
    return found


_SHA_BY_STAT: dict[tuple, str] = {}


def content_sha256(path: Path) -> str:
    """`sha256_file`, remembered for this process by the file's identity and version (device, inode, size,
    mtime, ctime): `harvest export` checks its sources before the flow, and the flow finds them again without reading
    every DICOM file a second time. A file rewritten since is read anew."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA_BY_STAT:
        _SHA_BY_STAT[key] = sha256_file(path)
    return _SHA_BY_STAT[key]


# ------------------------------------------------------------------------------------------ writers

def write_coco(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, _dest: Path,
               polygons: bool = True) -> dict:
    """Per split: `annotations/instances_<split>.json` (COCO instances: bbox, its polygon as `segmentation`,
    `area`, `iscrowd`) and `annotations/detections_<split>.json` (the `COCO.loadRes` list), images in
    `images/<split>/` (`file_name` relative to it; with --images none, relative to the image root).
    `polygons=False`: empty `segmentation` and no detections file (CVAT, `write_cvat`)."""
    ids = {im["image_id"]: k for k, im in enumerate(sorted(images, key=lambda im: im["image_id"]), start=1)}
    per_image: dict[str, list[dict]] = {}
    for b in boxes:
        per_image.setdefault(b["image_id"], []).append(b)
    (out / "annotations").mkdir()
    k = 0
    for split, ims in _by_split(images).items():
        annotations, detections, entries = [], [], []
        for im in ims:
            entries.append({"id": ids[im["image_id"]], "file_name": files.place(im, out, f"images/{split}"),
                            "width": int(im["width"]), "height": int(im["height"])})
            for b in per_image.get(im["image_id"], []):
                k += 1
                x, y, w, h = (_short(b[c]) for c in "xywh")
                det = {"image_id": ids[b["image_id"]], "category_id": INDEX[b["finding"]] + 1, "bbox": [x, y, w, h],
                       "score": _short(b["score"])}
                detections.append(det)
                annotations.append({"id": k, **det, "area": w * h, "iscrowd": 0, "rank": int(b["rank"]),
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]] if polygons else []})
        coco = {"info": {"description": f"cxr-harvest pseudo-labels (mined boxes), {split} split"},
                "images": entries, "annotations": annotations,
                "categories": [{"id": i, "name": name, "supercategory": "finding"}
                               for i, name in enumerate(FINDINGS, start=1)]}
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        if polygons:
            (out / "annotations" / f"detections_{split}.json").write_text(json.dumps(detections))
    return _counts(images, boxes)


def write_cvat(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, dest: Path) -> dict:
    """CVAT's "COCO 1.0" dataset layout (`images/<split>/`, `annotations/instances_<split>.json`, a subset per
    split), with empty `segmentation`: CVAT imports a COCO annotation as a rectangle only then (a polygon stays a
    polygon). `cvat_labels.json`: the 14 findings for a project's Raw label editor."""
    counts = write_coco(out, images, boxes, files, dest, polygons=False)
    (out / "cvat_labels.json").write_text(json.dumps(
        [{"name": name, "type": "rectangle", "attributes": []} for name in FINDINGS], indent=1) + "\n")
    return counts


def write_labelstudio(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, _dest: Path, *,
                      run_id: str, url_prefix: str = URL_PREFIX) -> dict:
    """Per split `tasks_<split>.json`: one task per image, its mined boxes as a prediction of model_version
    `run_id` (pipeline.labelstudio); `label_config.xml`; images in `images/<split>/` (`data.image`: url_prefix +
    `images/<split>/<name>`; with --images none, + the path under the image root)."""
    per_image: dict[str, list[dict]] = {}
    for b in boxes:
        per_image.setdefault(b["image_id"], []).append(b)
    for split, ims in _by_split(images).items():
        tasks = []
        for im in ims:
            name = files.place(im, out, f"images/{split}")
            path = name if files.mode == "none" else f"images/{split}/{name}"
            tasks.append(task(im, image_url(path, url_prefix), per_image.get(im["image_id"], []), run_id))
        (out / f"tasks_{split}.json").write_text(json.dumps(tasks, indent=1))
    (out / LABEL_CONFIG).write_text(label_config())
    return _counts(images, boxes)


def write_yolo(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, dest: Path) -> dict:
    """Ultralytics layout: `images/<split>/<name>`, `labels/<split>/<stem>.txt` (lines `class cx cy w h` in
    [0, 1] of the frame; empty for a negative, which YOLO reads as background) and `data.yaml`."""
    by_split = _by_split(images)
    for split, ims in by_split.items():
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
    for split, ims in by_split.items():
        (out / "labels" / split).mkdir(parents=True)
        for im in ims:
            name = files.place(im, out, f"images/{split}")
            (out / "labels" / split / f"{Path(name).stem}.txt").write_text(
                "".join(r + "\n" for r in lines[im["image_id"]]))
    folders = {s: f"images/{s}" for s in by_split}
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
    return _counts(images, boxes)


def write_nih_csv(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, _dest: Path) -> dict:
    """NIH ChestX-ray14's own layout, so `harvest ingest nih --root <export>` re-ingests it: `BBox_List_2017.csv`
    (score and rank in `BBox_scores.csv`, row for row), `Data_Entry_2017.csv` (labels: the image's and its
    boxes' findings; patient: a keyed pseudonym; age, sex, follow-up blank), `train_val_list.txt`,
    `test_list.txt` and `images/` (with --images none, re-ingest with --metadata-only)."""
    names = {im["image_id"]: files.place(im, out, "images") for im in images}
    names = {iid: Path(n).name for iid, n in names.items()}
    box_findings: dict[str, set] = {}
    for b in boxes:
        box_findings.setdefault(b["image_id"], set()).add(b["finding"])
    with open(out / "BBox_List_2017.csv", "w", newline="") as f, open(out / "BBox_scores.csv", "w", newline="") as g:
        f.write(NIH_HEADER + "\n")  # verbatim: the csv module would quote `Bbox [x,y,w,h]`
        rows, scores = csv.writer(f, lineterminator="\n"), csv.writer(g, lineterminator="\n")
        scores.writerow(["Image Index", "Finding Label", "x", "y", "w", "h", "rank", "score"])
        for b in boxes:
            cells = [names[b["image_id"]], NIH_SPELLING.get(b["finding"], b["finding"]),
                     *(repr(_short(b[c])) for c in "xywh")]
            rows.writerow(cells)
            scores.writerow([*cells, int(b["rank"]), repr(_short(b["score"]))])
    with open(out / "Data_Entry_2017.csv", "w", newline="") as f:
        f.write(DATA_ENTRY_HEADER + "\n")  # the two bracketed headers split into two columns each, as NIH's
        rows = csv.writer(f, lineterminator="\n")
        for im in images:
            labels = sorted(set(im["labels"]) | box_findings.get(im["image_id"], set()), key=INDEX.__getitem__)
            rows.writerow([names[im["image_id"]], "|".join(labels) or NO_FINDING, "", im["patient"], "", "",
                           im["view"] or "", im["width"], im["height"],
                           "" if im["spacing_x"] is None else repr(im["spacing_x"]),
                           "" if im["spacing_y"] is None else repr(im["spacing_y"])])
    for name, keep in (("train_val_list.txt", lambda s: s != "test"), ("test_list.txt", lambda s: s == "test")):
        (out / name).write_text("".join(names[im["image_id"]] + "\n" for im in images if keep(im["split"])))
    return _counts(images, boxes)


_WRITERS = {"coco": write_coco, "yolo": write_yolo, "nih-csv": write_nih_csv, "labelstudio": write_labelstudio,
            "cvat": write_cvat}


# ------------------------------------------------------------------------------------------ write-time checks

def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return fn(*args, **kwargs)


def verify_coco(out: Path, files: ImageFiles) -> None:
    """pycocotools (`COCO`, `loadRes`) and torchvision's `CocoDetection`, plain and wrapped for transforms v2
    with every target key (masks from `segmentation`), on a boxed and a negative image of each split."""
    from pycocotools.coco import COCO
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    for ann in sorted((out / "annotations").glob("instances_*.json")):
        split = ann.stem.removeprefix("instances_")
        gt = _quiet(COCO, str(ann))
        for a in gt.dataset["annotations"]:
            if not ({"segmentation", "area", "iscrowd", "bbox"} <= set(a)):
                raise ValueError(f"{ann.name}: annotation {a['id']} lacks segmentation, area, iscrowd or bbox")
        dets = json.loads((out / "annotations" / f"detections_{split}.json").read_text())
        if dets:
            _quiet(gt.loadRes, dets)
        if files.mode == "none":
            continue
        plain = _quiet(CocoDetection, str(out / "images" / split), str(ann))
        wrapped = wrap_dataset_for_transforms_v2(plain, target_keys="all")
        boxed = [k for k, i in enumerate(plain.ids) if gt.getAnnIds(imgIds=[i])]
        for k in {*boxed[:1], *[k for k in range(len(plain)) if k not in set(boxed)][:1]}:
            image, target = plain[k]
            entry = gt.imgs[plain.ids[k]]
            with warnings.catch_warnings():  # pycocotools' mask decoding warns under numpy 2
                warnings.simplefilter("ignore", DeprecationWarning)
                _, wrapped_target = wrapped[k]
            n = len(wrapped_target.get("boxes", [])), len(wrapped_target.get("masks", []))
            if image.size != (entry["width"], entry["height"]) or n != (len(target), len(target)):
                raise ValueError(f"{ann.name}: torchvision reads image {entry['file_name']} as {image.size} with "
                                 f"{n} boxes/masks, not {entry['width']}x{entry['height']} with {len(target)}")


def verify_yolo(out: Path, _files: ImageFiles) -> None:
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


def verify_nih_csv(out: Path, files: ImageFiles) -> None:
    """What `harvest ingest nih` accepts: every box on a listed image, of a finding in its labels, inside its frame."""
    from pipeline.ingest.nih import read_bbox_csv, read_data_entry
    from pipeline.base.vocab import parse_labels
    entry = read_data_entry(out / "Data_Entry_2017.csv").set_index("image_id")
    for rec in read_bbox_csv(out / "BBox_List_2017.csv").itertuples(index=False):
        row = entry.loc[rec.image_id]
        finding = normalize_finding(rec.finding_raw)
        if finding not in parse_labels(row.labels_raw) or not (
                0 <= rec.x and 0 <= rec.y and rec.x + rec.w <= row.orig_w and rec.y + rec.h <= row.orig_h):
            raise ValueError(f"BBox_List_2017.csv: the {finding} box of {rec.image_id} would be rejected")
    if files.mode != "none":
        missing = [n for n in entry.index if not (out / "images" / n).is_file()]
        if missing:
            raise ValueError(f"images/{missing[0]} is listed in Data_Entry_2017.csv but not written")


def verify_cvat(out: Path, files: ImageFiles, boxes: list[dict]) -> None:
    """pycocotools loads each subset; every annotation is a rectangle for CVAT (empty `segmentation`); images are
    where CVAT's layout puts them; and `harvest import-review`'s COCO reader gives back the exported boxes."""
    from pycocotools.coco import COCO

    from pipeline.review import coco_items
    ids, got = {b["image_id"] for b in boxes}, []
    for ann in sorted((out / "annotations").glob("instances_*.json")):
        split = ann.stem.removeprefix("instances_")
        dataset = _quiet(COCO, str(ann)).dataset
        if any(a.get("segmentation") != [] for a in dataset["annotations"]):
            raise ValueError(f"{ann.name}: CVAT reads an annotation as a rectangle only with empty segmentation")
        missing = [i["file_name"] for i in dataset["images"] if not (out / "images" / split / i["file_name"]).is_file()]
        if files.mode != "none" and missing:
            raise ValueError(f"{ann.name}: images/{split}/{missing[0]} is not written")
        for item in coco_items(dataset):
            found = [n for n in item.names if n in ids]
            if item.problems or (item.boxes and not found):
                raise ValueError(f"{ann.name}: {item.where} does not read back: {item.problems[:1]}")
            got += [(found[0], b["finding"], *(float(np.float32(b[c])) for c in "xywh")) for b in item.boxes]
    want = [(b["image_id"], b["finding"], *(float(np.float32(b[c])) for c in "xywh")) for b in boxes]
    if sorted(got) != sorted(want):
        raise ValueError(f"CVAT export: the {len(want)} exported boxes do not read back ({len(got)} read)")


_VERIFY = {"coco": verify_coco, "yolo": verify_yolo, "nih-csv": verify_nih_csv, "labelstudio": verify_labelstudio,
           "cvat": verify_cvat}


# ------------------------------------------------------------------------------------------ atomic replace

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
