"""What a user decides from (#22 item 4): Acc per finding with its n and 95 % interval, and what was harvested.

`acc_summary` is the Wang/Cai Acc of mode `all`, IoU family (Cai Table 3's protocol) on the widest truth a home
has: a phantom's exact boxes on every mined image (`@truth`), else people's review (`@review`), else the NIH
list's boxed subset. Intervals: 95 % bootstrap over images (pipeline.evaluation.bootstrap). `evaluate` prints
it; the long form (every protocol and T) stays in `eval_results` and the HTML report.
"""
from __future__ import annotations

import pandas as pd

from pipeline.base.vocab import FINDINGS
from pipeline.evaluation.bootstrap import acc_intervals

SUMMARY_TS = (0.1, 0.3, 0.5)


def protocol_of(gt_set: str) -> str:
    return "all/iou" + ("" if gt_set == "bbox_list" else f"@{gt_set}")


def acc_summary(boxes: pd.DataFrame, gt: pd.DataFrame, images: list[str] | None, gt_set: str,
                ts=SUMMARY_TS, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per finding with truth: `finding, n_gt, n_images`, then `acc@T, lo@T, hi@T` for each T in `ts`.
    `images`: the evaluation images (None: those with a box in `gt`). `attrs["protocol"]` names the protocol."""
    images = sorted(set(gt["image_id"])) if images is None else list(images)
    gt = gt[gt["image_id"].isin(set(images))]
    findings = [f for f in FINDINGS if f in set(gt["finding"])]
    ci = acc_intervals(boxes, gt, images, findings, n_boot=n_boot, seed=seed, thresholds=ts)
    ci["t"] = ci["t"].round(3)
    wide = ci.pivot(index="finding", columns="t", values=["acc", "lo", "hi"])
    wide.columns = [f"{v}@{t:g}" for v, t in wide.columns]
    counts = gt.groupby("finding").agg(n_gt=("image_id", "size"), n_images=("image_id", "nunique"))
    out = counts.join(wide).reindex(findings).reset_index()
    out.attrs["protocol"] = protocol_of(gt_set)
    return out


def harvest_summary(boxes: pd.DataFrame, n_mined: int) -> pd.DataFrame:
    """Per finding: images with a box, boxes of every rank, and the mean rank-1 score; `attrs["images"]` is
    the number of images the run mined."""
    rank1 = boxes[boxes["rank"] == 1]
    out = pd.DataFrame({
        "images": boxes.groupby("finding")["image_id"].nunique(),
        "boxes": boxes.groupby("finding").size(),
        "rank-1 score": rank1.groupby("finding")["score"].mean().round(3),
    }).reindex([f for f in FINDINGS if f in set(boxes["finding"])]).fillna(0)
    out = out.astype({"images": int, "boxes": int}).reset_index(names="finding")
    out.attrs["images"] = int(n_mined)
    return out


def formatted(summary: pd.DataFrame) -> pd.DataFrame:
    """`acc_summary` as strings: `Acc@T` cells read `0.45 [0.40, 0.50]`."""
    ts = [c.split("@", 1)[1] for c in summary.columns if c.startswith("acc@")]
    out = summary[["finding", "n_gt", "n_images"]].copy()
    for t in ts:
        out[f"Acc@{t}"] = [f"{a:.2f} [{lo:.2f}, {hi:.2f}]" if pd.notna(a) else "–"
                           for a, lo, hi in zip(summary[f"acc@{t}"], summary[f"lo@{t}"], summary[f"hi@{t}"])]
    return out
