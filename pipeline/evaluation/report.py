"""One self-contained HTML report per evaluation run, plus its PNG figures (docs/design.md#flows, docs/design.md#evaluation).

The report opens with a header: run, model, the mining config's thresholds (from the mining run's `runs.params`)
and the commit of the code that wrote it. Then:
- ``acc_vs_t.png``: per-finding Acc vs T(IoU) for the protocols :func:`curve_protocols` picks (the `@truth`
  curves first where a phantom's exact truth exists), with Wang's Table 7 (dashed) and Cai's Table 3, KP at
  t=3 (dotted, T = 0.1 and 0.3 only) as reference lines;
- one table per protocol, T x finding, Acc and AFP in separate columns;
- ``case_<finding>_<best|worst>_<image>.png``: Fig.-2-style panels, one per heatmap (t = 1..T, then H_f)
  over the image; ground-truth boxes solid vermillion on every panel, mined boxes dashed sky blue on the H_f
  panel (they are made from H_f), with their rank.

Colours are Okabe-Ito (told apart with any colour vision), curves also differ by line style and marker, and
heatmaps use `cividis`. The HTML embeds every PNG as base64 (it stays readable when moved alone); the PNGs are
also written next to it. :func:`report_markdown` is the same header and headline for a Prefect artifact.
"""
from __future__ import annotations

import base64
import html
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipeline.base.coords import scale_boxes
from pipeline.base.vocab import BOXED_FINDINGS, FINDINGS
from pipeline.evaluation.compare import to_markdown
from pipeline.evaluation.iou import number_gt, overlap_pairs
from pipeline.evaluation.references import cai_table3, wang_table
from pipeline.evaluation.summary import formatted, harvest_lines

# Okabe & Ito (2008), "Color Universal Design": distinct under every common colour-vision deficiency
OKABE_ITO = {"orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7", "black": "#000000"}
GT_COLOR, MINED_COLOR = OKABE_ITO["vermillion"], OKABE_ITO["sky blue"]
HEATMAP_CMAP = "cividis"   # perceptually uniform and readable with colour-vision deficiencies (unlike jet)
# the Acc-vs-T curves: protocol -> (legend label, colour, line style, marker); @truth first, drawn when present
CURVES = {
    "all/iou@truth": ("ours all/iou@truth (every mined image, exact truth)", OKABE_ITO["blue"], "-", "o"),
    "bounded/iou@truth": ("ours bounded/iou@truth (every mined image, exact truth)", OKABE_ITO["bluish green"],
                          "-.", "^"),
    "all/iou": ("ours all/iou (boxed subset)", OKABE_ITO["orange"], "-", "D"),
    "bounded/iou": ("ours bounded/iou (boxed subset)", OKABE_ITO["vermillion"], "-.", "v"),
    "all/iou@review": ("ours all/iou@review (reviewed images, people's boxes)", OKABE_ITO["sky blue"], "-", "P"),
}
WANG_STYLE = dict(color=OKABE_ITO["black"], linestyle="--", marker="", label="Wang 2017 (Table 7)")
CAI_STYLE = dict(color=OKABE_ITO["reddish purple"], linestyle=":", marker="s", label="Cai 2018 (Table 3, KP t=3)")


CASE_KEY = "GT solid vermillion, mined dashed sky blue"


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


HIT_IOU = 0.3   # a "best" case is a hit at the headline T(IoU)


def select_cases(boxes: pd.DataFrame, gt: pd.DataFrame, n: int = 1, findings=BOXED_FINDINGS) -> pd.DataFrame:
    """The `n` best and `n` worst images of I_c per finding, by the best IoU of any mined box with a GT box.

    Returns `finding, image_id, best_iou, label` ('best' / 'worst'); an image of I_c without boxes has IoU 0.
    A best case is a hit (IoU > `HIT_IOU`): a finding without hits shows its worst cases only.
    """
    gt = number_gt(gt[gt["finding"].isin(findings)])
    pairs = overlap_pairs(boxes, gt, "iou")
    best = pairs.groupby(["finding", "image_id"])["overlap"].max()
    images = gt[["finding", "image_id"]].drop_duplicates().set_index(["finding", "image_id"])
    images["best_iou"] = best.reindex(images.index).fillna(0.0)
    out = []
    for c, g in images.reset_index().groupby("finding", sort=False):
        g = g.sort_values(["best_iou", "image_id"], ascending=[False, True])
        best = g.head(n)[lambda d: d["best_iou"] > HIT_IOU]
        worst = g.tail(min(n, len(g) - len(best))).iloc[::-1]
        out += [best.assign(label="best"), worst.assign(label="worst")]
    cols = ["finding", "image_id", "best_iou", "label"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def curve_protocols(results: pd.DataFrame) -> list[str]:
    """The protocols the Acc-vs-T plot draws, in drawing order: those of `CURVES` that have `acc` rows.

    With a phantom's exact truth, `all/iou@truth` (and `bounded/iou@truth`) come first: on phantom homes the
    boxed subset has 0-1 box per finding and its curves read flat zero; the boxed-subset curves stay beside
    them, labelled as such."""
    present = set(results.loc[results["metric"] == "acc", "protocol"])
    return [p for p in CURVES if p in present]


def plot_acc_curves(results: pd.DataFrame, path, findings=BOXED_FINDINGS, protocols=None) -> Path:
    """Acc vs T(IoU), one panel per finding, with Wang 2017 and Cai 2018 (KP, t=3) reference lines.
    `protocols`: default :func:`curve_protocols`."""
    protocols = curve_protocols(results) if protocols is None else protocols
    wang, cai = wang_table(), cai_table3().query("group == 'KP' and setting == 'KP'")
    fig = Figure(figsize=(16, 8.5), layout="constrained")
    axes = fig.subplots(2, math.ceil(len(findings) / 2), sharex=True, sharey=True).ravel()
    for ax, c in zip(axes, findings):
        for p in protocols:
            r = results[(results["protocol"] == p) & (results["finding"] == c) & (results["metric"] == "acc")]
            label, color, style, marker = CURVES.get(p, (f"ours {p}", OKABE_ITO["black"], "-", "o"))
            ax.plot(r["t"], r["acc"], color=color, linestyle=style, marker=marker, label=label)
        w = wang[wang["finding"] == c]
        ax.plot(w["t_iou"], w["acc"], **WANG_STYLE)
        k = cai[cai["finding"] == c]
        ax.plot(k["t_iou"], k["acc"], **CAI_STYLE)
        ax.set_title(c)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[len(findings):]:
        ax.set_visible(False)
    for ax in axes[-len(axes) // 2:]:
        ax.set_xlabel("T(IoU)")
    for ax in axes[::len(axes) // 2]:
        ax.set_ylabel("Acc")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9)   # below the panels, not on a curve
    return _save(fig, path)


def _draw_boxes(ax, boxes, color, ranks: bool = False, linestyle: str = "-") -> None:
    for i, (x, y, w, h) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=color, linewidth=2, linestyle=linestyle))
        if ranks:
            ax.text(x + 2, y + 2, str(i + 1), color=color, fontsize=9, va="top", fontweight="bold")


def plot_case(case: Case, path) -> Path:
    """Fig.-2-style panels: each heatmap over the image, GT boxes solid vermillion, mined boxes dashed sky blue
    (on H_f)."""
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
        rgba = colormaps[HEATMAP_CMAP](np.clip(hm, 0, 1))
        rgba[..., 3] = 0.55 * np.clip(np.asarray(hm) / 0.25, 0, 1)
        ax.imshow(rgba, extent=(0, img_w, img_h, 0), interpolation="bilinear")
        _draw_boxes(ax, gt, GT_COLOR)
        if is_fused:
            _draw_boxes(ax, mined, MINED_COLOR, ranks=True, linestyle="--")
        ax.set_title("$H_f$" if is_fused else f"$H_{i + 1}$ (t={i + 1})")
        ax.set_axis_off()
    sub = f" [{case.label}]" if case.label else ""
    iou = "" if math.isnan(case.best_iou) else f", best IoU {case.best_iou:.2f}"
    fig.suptitle(f"{case.finding} on {case.image_id}{sub}{iou}: {CASE_KEY}", fontsize=10)
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


def _fmt(value) -> str:
    return "–" if pd.isna(value) else f"{value:.2f}"


def results_tables(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per protocol, a T x (finding, Acc | AFP) table of formatted numbers (Cai Table 2 layout, one column each
    for Acc and AFP; AFP only where the metric defines it). MaxBoxAcc tables end with the V2 mean over IoU
    thresholds."""
    out = {}
    for (protocol, metric), r in results.groupby(["protocol", "metric"], sort=False):
        findings = [c for c in FINDINGS if c in set(r["finding"])]
        values = ["acc", "afp"] if r["afp"].notna().any() else ["acc"]
        wide = r.pivot(index="t", columns="finding", values=values)
        if metric == "maxboxacc":   # MaxBoxAccV2 headline: the mean over the IoU thresholds
            wide.loc["V2 mean"] = wide.mean()
        wide.columns = wide.columns.swaplevel().set_names(["finding", ""])
        wide = wide.reindex(columns=pd.MultiIndex.from_product([findings, values])).rename(
            columns={"acc": "Acc", "afp": "AFP"}, level=1)
        out[f"{protocol} ({metric})"] = wide.map(_fmt)
    return out


def code_commit() -> str:
    """The commit of the code that runs: `git rev-parse --short HEAD` in a git checkout (with `-dirty` when it
    has uncommitted changes), else the package version; never raises."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              timeout=5)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=here, timeout=5)
            return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from pipeline.runs.record import code_version   # the package version outside a checkout
    return code_version()


def report_header(run_id: str, model_id: str | None = None, mining_params: dict | None = None) -> dict[str, str]:
    """What the report is about: run, model, the mining config's thresholds (`runs.params` of the mining run)
    and the commit of the code writing it."""
    config = (mining_params or {}).get("config")
    config = config if isinstance(config, dict) else {}

    def listed(key):
        value = config.get(key)
        if value is None:
            return "not recorded"
        return ", ".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else f"{value:g}"
    return {"run": run_id, "model": model_id or "not recorded",
            "box thresholds on H_f": listed("thresholds"), "erasure threshold": listed("erase_threshold"),
            "AM steps T": listed("steps"), "code commit": code_commit()}


def report_markdown(header: dict[str, str], results: pd.DataFrame, html_path=None,
                    summary: pd.DataFrame | None = None, harvest: pd.DataFrame | None = None) -> str:
    """The header, the summary (:mod:`pipeline.evaluation.summary`) and the headline Acc per finding (the
    :func:`curve_protocols`) as markdown, e.g. for a Prefect artifact; the full tables are in the HTML report at
    `html_path`."""
    lines = [f"# Evaluation of run `{header['run']}`", ""]
    lines += [f"- {name}: `{value}`" for name, value in header.items()]
    if html_path:
        lines.append(f"- HTML report: `{html_path}`")
    if harvest is not None:
        lines += ["", f"## Harvest: {harvest.attrs.get('images', '?')} images mined", "",
                  to_markdown(harvest).rstrip(), ""] + [f"- {line}" for line in harvest_lines(harvest)]
    if summary is not None:
        lines += ["", f"## Acc per finding, `{summary.attrs.get('protocol', '')}`, n and 95 % interval", "",
                  to_markdown(formatted(summary)).rstrip()]
    acc = results[results["metric"] == "acc"]
    for protocol in curve_protocols(results):
        r = acc[acc["protocol"] == protocol]
        wide = r.pivot(index="finding", columns="t", values="acc")
        wide.columns = [f"Acc@T={t:g}" for t in wide.columns]
        wide = wide.reindex([c for c in FINDINGS if c in wide.index]).reset_index()
        lines += ["", f"## {CURVES[protocol][0]}", "", to_markdown(wide).rstrip()]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def write_report(out_dir, run_id: str, results: pd.DataFrame, cases: Sequence[Case] = (),
                 title: str | None = None, header: dict[str, str] | None = None,
                 summary: pd.DataFrame | None = None, harvest: pd.DataFrame | None = None) -> Path:
    """Write `<out_dir>/report.html` (self-contained) and its PNGs for one evaluation run; returns the HTML path.
    `header`: default :func:`report_header` of `run_id` alone. `summary`, `harvest`: the tables of
    :mod:`pipeline.evaluation.summary`, shown first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = results[results["run_id"] == run_id]
    header = header or report_header(run_id)
    title = title or f"cxr-harvest evaluation, run {run_id}"
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(str(v))}</code></td></tr>"
                   for k, v in header.items())
    parts = [f"<h1>{html.escape(title)}</h1>", f'<table class="header">{rows}</table>']
    if harvest is not None:
        parts += [f"<h2>Harvest: {harvest.attrs.get('images', '?')} images mined</h2>",
                  harvest.to_html(index=False, border=0)]
        parts += [f"<p>{html.escape(line)}</p>" for line in harvest_lines(harvest)]
    if summary is not None:
        parts += [f"<h2>Acc per finding, {html.escape(summary.attrs.get('protocol', ''))}: n truth boxes and "
                  "95 % bootstrap interval over images</h2>", formatted(summary).to_html(index=False, border=0)]
    parts += [
             "<p>Protocol: docs/design.md#evaluation (in the cxr-harvest repository). Acc and AFP are separate "
             "columns. <code>bounded</code> stops at Wang's AFP (Cai Table 2); <code>all</code> counts every box "
             "(Cai Table 3). <code>@truth</code> protocols score every mined image against a phantom's exact "
             "boxes, <code>@review</code> ones the reviewed images against people's boxes (harvest import-review); "
             "the others score the boxed subset. Protocol names that contain <code>oracle</code> were "
             "tuned on the evaluation boxes.</p>"]
    curves = plot_acc_curves(results, out_dir / "acc_vs_t.png")
    parts.append(_img_tag(curves, "Acc vs T(IoU) per finding: "
                                  + "; ".join(CURVES[p][0] for p in curve_protocols(results))
                                  + "; dashed black: Wang 2017 Table 7; dotted purple: Cai 2018 Table 3 (KP, t=3)"))
    acc = results[results["metric"] == "acc"]
    gt_set = np.select([acc["protocol"].str.contains(s, regex=False) for s in ("@truth", "@review")],
                       ["every mined image (@truth)", "reviewed images (@review)"], "boxed subset")
    counts = acc.assign(gt_set=gt_set).drop_duplicates(["gt_set", "finding"]).pivot(
        index="finding", columns="gt_set", values=["n_gt", "n_images"])
    parts += ["<h2>Evaluation set</h2>", counts.T.to_html(border=0)]
    for name, table in results_tables(results).items():
        parts += [f"<h2>{html.escape(name)}</h2>", table.to_html(na_rep="–", border=0)]
    if cases:
        parts.append("<h2>Best and worst cases per finding (by best IoU)</h2>")
    for case in cases:
        png = plot_case(case, out_dir / (_slug(f"case_{case.finding}_{case.label}_{Path(case.image_id).stem}") + ".png"))
        caption = case.caption or (f"{case.finding}, {case.image_id} ({case.label}): heatmaps at t=1..3 and H_f; "
                                   f"{CASE_KEY}, mined boxes with rank")
        parts.append(_img_tag(png, caption))
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto} img{max-width:100%} "
             "table{border-collapse:collapse} td,th{padding:2px 8px;text-align:right} "
             "table.header th,table.header td{text-align:left}")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)          # readers never see a half-written report
    return path
