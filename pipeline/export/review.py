"""The review loop: boxes corrected by people come back as `gt_boxes` rows with source `review` (docs/architecture.md).

`import_review(home, file)` reads a Label Studio JSON export (each task's latest annotation that was not
cancelled; tasks with predictions only were not reviewed), a CVAT for images 1.1 XML file (or CVAT's zip of it) or
a COCO file (CVAT's "COCO 1.0" export among them, as JSON or the zip); in the last two every listed image counts as
reviewed. The mining run whose boxes were reviewed is `run_id`, else the one the file names (`file_run`), else
the home's only mining run. Boxes are converted to pixels of the image's frame
in the warehouse (`images.width/height`) and stored, in one transaction, as the image's review: they replace
the boxes of its earlier review, and `reviews` records the file (a reviewed image without a box is a reviewed
negative). Bad input is a `rejects` row (stage `review`) and the rest goes on; an image with a bad box is not
imported at all (a partial review would read as "no more boxes here"), its earlier review stays.

`reviewed(con)` is what training and evaluation read.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.base.files import sha256_file
from pipeline.base.home import Home
from pipeline.base.vocab import NO_FINDING, UnknownFinding, normalize_finding
from pipeline.export import coco, cvat, labelstudio
from pipeline.export.common import MalformedFile, ReviewItem, positive
from pipeline.runs.record import writer
from warehouse.db import add_reject, transaction

FORMATS = ("auto", "labelstudio", "cvat", "coco")
STAGE = "review"
EDGE_PX = 1e-3          # a box may cross its frame by this much (rounding of percent coordinates), then is clipped
ASPECT_TOLERANCE = 0.01


def reviewed(con) -> tuple[pd.DataFrame, set[str]]:
    """The reviewed boxes `[image_id, finding, x, y, w, h]` (pixels of the image frame) and the set of reviewed
    image ids; a reviewed id without a box is a reviewed negative. Empty on a home without reviews."""
    if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'reviews'").fetchone()[0]:
        return pd.DataFrame(columns=["image_id", "finding", "x", "y", "w", "h"]), set()
    boxes = con.execute("SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE source = 'review' "
                        "ORDER BY image_id, finding, x, y, w, h").df()
    return boxes, {r[0] for r in con.execute("SELECT image_id FROM reviews").fetchall()}


# ------------------------------------------------------------------------------------------ reading files

def load(path: Path):
    """The JSON or XML of `path`; for a zip (a CVAT export), the list of its XML files (CVAT for images 1.1) or else
    of its `annotations/instances_*.json` (COCO 1.0)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            xml = sorted(n for n in z.namelist() if n.endswith(".xml"))
            names = xml or sorted(n for n in z.namelist() if Path(n).name.startswith("instances_")
                                  and n.endswith(".json"))
            if not names:
                raise ValueError(f"{path}: a zip without annotations.xml or annotations/instances_<subset>.json "
                                 "(export CVAT for images 1.1 or COCO 1.0 from CVAT)")
            return [_parse(z.read(n), f"{path}:{n}") for n in names]
    return _parse(path.read_bytes(), str(path))


def _parse(raw: bytes, where: str):
    try:
        return ET.fromstring(raw) if raw.lstrip()[:1] == b"<" else json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, ET.ParseError) as exc:
        raise ValueError(f"{where} is neither JSON nor XML ({exc}); pass a Label Studio JSON export, a CVAT for "
                         "images 1.1 file or a COCO file") from None


def detect(data) -> str:
    """`labelstudio` for a list of tasks (or one task), `cvat` for XML (or a zip's list of it), `coco` for a COCO
    object (or a zip's list of them)."""
    if isinstance(data, ET.Element) or (isinstance(data, list) and data and isinstance(data[0], ET.Element)):
        return "cvat"
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, list) and data and all(isinstance(d, dict) and "images" in d for d in data):
        return "coco"
    if isinstance(data, list) or (isinstance(data, dict) and "data" in data):
        return "labelstudio"
    raise MalformedFile("neither a Label Studio export (a list of tasks) nor a COCO file (images, annotations)")


READERS = {"labelstudio": labelstudio.review_items, "cvat": cvat.review_items, "coco": coco.review_items}


# ------------------------------------------------------------------------------------------ importing

def import_review(home, path, fmt: str = "auto", run_id: str | None = None) -> dict:
    """Import the reviewed boxes of `path` (module docstring); returns counts: `images` reviewed and stored,
    `boxes`, `negatives`, `rejects` rows and `rejected_images` (not stored), plus `format`, `file`, `sha256`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown review format {fmt!r}; choose one of {', '.join(FORMATS)}")
    home = home if isinstance(home, Home) else Home.resolve(home)
    if not home.warehouse.exists():
        raise FileNotFoundError(f"no warehouse at {home.warehouse}; import reviews into the home that exported them")
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no review file {path}")
    data, sha = load(path), sha256_file(path)
    problems, items = [], []
    try:
        fmt = detect(data) if fmt == "auto" else fmt
        items = READERS[fmt](data)
    except (MalformedFile, ValueError) as exc:
        problems.append(("malformed_file", f"{exc}; nothing was imported from this file", None))
    con = writer(home)
    try:
        if items:
            run_id = review_run(con, labelstudio.model_versions(data) if fmt == "labelstudio" else set(), run_id)
        with transaction(con):
            stored = _store(con, path, sha, fmt, run_id, items, problems)
    finally:
        con.close()
    if problems and problems[0][0] == "malformed_file":
        raise MalformedFile(f"{path}: {problems[0][1]} (recorded in rejects)")
    return {"file": str(path), "sha256": sha, "format": fmt, "run_id": run_id, **stored}


def review_run(con, named: set[str], run_id: str | None = None) -> str | None:
    """The mining run whose boxes were reviewed: `run_id` when given, else the one run the file names (`named`: a
    Label Studio export's model_version), else the home's only run with mined boxes (None on a home without one).
    A ValueError, in one line naming the fix, when the file names several runs or one without mined boxes, or
    names none while the home has several."""
    if run_id:
        return run_id
    mined = [r[0] for r in con.execute("SELECT DISTINCT run_id FROM mined_boxes ORDER BY 1").fetchall()]
    if len(named) > 1 or (named and not set(named) & set(mined)):
        raise ValueError(f"the file's predictions name {', '.join(sorted(named))}, not one mining run of this home: "
                         "pass --run RUN_ID (`harvest status` lists runs)")
    if not named and len(mined) > 1:
        raise ValueError(f"the file names no mining run and this home has {len(mined)} ({', '.join(mined[:3])}"
                         f"{', ...' if len(mined) > 3 else ''}): pass --run RUN_ID, the run whose boxes were reviewed")
    return next(iter(named), mined[0] if mined else None)


def _store(con, path: Path, sha: str, fmt: str, run_id, items: list[ReviewItem], problems: list) -> dict:
    """One transaction: this file's earlier rejects replaced by today's, then each good image's review."""
    frames = {}
    wanted = sorted({n for item in items for n in item.names})
    if wanted:
        frames = {iid: (w, h) for iid, w, h in con.execute(
            "SELECT image_id, width, height FROM images WHERE image_id IN (SELECT unnest(?))", [wanted]).fetchall()}
    accepted: dict[str, list[tuple]] = {}
    first_where: dict[str, str] = {}
    rejected = 0
    for item in items:
        image_id = next((n for n in item.names if n in frames), None)
        if image_id is None and not item.problems:
            item.bad("unknown_image", f"no image {item.names[0] if item.names else '(no name)'!r} in the warehouse; "
                                      "review exports of this home's runs (data.image_id or the file name names it)")
        elif image_id in first_where:
            item.bad("duplicate_image", f"{image_id} is reviewed again in this file; only its first review "
                                        f"({first_where[image_id]}) is read")
        if image_id is not None:
            first_where.setdefault(image_id, item.where)
        rows = [] if item.problems else _pixels(item, image_id, frames[image_id])
        if item.problems:
            keep = f"; {image_id} is not imported (an earlier review of it stays)" \
                if image_id and image_id not in accepted else ""
            problems += [(reason, detail + keep, where) for reason, detail, where in item.problems]
            rejected += 1
            continue
        accepted[image_id] = rows
    con.execute("DELETE FROM rejects WHERE stage = ? AND source = ?", [STAGE, str(path)])
    for reason, detail, where in problems:
        add_reject(con, STAGE, str(path), where, reason, detail)
    if accepted:
        ids = sorted(accepted)
        boxes = pd.DataFrame([(iid, *box) for iid in ids for box in accepted[iid]],
                             columns=["image_id", "finding", "x", "y", "w", "h"]).astype({c: float for c in "xywh"})
        images = pd.DataFrame({"image_id": ids, "n_boxes": [len(accepted[i]) for i in ids]})
        con.register("_review_boxes", boxes)
        con.register("_review_images", images)
        con.execute("DELETE FROM gt_boxes WHERE source = 'review' "
                    "AND image_id IN (SELECT image_id FROM _review_images)")
        con.execute("INSERT INTO gt_boxes SELECT image_id, finding, x, y, w, h, 'review' FROM _review_boxes")
        con.execute("INSERT OR REPLACE INTO reviews SELECT image_id, ?, ?, ?, ?, n_boxes, now() FROM _review_images",
                    [str(path), sha, fmt, run_id])
        con.unregister("_review_boxes")
        con.unregister("_review_images")
    return {"images": len(accepted), "boxes": sum(map(len, accepted.values())),
            "negatives": sum(not b for b in accepted.values()), "rejects": len(problems),
            "rejected_images": rejected}


def _pixels(item: ReviewItem, image_id: str, frame: tuple[int, int]) -> list[tuple]:
    """The item's boxes as (finding, x, y, w, h) in pixels of the warehouse frame, float32-exact; problems are
    recorded on the item."""
    W, H = frame
    if item.frame is not None and positive(*item.frame):
        fw, fh = item.frame
        if abs((fw / fh) / (W / H) - 1) > ASPECT_TOLERANCE:
            item.bad("frame_mismatch", f"the file's image is {fw}x{fh}, but {image_id} is {W}x{H} in the warehouse: "
                                       "not the same picture")
            return []
    sw, sh = item.scale
    rows = []
    for b in item.boxes:
        try:
            finding = normalize_finding(str(b["finding"]))
            if finding == NO_FINDING:
                raise UnknownFinding(f"{NO_FINDING!r} is not a box label")
        except UnknownFinding as exc:
            item.bad("unknown_finding", str(exc), b["where"])
            continue
        x0, y0 = b["x"] * W / sw, b["y"] * H / sh
        x1, y1 = x0 + b["w"] * W / sw, y0 + b["h"] * H / sh
        if not (-EDGE_PX <= x0 < x1 <= W + EDGE_PX and -EDGE_PX <= y0 < y1 <= H + EDGE_PX):
            item.bad("box_outside_frame", f"{finding} box x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f} is empty or "
                                          f"leaves the {W}x{H} frame", b["where"])
            continue
        x0, x1 = np.clip([x0, x1], 0, W)
        y0, y1 = np.clip([y0, y1], 0, H)
        rows.append((finding, *(float(np.float32(v)) for v in (x0, y0, x1 - x0, y1 - y0))))
    return rows
