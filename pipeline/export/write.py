"""Pseudo-label exports of one mining run: COCO, YOLO, NIH `BBox_List_2017.csv`, and for review Label Studio tasks
and CVAT for images 1.1 XML (docs/design.md#purpose, #flows).

Every export holds every image the run mined, negatives (images without a kept box) included, per split as the
mining model's training drew them (`_assign_splits`): `train`; `val`, the warehouse's `val` split or else the
patients training held out of `train`; and `test`, the evaluation split, as stored. Paths inside an export are
relative to its folder (or, with `--images none`, to the image root the manifest names), so a copied or moved
export loads as it is. Image paths resolve:

- `--images link` (default): the source files are hard-linked beside the labels (copied when the export is
  on another filesystem); `copy` always copies. Sources are found under the roots of the completed ingest
  runs (`runs.params.root`) or `image_roots`. DICOM files are never linked (their headers carry PHI): they
  are decoded again, in their full frame, to `<image_id>.png`. A found file whose frame differs from the
  warehouse's (`images.width/height`, the frame of the boxes), or whose sha256 is not its `source_sha256` (a
  file edited in place), stops the export.
- `--images none`: no image is written; paths are relative to the recorded image root, named in
  `manifest.json` (`images.root`). Not for YOLO (its readers find labels by editing image paths) nor for
  DICOM sources (file names may carry PHI).

Boxes are those of `mined_boxes` clipped to their frame; a box with nothing inside is dropped and counted.
Only image ids, findings, boxes, scores, image-level labels, view, pixel spacing and a keyed patient
pseudonym (NIH CSV) leave the warehouse: never patient ids, ages or sexes. Each export is reloaded with its
format's own reader before it is put in place (its module's `verify`). `manifest.json` traces it to its run, model,
filters and code, with the sha256 of every file but the images (the warehouse's `source_sha256` names
those). The folder is built next to `out_dir` and renamed into place: a reader sees the old export or the
new one, never a mix.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.base.files import sha256_file
from pipeline.base.home import Home
from pipeline.base.vocab import INDEX, normalize_finding
from pipeline.config.harvest import trusted_by_default
from pipeline.training.data import validation_rule
from pipeline.export import coco, cvat, labelstudio, nih_csv, yolo
from pipeline.export.common import IMAGE_MODES, ImageFiles
from pipeline.export.labelstudio import URL_PREFIX
from pipeline.runs.parts import mined_image_ids
from pipeline.runs.record import code_version, ingest_roots, writer

# The formats: name -> its module, whose `write` and `verify` are the writer and its write-time check. The names
# a user may write are `pipeline.config.harvest.EXPORT_FORMATS` (a test holds them equal), checked without
# importing any of these.
FORMATS = {m.NAME: m for m in (coco, yolo, nih_csv, labelstudio, cvat)}
MANIFEST = "manifest.json"
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
       i.source_sha256, coalesce(lab.labels, []::VARCHAR[]) AS labels
FROM ids LEFT JOIN images i USING (image_id) LEFT JOIN lab USING (image_id)
ORDER BY ids.image_id
"""


def export_filters(min_score: float | None = None, ranks=(1,), findings=None, trust_floor: float | None = None) -> dict:
    """The filters of an export as its `manifest.json` records them (normalized: a float, sorted lists).
    `trust_floor`: the estimated Acc a finding needs (pipeline.evaluation.trust), None: every finding."""
    return {"min_score": None if min_score is None else float(min_score),
            "ranks": None if ranks is None else sorted({int(r) for r in ranks}),
            "findings": None if findings is None else sorted({normalize_finding(f) for f in findings},
                                                              key=INDEX.__getitem__),
            "trust_floor": None if trust_floor is None else float(trust_floor)}


def export(home, run_id: str, fmt: str, out_dir, min_score: float | None = None,
           ranks: tuple[int, ...] | None = (1,), findings=None, images: str = "link",
           image_roots=(), url_prefix: str = URL_PREFIX, trust_floor: float | None | str = "default") -> Path:
    """Export the boxes of run `run_id` as `fmt` into the folder `out_dir`; return that folder.

    Filters: `min_score` keeps boxes with score >= it; `ranks` keeps those box ranks (None: all ranks;
    the default keeps the top box per image and finding); `findings` keeps those findings (any spelling
    that :func:`pipeline.base.vocab.normalize_finding` accepts). `images`: link | copy | none (module docstring);
    `image_roots`: folders searched for the source files before the recorded ingest roots; `url_prefix`
    (labelstudio): what `data.image` starts with, before the image's path. `trust_floor`: keep only the findings
    whose estimated Acc (pipeline.evaluation.trust, measured on the run's tuning set, never on evaluation boxes)
    reaches it, and their boxes with score >= their tuned minimum; None keeps every finding; "default" is
    `trust.FLOOR` for the pseudo-label formats and None for the review formats. An existing export at `out_dir`
    is replaced.
    """
    home = home if isinstance(home, Home) else Home.resolve(home)
    out_dir = Path(out_dir).expanduser().resolve()
    _check_replaceable(out_dir)
    if trust_floor == "default":
        from pipeline.evaluation.trust import FLOOR
        trust_floor = FLOOR if trusted_by_default(fmt) else None
    filters = export_filters(min_score, ranks, findings, trust_floor)
    con = writer(home)   # one connection for the whole read (trust may be measured and stored on it)
    try:
        rows, raw_boxes, trace, files = preflight(home, run_id, fmt, images, image_roots, filters, con=con)
    finally:
        con.close()
    boxes = [c for b in raw_boxes if (c := _clip(b, rows[b["image_id"]]))]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write, verify = FORMATS[fmt].write, FORMATS[fmt].verify
        if fmt == "labelstudio":   # predictions name the run; the check reads them back into these boxes
            write = partial(write, run_id=run_id, url_prefix=url_prefix)
            verify = partial(verify, boxes=boxes, url_prefix=url_prefix)
        elif fmt == "cvat":
            write, verify = partial(write, run_id=run_id), partial(verify, boxes=boxes)
        counts = write(tmp, list(rows.values()), boxes, files, out_dir)
        counts["dropped_outside_frame"] = len(raw_boxes) - len(boxes)
        verify(tmp, files)
        manifest = {"format": fmt, **trace, "filters": filters, "counts": counts,
                    "images": files.summary(),
                    "code_version": code_version(),
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "files": _label_files(tmp, files)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _swap_into_place(tmp, out_dir)
    finally:
        files.close()
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap `tmp` holds the old export
    return out_dir


def preflight(home, run_id: str, fmt: str, images: str = "link", image_roots=(), filters: dict | None = None,
              con=None):
    """What `export` checks before it writes anything: the format, the image mode, and that every source image
    is found (one-line errors naming the fix). Returns the run's images, boxes, trace and `ImageFiles`. Reads on
    `con` when given, else on a writable connection of its own (`writer`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if images not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {images!r}; choose one of {', '.join(IMAGE_MODES)}")
    if fmt == "yolo" and images == "none":
        raise ValueError("YOLO readers find a label by replacing /images/ with /labels/ in its image's path, "
                         "so a YOLO export needs its images: use --images link or copy")
    home = home if isinstance(home, Home) else Home.resolve(home)
    filters = filters or {"min_score": None, "ranks": None, "findings": None}
    own = con is None
    con = writer(home) if own else con
    try:
        rows, raw_boxes, trace, roots = _read_run(con, home, run_id, filters, pseudonyms=fmt == "nih-csv")
        splits = sorted({im["split"] for im in rows.values()})
        if fmt == "yolo" and "train" not in splits:
            raise ValueError(f"run {run_id!r} mined no train image (only {', '.join(splits)}), and a YOLO dataset "
                             "trains on train: mine the train split too, or export coco")
        files = ImageFiles.locate(home, list(rows.values()), images, [*map(Path, image_roots or ()), *roots], con)
    finally:
        if own:
            con.close()
    return rows, raw_boxes, trace, files


def _read_run(con, home: Home, run_id: str, filters: dict, pseudonyms: bool):
    """Images (id -> row), filtered boxes, the run/model trace and the recorded ingest roots, read on `con`."""
    run = _row(con, "SELECT run_id, flow, params, model_id, code_version, status, started_at, finished_at "
                    "FROM runs WHERE run_id = ?", run_id)
    if run is None:
        raise ValueError(f"run {run_id!r} is not in the runs table of {home.warehouse}; "
                         "list runs with `SELECT * FROM runs` and pass one that mined boxes")
    trusted = filters.get("trust_floor") is not None   # then each finding's rule picks its rank
    boxes = _dicts(con.execute(_BOXES_SQL, {"run_id": run_id, "min_score": filters.get("min_score"),
                                            "ranks": None if trusted else filters.get("ranks"),
                                            "findings": filters.get("findings")}))
    trust = {"applied": False, "reason": "no trust floor: `--all`, or a format for review (labelstudio, cvat)"}
    if trusted:
        from pipeline.evaluation.trust import gate, keep, manifest_entry   # pandas: only when trust applies
        rules = gate(con, run_id, filters["trust_floor"])
        ranks = filters.get("ranks")
        boxes = keep(boxes, rules) if rules is not None else \
            [b for b in boxes if ranks is None or b["rank"] in ranks]
        trust = manifest_entry(rules)
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
    for record in (run, model):
        for key in ("params", "config"):
            if record is not None and isinstance(record.get(key), str):
                record[key] = json.loads(record[key])  # DuckDB JSON columns come back as text
    has_val = con.execute("SELECT count(*) FROM images WHERE split = 'val'").fetchone()[0] > 0
    roots = ingest_roots(con, home)
    splits = _assign_splits(images, model, has_val)
    salt = None
    if pseudonyms:
        from pipeline.images.dicom import pseudonym
        from pipeline.ingest.dicom import home_salt
        salt = home_salt(home)
    for im in images:  # the patient id never leaves this function; NIH CSV gets a keyed pseudonym
        patient = im.pop("patient_id")
        im["patient"] = pseudonym("patient", patient, salt) if pseudonyms else None
    trace = {"run_id": run_id, "model_id": model_id, "run": run, "model": model, "box_model_ids": model_ids,
             "splits": splits, "trust": trust}
    return {im["image_id"]: im for im in images}, boxes, trace, roots


def _assign_splits(images: list[dict], model: dict | None, has_val: bool) -> dict:
    """Set each image's export split as the mining model's training drew it (`pipeline.training.stages.split_ids`):
    with a `val` split in the warehouse, the stored split; else the `train` patients that the model's training
    config (its `seed` and `data.val_fraction`, or TrainConfig's defaults where the model records none) held out
    become `val`. `test`, the evaluation split, is never moved. Returns the manifest's account of it."""
    is_val, how = validation_rule(model, has_val)
    for im in images:
        if not has_val and is_val(im["patient_id"], im["split"]):
            im["split"] = "val"
    return {"val": how, "test": "the evaluation split, as stored: never train or val"}


def _label_files(tmp: Path, files: ImageFiles) -> dict[str, str]:
    """Relative path -> sha256 of every file of the export but its images (the warehouse's `source_sha256` names
    those): not under `images/` nor under an image folder the format wrote (CVAT's `<split>/images/`)."""
    image_dirs = ("images/", *(f"{sub}/" for sub in files.folders if files.mode != "none"))
    return {rel: sha256_file(p) for p in sorted(tmp.rglob("*"))
            if p.is_file() and not (rel := p.relative_to(tmp).as_posix()).startswith(image_dirs)}


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


# ------------------------------------------------------------------------------------------ writers

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
