"""One self-contained HTML report per evaluation run, plus its PNG figures (DESIGN.md sections 4 and 6).

Figures (matplotlib, Agg canvas via `Figure`, so no global backend is switched):
- ``acc_vs_t.png``: per-finding Acc vs T(IoU) for our protocols, with Wang's Table 7 (dashed) and Cai's
  Table 3, KP at t=3 (dotted, T = 0.1 and 0.3 only) as reference lines;
- ``case_<finding>_<best|worst>_<image>.png``: Fig.-2-style panels, one per heatmap (t = 1..T, then H_f)
  over the image; ground-truth boxes in red on every panel, mined boxes in green on the H_f panel (they are
  made from H_f), with their rank.

The HTML embeds every PNG as base64 (it stays readable when moved alone); the PNGs are also written next to it.
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipeline.coords import scale_boxes
from pipeline.evaluation.iou import number_gt, overlap_pairs
from pipeline.evaluation.references import cai_table3, wang_table
from pipeline.vocab import BOXED_FINDINGS

GT_COLOR, MINED_COLOR = "red", "lime"


@dataclass
class Case:
    """One image and finding to draw. `heatmaps`: H_1..H_T then H_f, each [h, w] in [0, 1] covering the image.
    Boxes are xywh in `frame` (width, height; the original image frame), or in the `image` array's frame when
    `frame` is None. `mined_boxes` are in rank order."""
    image_id: str
    finding: str
    image: np.ndarray
    heatmaps: Sequence[np.ndarray]
    gt_boxes: np.ndarray
    mined_boxes: np.ndarray
    frame: tuple[float, float] | None = None
    label: str = ""                   # e.g. "best" / "worst"
    best_iou: float = math.nan
    caption: str = ""


def select_cases(boxes: pd.DataFrame, gt: pd.DataFrame, n: int = 1, findings=BOXED_FINDINGS) -> pd.DataFrame:
    """The `n` best and `n` worst images of I_c per finding, by the best IoU of any mined box with a GT box.

    Returns `finding, image_id, best_iou, label` ('best' / 'worst'); an image of I_c without boxes has IoU 0.
    """
    gt = number_gt(gt[gt["finding"].isin(findings)])
    pairs = overlap_pairs(boxes, gt, "iou")
    best = pairs.groupby(["finding", "image_id"])["overlap"].max()
    images = gt[["finding", "image_id"]].drop_duplicates().set_index(["finding", "image_id"])
    images["best_iou"] = best.reindex(images.index).fillna(0.0)
    out = []
    for c, g in images.reset_index().groupby("finding", sort=False):
        g = g.sort_values(["best_iou", "image_id"], ascending=[False, True])
        out += [g.head(n).assign(label="best"), g.tail(min(n, max(len(g) - n, 0))).iloc[::-1].assign(label="worst")]
    cols = ["finding", "image_id", "best_iou", "label"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def plot_acc_curves(results: pd.DataFrame, path, findings=BOXED_FINDINGS,
                    protocols=("bounded/iou", "all/iou")) -> Path:
    """Acc vs T(IoU), one panel per finding, with Wang 2017 and Cai 2018 (KP, t=3) reference lines."""
    wang, cai = wang_table(), cai_table3().query("group == 'KP' and setting == 'KP'")
    fig = Figure(figsize=(16, 7.5), layout="constrained")
    axes = fig.subplots(2, math.ceil(len(findings) / 2), sharex=True, sharey=True).ravel()
    for ax, c in zip(axes, findings):
        for p in protocols:
            r = results[(results["protocol"] == p) & (results["finding"] == c) & (results["metric"] == "acc")]
            ax.plot(r["t"], r["acc"], "o-", label=f"ours {p}")
        w = wang[wang["finding"] == c]
        ax.plot(w["t_iou"], w["acc"], "k--", label="Wang 2017 (Table 7)")
        k = cai[cai["finding"] == c]
        ax.plot(k["t_iou"], k["acc"], "s:", color="tab:purple", label="Cai 2018 (Table 3, KP t=3)")
        ax.set_title(c)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[len(findings):]:
        ax.set_visible(False)
    for ax in axes[-len(axes) // 2:]:
        ax.set_xlabel("T(IoU)")
    for ax in axes[::len(axes) // 2]:
        ax.set_ylabel("Acc")
    axes[0].legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def _draw_boxes(ax, boxes, color, ranks: bool = False) -> None:
    for i, (x, y, w, h) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=2))
        if ranks:
            ax.text(x + 2, y + 2, str(i + 1), color=color, fontsize=9, va="top", fontweight="bold")


def plot_case(case: Case, path) -> Path:
    """Fig.-2-style panels: each heatmap over the image, GT boxes red, mined boxes green (on H_f)."""
    img_h, img_w = case.image.shape[:2]
    to_img = (lambda b: scale_boxes(b, case.frame, (img_w, img_h))) if case.frame else (
        lambda b: np.asarray(b, dtype=np.float64).reshape(-1, 4))
    gt, mined = to_img(case.gt_boxes), to_img(case.mined_boxes)
    n = len(case.heatmaps)
    fig = Figure(figsize=(3.2 * n, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    for i, (ax, hm) in enumerate(zip(axes, case.heatmaps)):
        is_fused = i == n - 1
        ax.imshow(case.image, cmap="gray", vmin=0, vmax=255, extent=(0, img_w, img_h, 0))
        # opacity ramps up with the heat, so the image stays readable outside the salient area
        rgba = colormaps["jet"](np.clip(hm, 0, 1))
        rgba[..., 3] = 0.55 * np.clip(np.asarray(hm) / 0.25, 0, 1)
        ax.imshow(rgba, extent=(0, img_w, img_h, 0), interpolation="bilinear")
        _draw_boxes(ax, gt, GT_COLOR)
        if is_fused:
            _draw_boxes(ax, mined, MINED_COLOR, ranks=True)
        ax.set_title("$H_f$" if is_fused else f"$H_{i + 1}$ (t={i + 1})")
        ax.set_axis_off()
    sub = f" [{case.label}]" if case.label else ""
    iou = "" if math.isnan(case.best_iou) else f", best IoU {case.best_iou:.2f}"
    fig.suptitle(f"{case.finding} on {case.image_id}{sub}{iou}: GT red, mined green", fontsize=10)
    return _save(fig, path)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


def results_tables(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per protocol, a T x finding table of cells "Acc-AFP" (Cai Table 2 style; AFP omitted where undefined);
    MaxBoxAcc tables end with the V2 mean over IoU thresholds."""
    out = {}
    for (protocol, metric), r in results.groupby(["protocol", "metric"], sort=False):
        cell = r["acc"].map(lambda a: "–" if pd.isna(a) else f"{a:.2f}")
        cell = cell + r["afp"].map(lambda a: "" if pd.isna(a) else f"-{a:.2f}")
        wide = r.assign(cell=cell).pivot(index="t", columns="finding", values="cell")
        if metric == "maxboxacc":   # MaxBoxAccV2 headline: the mean over the IoU thresholds
            mean = r.pivot(index="t", columns="finding", values="acc").mean()
            wide.loc["V2 mean"] = mean.map(lambda a: "–" if pd.isna(a) else f"{a:.2f}")
        out[f"{protocol} ({metric})"] = wide.reindex(columns=[c for c in BOXED_FINDINGS if c in wide.columns])
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def write_report(out_dir, run_id: str, results: pd.DataFrame, cases: Sequence[Case] = (),
                 title: str | None = None) -> Path:
    """Write `<out_dir>/report.html` (self-contained) and its PNGs for one evaluation run; returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = results[results["run_id"] == run_id]
    title = title or f"cxr-harvest evaluation, run {run_id}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>Protocol: DESIGN.md section 6. Cells read Acc-AFP. <code>bounded</code> stops at Wang's AFP "
             "(Cai Table 2); <code>all</code> counts every box (Cai Table 3). Protocol names that contain "
             "<code>oracle</code> were tuned on the evaluation boxes.</p>"]
    curves = plot_acc_curves(results, out_dir / "acc_vs_t.png")
    parts.append(_img_tag(curves, "Acc vs T(IoU) per finding; dashed: Wang 2017 Table 7; dotted: Cai 2018 "
                                  "Table 3 (KP, t=3)"))
    counts = results.drop_duplicates("finding").set_index("finding")[["n_gt", "n_images"]]
    parts += ["<h2>Evaluation set</h2>", counts.T.to_html(border=0)]
    for name, table in results_tables(results).items():
        parts += [f"<h2>{html.escape(name)}</h2>", table.to_html(na_rep="–", border=0)]
    if cases:
        parts.append("<h2>Best and worst cases per finding (by best IoU)</h2>")
    for case in cases:
        png = plot_case(case, out_dir / (_slug(f"case_{case.finding}_{case.label}_{Path(case.image_id).stem}") + ".png"))
        caption = case.caption or (f"{case.finding}, {case.image_id} ({case.label}): heatmaps at t=1..3 and H_f; "
                                   "GT red, mined boxes green with rank")
        parts.append(_img_tag(png, caption))
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto} img{max-width:100%} "
             "table{border-collapse:collapse} td,th{padding:2px 8px;text-align:right}")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)          # readers never see a half-written report
    return path
