"""Label Studio: a mining run's boxes as tasks with predictions, and the reviewed boxes of Label Studio's JSON export.

Formats (labelstud.io/guide/task_format and /guide/predictions): a task is `{"data": {...}, "predictions":
[{"model_version", "score", "result": [...]}]}`; Label Studio's JSON export adds `"annotations": [{"result",
"was_cancelled", "created_at", "updated_at", ...}]`. A box is a result item `{"id", "type": "rectanglelabels",
"from_name", "to_name", "original_width", "original_height", "image_rotation", "value": {"x", "y", "width",
"height", "rotation", "rectanglelabels": [finding]}}`, its x, y, width and height in percent of the image.

`data.image` is `url_prefix` + the image's path, URL-quoted: by default Label Studio's local-files URL, the path
relative to the export folder (`--images link|copy`) or to the recorded image root (`--images none`), which is
the folder to serve as `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`. `data.image_id` names the warehouse image.
"""
from __future__ import annotations

import hashlib
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

import numpy as np

from pipeline.base.vocab import FINDINGS
from pipeline.export.common import ImageFiles, ReviewItem, by_split, counts, name_candidates

NAME = "labelstudio"
FROM_NAME, TO_NAME = "finding", "image"          # the RectangleLabels and Image tags of label_config.xml
URL_PREFIX = "/data/local-files/?d="            # Label Studio's local-files serving
LABEL_CONFIG = "label_config.xml"
RECTANGLE = "rectanglelabels"


def label_config() -> str:
    """The labeling interface: the image, and rectangles labeled with one of the 14 findings (no rotation)."""
    labels = "".join(f'    <Label value="{name}"/>\n' for name in FINDINGS)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <RectangleLabels name="{FROM_NAME}" toName="{TO_NAME}" canRotate="false">\n{labels}'
            "  </RectangleLabels>\n</View>\n")


def to_percent(v: float, size: float) -> float:
    return float(v) * 100.0 / size


def from_percent(p: float, size: float) -> float:
    return float(p) * size / 100.0


def result_id(run_id: str, image_id: str, finding: str, rank: int) -> str:
    """A region id that stays the same across exports of the same box (Label Studio ids are short strings)."""
    return hashlib.sha256(f"{run_id}\0{image_id}\0{finding}\0{rank}".encode()).hexdigest()[:10]


def rectangle(box: dict, width: int, height: int, run_id: str) -> dict:
    """One mined box as a Label Studio rectangle result, with its score."""
    return {"id": result_id(run_id, box["image_id"], box["finding"], int(box["rank"])), "type": RECTANGLE,
            "from_name": FROM_NAME, "to_name": TO_NAME, "original_width": int(width), "original_height": int(height),
            "image_rotation": 0, "score": float(np.float32(box["score"])),
            "value": {"x": to_percent(box["x"], width), "y": to_percent(box["y"], height),
                      "width": to_percent(box["w"], width), "height": to_percent(box["h"], height),
                      "rotation": 0, "rectanglelabels": [box["finding"]]}}


def image_url(path: str, url_prefix: str = URL_PREFIX) -> str:
    return url_prefix + quote(path, safe="/")


def image_path(url: str, url_prefix: str = URL_PREFIX) -> str | None:
    """The path `image_url` put into `url` (None when `url` has another prefix)."""
    return unquote(url[len(url_prefix):]) if url.startswith(url_prefix) else None


def task(im: dict, url: str, boxes: list[dict], run_id: str) -> dict:
    """A task for one image: its URL and id, and one prediction (model_version = the mining run) of its boxes."""
    results = [rectangle(b, im["width"], im["height"], run_id) for b in boxes]
    return {"data": {"image": url, "image_id": im["image_id"], "split": im["split"]},
            "predictions": [{"model_version": run_id, "score": max((r["score"] for r in results), default=0.0),
                             "result": results}]}


def verify(out: Path, files, boxes: list[dict], url_prefix: str = URL_PREFIX) -> None:
    """The labeling config names the 14 findings; every task has `data.image` and `data.image_id`, its image file
    resolves (unless --images none or another URL prefix), and its prediction, read back as a reviewer's
    annotation would be (`review_items`), gives the exported pixel boxes exactly (as float32, the boxes' type)."""
    root = ET.fromstring((out / LABEL_CONFIG).read_text())
    labels = [e.get("value") for e in root.iter("Label")]
    if root.find("RectangleLabels") is None or labels != list(FINDINGS):
        raise ValueError(f"{LABEL_CONFIG}: RectangleLabels must list the 14 findings, not {labels}")
    want = sorted((b["image_id"], b["finding"], *(float(np.float32(b[c])) for c in "xywh")) for b in boxes)
    got = []
    for path in sorted(out.glob("tasks_*.json")):
        tasks = json.loads(path.read_text())
        for item in review_items(tasks, use_predictions=True):
            data = tasks[item.index]["data"]
            if not data.get("image") or not data.get("image_id") or item.problems:
                raise ValueError(f"{path.name}: {item.where} lacks data.image or data.image_id, or has a bad result: "
                                 f"{item.problems[:1]}")
            local = image_path(data["image"], url_prefix)
            if files.mode != "none" and local is not None and not (out / local).is_file():
                raise ValueError(f"{path.name}: {item.where} names {data['image']}, not a file of the export")
            for b in item.boxes:
                W, H = item.frame
                got.append((data["image_id"], b["finding"], *(float(np.float32(from_percent(b[c], s)))
                                                              for c, s in zip("xywh", (W, H, W, H)))))
    if sorted(got) != want:
        diff = set(want) ^ set(got)
        raise ValueError(f"the tasks' predictions do not give back the {len(want)} exported boxes ({len(got)} read), "
                         f"e.g. {sorted(diff)[:1]}")


# ------------------------------------------------------------------------------------------ reading an export

def _url_name(url) -> str | None:
    """The file name a task's `data.image` URL points at (`?d=<path>` of local files, else the URL's path)."""
    if not isinstance(url, str):
        return None
    parsed = urlparse(url)
    d = parse_qs(parsed.query).get("d")
    return unquote(d[0] if d else parsed.path) or None


def latest_annotation(t: dict) -> dict | None:
    """The newest annotation not cancelled (skipped) by its annotator, by `updated_at` then list order."""
    anns = [(str(a.get("updated_at") or a.get("created_at") or ""), k, a)
            for k, a in enumerate(t.get("annotations") or []) if isinstance(a, dict) and not a.get("was_cancelled")]
    return max(anns, key=lambda x: x[:2])[2] if anns else None


def model_versions(tasks) -> set[str]:
    """The runs a Label Studio JSON export names: its tasks' predictions' `model_version` and, where the export lists
    predictions by id only, each annotation's `prediction.model_version` (the prediction its annotator saw)."""
    versions = set()
    for t in tasks if isinstance(tasks, list) else [tasks]:
        if isinstance(t, dict):
            seen = [*(t.get("predictions") or []), *(a.get("prediction") for a in t.get("annotations") or []
                                                     if isinstance(a, dict))]
            versions |= {p["model_version"] for p in seen if isinstance(p, dict)
                         and isinstance(p.get("model_version"), str) and p["model_version"]}
    return versions


def review_items(tasks, use_predictions: bool = False) -> list[ReviewItem]:
    """The reviewed images of a Label Studio JSON export: each task's latest annotation that was not cancelled
    (an empty one is a reviewed negative). Tasks without one were not reviewed and give nothing.
    `use_predictions` reads the first prediction instead (the export's own check)."""
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise ValueError("a Label Studio export is a JSON list of tasks")
    items = []
    for k, t in enumerate(tasks):
        if not isinstance(t, dict) or not isinstance(t.get("data"), dict):
            item = ReviewItem(k, f"task #{k}", [])
            item.bad("malformed", "a task is an object with a `data` object (export the project as JSON, "
                                  "not JSON-MIN or CSV)")
            items.append(item)
            continue
        ann = (t.get("predictions") or [None])[0] if use_predictions else latest_annotation(t)
        if not isinstance(ann, dict):
            continue
        data = t["data"]
        where = f"task {t.get('id', '#' + str(k))}"
        item = ReviewItem(k, where, name_candidates(data.get("image_id"), _url_name(data.get("image"))))
        results = ann.get("result")
        if not isinstance(results, list):
            item.bad("malformed", "the annotation has no `result` list")
        for r in results if isinstance(results, list) else []:
            _read_result(item, r)
        items.append(item)
    return items


def _read_result(item: ReviewItem, r) -> None:
    where = f"{item.where}, result {r.get('id') if isinstance(r, dict) else '?'}"
    if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
        item.bad("malformed", "a result is an object with a `value` object", where)
        return
    if r.get("type") != RECTANGLE:
        item.bad("unsupported_shape", f"result type {r.get('type')!r}: only rectanglelabels boxes are read", where)
        return
    v = r["value"]
    try:
        x, y, w, h = (float(v[k]) for k in ("x", "y", "width", "height"))
        rotation = float(v.get("rotation") or 0)
    except (KeyError, TypeError, ValueError):
        item.bad("malformed", f"value needs numeric x, y, width, height: {json.dumps(v)[:200]}", where)
        return
    labels = v.get(RECTANGLE)
    if not all(map(math.isfinite, (x, y, w, h, rotation))) or not isinstance(labels, list) or not labels:
        item.bad("malformed", f"value needs finite numbers and a rectanglelabels list: {json.dumps(v)[:200]}", where)
        return
    if rotation % 360:
        item.bad("rotated_box", f"the box is rotated by {rotation} degrees; only axis-aligned boxes are stored", where)
        return
    if "original_width" in r and "original_height" in r:
        item.frame = (r["original_width"], r["original_height"])
    for label in labels:
        item.boxes.append({"finding": label, "x": x, "y": y, "w": w, "h": h, "where": where})


# ------------------------------------------------------------------------------------------ writing

def write(out: Path, images: list[dict], boxes: list[dict], files: ImageFiles, _dest: Path, *,
          run_id: str, url_prefix: str = URL_PREFIX) -> dict:
    """Per split `tasks_<split>.json`: one task per image, its mined boxes as a prediction of model_version
    `run_id` (`task`); `label_config.xml`; images in `images/<split>/` (`data.image`: url_prefix +
    `images/<split>/<name>`; with --images none, + the path under the image root)."""
    per_image: dict[str, list[dict]] = {}
    for b in boxes:
        per_image.setdefault(b["image_id"], []).append(b)
    for split, ims in by_split(images).items():
        tasks = []
        for im in ims:
            name = files.place(im, out, f"images/{split}")
            path = name if files.mode == "none" else f"images/{split}/{name}"
            tasks.append(task(im, image_url(path, url_prefix), per_image.get(im["image_id"], []), run_id))
        # one task a line: readable, and json's C encoder (indent= takes its pure-Python one, 3x slower)
        (out / f"tasks_{split}.json").write_text("[\n" + ",\n".join(map(json.dumps, tasks)) + "\n]\n")
    (out / LABEL_CONFIG).write_text(label_config())
    return counts(images, boxes)
