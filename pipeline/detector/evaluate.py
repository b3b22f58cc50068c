"""Detector boxes vs the mined boxes they learned from, on held-out images with phantom truth.

The evaluation images are the detector run's images that the detector never trained on (its checkpoint lists
its training images), that the mining run also covered; the ground truth is `gt_boxes.source = 'truth'` on
them, boxed findings only. Scored on exactly these images: `am`, the mining run's boxes (every rank), `targets`,
the same boxes under the detector's training filter (`boxes.ranks`, `min_score`, `findings`: what it learned
from), and `detector`, the detector run's boxes:

- the Wang/Cai protocol, mode `all`, IoU family (`all/iou@truth`: Acc and AFP at T = 0.1..0.7; per-image
  counts of `pipeline.evaluation.bootstrap`, equal to `pipeline.evaluation.protocol`'s numbers);
- COCO detection metrics with pycocotools (`COCOeval`, bbox, maxDets 100, area `all`): AP at IoU 0.3 (AP30),
  0.5 (AP50) and mAP over 0.5:0.95, per finding;
- 95 % bootstrap intervals: images resampled with replacement (`n_boot` times, seeded), every metric of both
  runs computed on the same resample, so `detector - am` and `detector - targets` get paired intervals. COCO
  matching is done once (`COCOeval.evaluate`); each resample re-accumulates it with the images' multiplicities.
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.base.home import Home
from pipeline.base.vocab import BOXED_FINDINGS, FINDINGS, INDEX
from pipeline.evaluation.bootstrap import AccCounts, acc_counts, acc_values
from pipeline.evaluation.protocol import IOU_THRESHOLDS
from warehouse import db

COCO_IOUS = np.round(np.concatenate([[0.3], np.linspace(0.5, 0.95, 10)]), 2)   # AP30, then COCO's ten
REC_THRS = np.linspace(0.0, 1.0, 101)
BOX_COLUMNS = ["image_id", "finding", "rank", "x", "y", "w", "h", "score"]
GT_COLUMNS = ["image_id", "finding", "x", "y", "w", "h"]


# ---------------------------------------------------------------- COCO, matched once, accumulated per resample

@dataclass
class CocoMatches:
    """Per finding: detections (score, image, matched per IoU threshold, ignored) and GT counts per image."""
    scores: dict[str, np.ndarray]
    det_image: dict[str, np.ndarray]
    matched: dict[str, np.ndarray]      # bool [T, D]
    ignored: dict[str, np.ndarray]      # bool [T, D]
    gt_per_image: dict[str, np.ndarray]  # int [N]: non-ignored GT boxes of the finding on each image


def coco_matches(boxes: pd.DataFrame, gt: pd.DataFrame, image_ids: list[str], findings) -> tuple[CocoMatches, object]:
    """Run pycocotools' matching (`COCOeval.evaluate`) once; returns its per-image results regrouped per finding,
    and the COCOeval object (its `accumulate` is the reference for :func:`coco_ap`)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    img_index = {iid: k for k, iid in enumerate(image_ids)}
    anns = [{"id": k + 1, "image_id": img_index[r.image_id], "category_id": INDEX[r.finding] + 1,
             "bbox": [float(r.x), float(r.y), float(r.w), float(r.h)], "area": float(r.w * r.h), "iscrowd": 0}
            for k, r in enumerate(gt.itertuples(index=False))]
    dataset = {"images": [{"id": k} for k in range(len(image_ids))], "annotations": anns,
               "categories": [{"id": INDEX[f] + 1, "name": f} for f in FINDINGS]}
    dets = [{"image_id": img_index[r.image_id], "category_id": INDEX[r.finding] + 1, "score": float(r.score),
             "bbox": [float(r.x), float(r.y), float(r.w), float(r.h)]} for r in boxes.itertuples(index=False)]
    with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets) if dets else COCO()
        if not dets:
            coco_dt.dataset = {"images": dataset["images"], "annotations": [], "categories": dataset["categories"]}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.iouThrs = COCO_IOUS
        ev.params.recThrs = REC_THRS
        ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.params.maxDets = [100]
        ev.params.imgIds = list(range(len(image_ids)))
        ev.params.catIds = [INDEX[f] + 1 for f in findings]
        ev.evaluate()
    out = CocoMatches({}, {}, {}, {}, {})
    n_img = len(image_ids)
    for k, f in enumerate(findings):
        entries = ev.evalImgs[k * n_img:(k + 1) * n_img]
        sc, im, mt, ig = [], [], [], []
        gt_n = np.zeros(n_img, dtype=np.int64)
        for i, e in enumerate(entries):
            if e is None:
                continue
            gt_n[i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            d = len(e["dtScores"][:100])
            if d:
                sc.append(np.asarray(e["dtScores"][:100], dtype=np.float64))
                im.append(np.full(d, i))
                mt.append(np.asarray(e["dtMatches"])[:, :100] > 0)
                ig.append(np.asarray(e["dtIgnore"])[:, :100].astype(bool))
        T = len(COCO_IOUS)
        out.scores[f] = np.concatenate(sc) if sc else np.zeros(0)
        out.det_image[f] = np.concatenate(im) if im else np.zeros(0, dtype=np.int64)
        out.matched[f] = np.concatenate(mt, axis=1) if mt else np.zeros((T, 0), dtype=bool)
        out.ignored[f] = np.concatenate(ig, axis=1) if ig else np.zeros((T, 0), dtype=bool)
        out.gt_per_image[f] = gt_n
    return out, ev


def coco_ap(m: CocoMatches, finding: str, weights: np.ndarray | None = None) -> np.ndarray:
    """AP per IoU threshold of `COCO_IOUS` for one finding, with each image counted `weights[i]` times (a
    bootstrap resample; None: once). `COCOeval.accumulate`'s computation: detections sorted by score
    (mergesort), precision made monotone, read at 101 recall points (0 past the last recall)."""
    n_gt = m.gt_per_image[finding]
    w = np.ones(len(n_gt), dtype=np.int64) if weights is None else weights
    npig = int((n_gt * w).sum())
    if npig == 0:
        return np.full(len(COCO_IOUS), np.nan)
    idx = np.repeat(np.arange(len(m.scores[finding])), w[m.det_image[finding]])
    order = idx[np.argsort(-m.scores[finding][idx], kind="mergesort")]
    dtm, dtig = m.matched[finding][:, order], m.ignored[finding][:, order]
    tp = np.cumsum(dtm & ~dtig, axis=1, dtype=np.float64)
    fp = np.cumsum(~dtm & ~dtig, axis=1, dtype=np.float64)
    nd = tp.shape[1]
    if nd == 0:
        return np.zeros(len(COCO_IOUS))
    rc = tp / npig
    pr = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
    ap = np.empty(len(COCO_IOUS))
    for t in range(len(COCO_IOUS)):
        inds = np.searchsorted(rc[t], REC_THRS, side="left")
        ap[t] = np.where(inds < nd, pr[t, np.minimum(inds, nd - 1)], 0.0).mean()
    return ap


def coco_summary(ap: np.ndarray) -> dict[str, float]:
    """AP30, AP50 and mAP@[.5:.95] from the APs at `COCO_IOUS`."""
    return {"ap30": float(ap[0]), "ap50": float(ap[1]), "map": float(np.mean(ap[1:]))}


# ---------------------------------------------------------------- both runs, with bootstrap intervals

def metrics(coco: CocoMatches, acc: AccCounts, findings, weights=None) -> dict[tuple[str, str], float]:
    """{(finding, metric): value} for metrics acc@T, afp@T, ap30, ap50, map; finding 'mean' averages the
    findings with GT boxes in this sample."""
    out = {}
    for f in findings:
        a, afp = acc_values(acc, f, weights)
        for t, v, e in zip(IOU_THRESHOLDS, a, afp):
            out[f, f"acc@{t:g}"], out[f, f"afp@{t:g}"] = float(v), float(e)
        out.update({(f, k): v for k, v in coco_summary(coco_ap(coco, f, weights)).items()})
    names = {m for _, m in out}
    for name in names:
        vals = [out[f, name] for f in findings if np.isfinite(out[f, name])]
        out["mean", name] = float(np.mean(vals)) if vals else np.nan
    return out


def compare(runs: dict[str, pd.DataFrame], gt: pd.DataFrame, image_ids: list[str], findings=BOXED_FINDINGS,
            n_boot: int = 1000, seed: int = 0, differences=()) -> pd.DataFrame:
    """Score each run's boxes (`runs`: name -> boxes) on `image_ids` against `gt`, and the paired differences
    `a - b` for each (a, b) of `differences`. Rows: finding, metric, method, value, lo, hi, n_gt, n_images."""
    findings = [f for f in findings if (gt["finding"] == f).any()]
    scored = {name: (coco_matches(b, gt, image_ids, findings)[0], acc_counts(b, gt, image_ids, findings))
              for name, b in runs.items()}
    point = {name: metrics(*s, findings) for name, s in scored.items()}
    rng = np.random.default_rng(seed)
    boots = {name: [] for name in runs}
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, len(image_ids), len(image_ids)), minlength=len(image_ids))
        for name, s in scored.items():
            boots[name].append(metrics(*s, findings, w))
    keys = list(point[next(iter(point))])
    methods = list(runs) + [f"{a} - {b}" for a, b in differences]

    def series(method: str, src: str) -> tuple[float, np.ndarray]:
        if " - " not in method:
            return point[method][src], np.array([b[src] for b in boots[method]])
        a, r = method.split(" - ")
        return (point[a][src] - point[r][src],
                np.array([x[src] - y[src] for x, y in zip(boots[a], boots[r])]))

    gt_n = gt.groupby("finding").size()
    img_n = gt.groupby("finding")["image_id"].nunique()
    rows = []
    for key in keys:
        f, metric = key
        for method in methods:
            value, samples = series(method, key)
            samples = samples[np.isfinite(samples)]
            lo, hi = np.percentile(samples, [2.5, 97.5]) if len(samples) else (np.nan, np.nan)
            rows.append((f, metric, method, value, float(lo), float(hi),
                         int(gt_n.get(f, gt_n.sum() if f == "mean" else 0)),
                         int(img_n.get(f, gt["image_id"].nunique() if f == "mean" else 0))))
    return pd.DataFrame(rows, columns=["finding", "metric", "method", "value", "lo", "hi", "n_gt", "n_images"])


# ---------------------------------------------------------------- from the warehouse

def evaluation_set(home, detector_run: str, baseline_run: str | None = None) -> dict:
    """The held-out images, their truth, and both runs' boxes on them (see the module doc)."""
    import torch

    from pipeline.runs.parts import mined_image_ids
    home = Home.resolve(home)
    con = db.connect(home, read_only=True)
    try:
        row = con.execute("SELECT params FROM runs WHERE run_id = ?", [detector_run]).fetchone()
        if row is None:
            raise ValueError(f"no run {detector_run!r} in {home.warehouse}; pass the run `harvest detector "
                             "predict` printed")
        params = json.loads(row[0] or "{}")
        if "detector" not in params:
            raise ValueError(f"run {detector_run!r} is not a detector run (`harvest detector predict` writes them)")
        model = con.execute("SELECT checkpoint FROM models WHERE model_id = ?", [params["detector"]]).fetchone()
        baseline_run = baseline_run or params["mining_run"]
        truth = con.execute(f"SELECT {', '.join(GT_COLUMNS)} FROM gt_boxes WHERE source = 'truth'").df()
        boxes = {run: con.execute(f"SELECT {', '.join(BOX_COLUMNS)} FROM mined_boxes WHERE run_id = ?",
                                  [run]).df() for run in (detector_run, baseline_run)}
    finally:
        con.close()
    if model is None:
        raise ValueError(f"detector {params['detector']!r} of run {detector_run!r} is not in the models table")
    meta = torch.load(home.root / model[0], map_location="cpu", weights_only=True, mmap=True)["meta"]
    trained = set(meta["train_images"])
    images = sorted((set(mined_image_ids(home, detector_run)) & set(mined_image_ids(home, baseline_run)))
                    - trained)
    truth = truth[truth["image_id"].isin(set(images))]
    if truth.empty:
        raise ValueError(f"no phantom truth (gt_boxes.source = 'truth') on the {len(images)} held-out images of "
                         f"run {detector_run!r}; predict on images the detector did not train on, e.g. --split test")
    keep = set(images)
    boxes = {run: b[b["image_id"].isin(keep)].reset_index(drop=True) for run, b in boxes.items()}
    return {"images": images, "truth": truth.reset_index(drop=True), "boxes": boxes, "baseline_run": baseline_run,
            "mining_run": params["mining_run"], "boxes_filter": meta["config"]["boxes"],
            "detector": params["detector"], "trained_overlap": len(trained & set(mined_image_ids(home, detector_run)))}


def evaluate_detector(home, detector_run: str, baseline_run: str | None = None, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Detector run vs its mining run on held-out truth; returns the table (`compare`) and what was compared."""
    s = evaluation_set(home, detector_run, baseline_run)
    am = s["boxes"][s["baseline_run"]]
    runs = {"am": am, "detector": s["boxes"][detector_run]}
    differences = [("detector", "am")]
    if s["baseline_run"] == s["mining_run"]:   # the boxes it learned from: the run's, under its training filter
        f = s["boxes_filter"]
        keep = am["rank"].isin(f["ranks"]) & (am["score"] >= f["min_score"])
        runs["targets"] = am[keep & (am["finding"].isin(f["findings"]) if f["findings"] else keep)]
        differences.append(("detector", "targets"))
    table = compare(runs, s["truth"], s["images"], n_boot=n_boot, seed=seed, differences=differences)
    return {"table": table, "images": len(s["images"]), "detector_run": detector_run,
            "baseline_run": s["baseline_run"], "detector": s["detector"], "n_boot": n_boot,
            "excluded_training_images": s["trained_overlap"]}


def markdown(table: pd.DataFrame, metrics_shown=("acc@0.3", "ap30", "ap50", "map"),
             methods=("am", "targets", "detector", "detector - am", "detector - targets")) -> str:
    """One table per metric: a row per finding (and their mean), each method's `value [lo, hi]`."""
    methods = [m for m in methods if m in set(table["method"])]
    out = []
    for metric in metrics_shown:
        t = table[(table["metric"] == metric) & table["method"].isin(methods)]
        lines = [f"**{metric}**", "", "| finding | n_gt | " + " | ".join(methods) + " |",
                 "|---|---|" + "---|" * len(methods)]
        for f in [*[f for f in BOXED_FINDINGS if f in set(t["finding"])], "mean"]:
            r = t[t["finding"] == f].set_index("method")
            cells = [f"{r.loc[m, 'value']:.2f} [{r.loc[m, 'lo']:.2f}, {r.loc[m, 'hi']:.2f}]"
                     if np.isfinite(r.loc[m, "value"]) else "-" for m in methods]
            lines.append(f"| {f} | {int(r['n_gt'].iloc[0])} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)
