"""95 % bootstrap intervals of the Wang/Cai Acc (mode `all`, IoU or IoBB family) over images.

Images are resampled with replacement (`n_boot` times, seeded); the hit and GT counts per image are computed
once and each resample reweights them by the images' multiplicities, so an interval costs milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.evaluation.iou import number_gt, overlap_pairs
from pipeline.evaluation.protocol import IOU_THRESHOLDS


@dataclass
class AccCounts:
    """Per finding, per evaluation image: GT boxes, GT boxes hit and FPs at each T (protocol mode `all`)."""
    n_gt: dict[str, np.ndarray]      # [N]
    hits: dict[str, np.ndarray]      # [N, T]
    fps: dict[str, np.ndarray]       # [N, T]


def acc_counts(boxes: pd.DataFrame, gt: pd.DataFrame, image_ids: list[str], findings,
               thresholds=IOU_THRESHOLDS, family: str = "iou") -> AccCounts:
    """Mode `all`: a GT box is hit when a box of its finding on its image overlaps it by more than T (`family`
    iou or iobb); a box on an image with GT of its finding that hits nothing is an FP; boxes on other images
    are not counted (protocol.py)."""
    pos = {iid: k for k, iid in enumerate(image_ids)}
    gt = number_gt(gt)
    pairs = overlap_pairs(boxes.assign(rank=boxes["rank"].astype(np.int64)), gt, family)
    t = np.asarray(thresholds)[None]
    out = AccCounts({}, {}, {})
    for f in findings:
        g = gt[gt["finding"] == f]
        n_gt = np.bincount(g["image_id"].map(pos), minlength=len(image_ids))
        p = pairs[pairs["finding"] == f]
        best_gt = p.groupby("gt_id")["overlap"].max()
        gt_img = g.set_index("gt_id")["image_id"].map(pos)
        hits = np.zeros((len(image_ids), t.shape[1]), dtype=np.int64)
        np.add.at(hits, gt_img.loc[best_gt.index].to_numpy(), (best_gt.to_numpy()[:, None] > t).astype(np.int64))
        b = boxes[(boxes["finding"] == f) & boxes["image_id"].isin(set(g["image_id"]))]
        best_box = p.groupby(["image_id", "rank"], as_index=False)["overlap"].max()
        b = b[["image_id", "rank"]].astype({"rank": np.int64}).merge(best_box, on=["image_id", "rank"], how="left")
        fps = np.zeros_like(hits)
        np.add.at(fps, b["image_id"].map(pos).to_numpy(np.int64),
                  (b["overlap"].fillna(0.0).to_numpy(np.float64)[:, None] <= t).astype(np.int64))
        out.n_gt[f], out.hits[f], out.fps[f] = n_gt, hits, fps
    return out


def acc_values(c: AccCounts, finding: str, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Acc, AFP) at each T, images weighted by their multiplicity in a resample."""
    n_gt = c.n_gt[finding]
    w = np.ones(len(n_gt), dtype=np.int64) if weights is None else weights
    total, n_img = (n_gt * w).sum(), ((n_gt > 0) * w).sum()
    if total == 0:
        nan = np.full(c.hits[finding].shape[1], np.nan)
        return nan, nan
    return (c.hits[finding] * w[:, None]).sum(0) / total, (c.fps[finding] * w[:, None]).sum(0) / n_img


def boot_acc(c: AccCounts, finding: str, weights: np.ndarray) -> np.ndarray:
    """Acc at each T for every resample at once, `[B, T]` from image multiplicities `weights` `[B, N]`: the
    matrix form of :func:`acc_values` (which stays the reference; a test holds them equal)."""
    n_gt = c.n_gt[finding]
    on = np.flatnonzero(n_gt)                       # only images with GT of the finding count
    w = weights[:, on].astype(np.float64)
    total = w @ n_gt[on]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ c.hits[finding][on]) / total[:, None]


def acc_intervals(boxes: pd.DataFrame, gt: pd.DataFrame, image_ids: list[str], findings, n_boot: int = 1000,
                  seed: int = 0, thresholds=IOU_THRESHOLDS, family: str = "iou") -> pd.DataFrame:
    """Rows `finding, t, acc, lo, hi, n_gt` for the findings with GT boxes on `image_ids`."""
    findings = [f for f in findings if (gt["finding"] == f).any()]
    counts = acc_counts(boxes, gt, image_ids, findings, thresholds, family)
    weights = resample_weights(len(image_ids), n_boot, seed)
    rows = []
    for f in findings:
        point = acc_values(counts, f)[0]
        boots = boot_acc(counts, f, weights)
        for k, t in enumerate(thresholds):
            samples = boots[:, k][np.isfinite(boots[:, k])]
            lo, hi = np.percentile(samples, [2.5, 97.5]) if len(samples) else (np.nan, np.nan)
            rows.append((f, float(t), float(point[k]), float(lo), float(hi), int(counts.n_gt[f].sum())))
    return pd.DataFrame(rows, columns=["finding", "t", "acc", "lo", "hi", "n_gt"])


def resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """`[n_boot, n]` multiplicities of `n` images in `n_boot` seeded resamples with replacement."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])
