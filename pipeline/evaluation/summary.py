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


def harvest_summary(boxes: pd.DataFrame, n_mined: int, trust: pd.DataFrame | None = None,
                    exports: list[tuple[str, str]] = ()) -> pd.DataFrame:
    """Per finding: images with a box, boxes of every rank, and the mean rank-1 score; with `trust` (rows of
    pipeline.evaluation.trust), the estimated Acc of the boxes its rule keeps on the tuning set, the rule (rank,
    score cut) and whether the pseudo-label exports keep the finding. `attrs`: `images` mined, `trust` (its source and floor, or None)
    and `exports` (format, folder) of the run's completed exports."""
    rank1 = boxes[boxes["rank"] == 1]
    out = pd.DataFrame({
        "images": boxes.groupby("finding")["image_id"].nunique(),
        "boxes": boxes.groupby("finding").size(),
        "rank-1 score": rank1.groupby("finding")["score"].mean().round(3),
    }).reindex([f for f in FINDINGS if f in set(boxes["finding"])]).fillna(0)
    out = out.astype({"images": int, "boxes": int}).reset_index(names="finding")
    if trust is not None:
        t = trust.set_index("finding").reindex(out["finding"])
        acc = f"est. Acc@{t['t'].dropna().iloc[0]:g} [95 %] (n)" if t["t"].notna().any() else "est. Acc"
        out[acc] = ["–" if pd.isna(a) else f"{a:.2f} [{lo:.2f}, {hi:.2f}] ({int(n)})"
                    for a, lo, hi, n in zip(t["acc"], t["lo"], t["hi"], t["n_gt"])]
        out["exported boxes"] = ["–" if pd.isna(r) else f"rank {int(r)}" + ("" if pd.isna(m) else f", score >= {m:.3f}")
                                 for r, m in zip(t["rank"], t["min_score"])]
        out["exported"] = ["yes" if k is True else "no" for k in t["kept"]]
    out.attrs["images"] = int(n_mined)
    out.attrs["trust"] = None if trust is None else {"source": trust["source"].iloc[0],
                                                     "floor": float(trust["floor"].iloc[0])}
    out.attrs["exports"] = list(exports)
    return out


def harvest_lines(harvest: pd.DataFrame) -> list[str]:
    """What the harvest table's attrs say, as sentences: how trust was measured, and where the exports are."""
    trust = harvest.attrs.get("trust")
    lines = [f"Trust: estimated on the tuning set `{trust['source']}` (never on evaluation boxes); the pseudo-label "
             f"exports keep a finding whose estimate reaches {trust['floor']:g}, with the boxes of its rule (one "
             f"rank, from a score up): {', '.join(harvest.loc[harvest['exported'] == 'yes', 'finding']) or 'none'}."
             if trust else "Trust: not measured (no tuning set: no validation truth, no reviewed "
             "boxes); exports keep every finding."]
    lines += [f"Exported {fmt}: {folder}" for fmt, folder in harvest.attrs.get("exports", [])] or \
        ["Exported: nothing yet (`harvest export --run ...`)."]
    return lines


def formatted(summary: pd.DataFrame) -> pd.DataFrame:
    """`acc_summary` as strings: `Acc@T` cells read `0.45 [0.40, 0.50]`."""
    ts = [c.split("@", 1)[1] for c in summary.columns if c.startswith("acc@")]
    out = summary[["finding", "n_gt", "n_images"]].copy()
    for t in ts:
        out[f"Acc@{t}"] = [f"{a:.2f} [{lo:.2f}, {hi:.2f}]" if pd.notna(a) else "–"
                           for a, lo, hi in zip(summary[f"acc@{t}"], summary[f"lo@{t}"], summary[f"hi@{t}"])]
    return out
