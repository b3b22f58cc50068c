"""One comparison table across runs, next to the paper's rows (for docs/results.md).

Groups follow the paper: ``AM`` (t=1, t=2, t=3; Cai Table 3), ``KP`` (w/o KP, KP-Vanilla, KP; Cai Table 3) and
``MSA`` (baseline, bilinear, deconv; Cai Table 1, whose numbers our reference data does not carry, so MSA rows
have no paper row). Wang et al.'s Table 7 Acc is added per T as group ``ref``. Cai's Table 3 uses all boxes of
B, so its rows sit beside our ``all/iou`` runs; Wang's rows carry Wang's own AFP (protocol ``bounded/iou``).
Every row names its protocol, so an ``oracle`` run is labeled as such in the table.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd

from pipeline.base.vocab import BOXED_FINDINGS
from pipeline.evaluation.references import cai_table3, wang_table

SETTINGS: dict[str, tuple[str, ...]] = {
    "AM": ("t=1", "t=2", "t=3"),
    "KP": ("w/o KP", "KP-Vanilla", "KP"),
    "MSA": ("baseline", "bilinear", "deconv"),
}
GROUP_ORDER = (*SETTINGS, "ref")
SOURCE_ORDER = ("ours", "Cai 2018", "Wang 2017")
KEY_COLUMNS = ["group", "t_iou", "setting", "source", "protocol", "run_id"]


def _runs_frame(runs) -> pd.DataFrame:
    """`runs`: {run_id: (group, setting)} or a DataFrame with run_id, group, setting."""
    if isinstance(runs, Mapping):
        runs = pd.DataFrame([(r, g, s) for r, (g, s) in runs.items()], columns=["run_id", "group", "setting"])
    unknown = [(g, s) for g, s in zip(runs["group"], runs["setting"]) if s not in SETTINGS.get(g, ())]
    if unknown:
        raise ValueError(f"unknown (group, setting) {unknown}; use one of {SETTINGS}")
    return runs[["run_id", "group", "setting"]]


def comparison_table(results: pd.DataFrame, runs, *, protocol: str = "all/iou", thresholds=(0.1, 0.3),
                     findings=BOXED_FINDINGS) -> pd.DataFrame:
    """Wide table: one row per (group, T, setting, source), Acc per finding, and their mean.

    `results`: ``eval_results`` rows (any runs); `protocol`: which of our protocols to show (an ``oracle``
    variant such as ``all/iou/oracle`` keeps that name in the table).
    """
    runs = _runs_frame(runs)
    ts = [round(float(t), 4) for t in thresholds]
    ours = results[(results["protocol"] == protocol) & (results["metric"] == "acc")]
    ours = ours.assign(t_iou=ours["t"].round(4)).merge(runs, on="run_id")
    ours = ours[ours["t_iou"].isin(ts)].assign(source="ours")
    cai = cai_table3().assign(source="Cai 2018", protocol="all/iou", run_id="")
    wang = wang_table().assign(group="ref", setting="Wang CAM", source="Wang 2017", protocol="bounded/iou",
                               run_id="")
    paper = pd.concat([cai, wang]) if protocol.startswith("all/iou") else wang
    paper = paper[paper["t_iou"].round(4).isin(ts)]
    long = pd.concat([ours[KEY_COLUMNS + ["finding", "acc"]], paper[KEY_COLUMNS + ["finding", "acc"]]])
    long = long[long["finding"].isin(findings)]
    wide = long.pivot_table(index=KEY_COLUMNS, columns="finding", values="acc", aggfunc="first")
    wide = wide.reindex(columns=list(findings)).reset_index()
    wide = wide.dropna(subset=list(findings), how="all")
    wide["mean"] = wide[list(findings)].mean(axis=1)
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    setting_rank = {s: i for group in SETTINGS.values() for i, s in enumerate(group)}
    wide = wide.assign(_g=wide["group"].map(order), _s=wide["setting"].map(setting_rank).fillna(0),
                       _src=wide["source"].map({s: i for i, s in enumerate(SOURCE_ORDER)}))
    wide = wide.sort_values(["_g", "t_iou", "_s", "_src", "run_id"]).drop(columns=["_g", "_s", "_src"])
    # paper rows only where we have runs of that group (Wang's ref rows always)
    shown = set(ours["group"]) | {"ref"}
    return wide[wide["group"].isin(shown)].reset_index(drop=True)


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """GitHub markdown for a table; floats to `digits`, NaN as an en dash (no `tabulate` needed)."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "–" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if pd.api.types.is_float_dtype(table[c]) else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in rec) + " |" for rec in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
