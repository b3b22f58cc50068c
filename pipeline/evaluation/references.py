"""Published reference numbers, shipped as CSVs in `pipeline/data/` and read with importlib.resources.

- Wang et al. 2017 (ChestX-ray8), supplementary Table 7: Acc and AFP per (finding, T(IoU)); its AFP is the upper
  bound of the `bounded` protocol (Cai et al. 2018, sec. 3.2).
- Cai et al. 2018, Table 3: Acc with all boxes of B, for AM steps t=1..3 and w/o KP / KP-Vanilla / KP.
- NIH BBox_List_2017 statistics: GT boxes per finding and median sizes.
"""
from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources

import pandas as pd

_PACKAGE, _FOLDER = "pipeline", "data"


def _read(name: str) -> pd.DataFrame:
    with resources.files(_PACKAGE).joinpath(_FOLDER, name).open("r") as fh:
        return pd.read_csv(fh, comment="#")


@lru_cache(maxsize=None)
def _wang() -> pd.DataFrame:
    df = _read("wang2017_table7_iou.csv")
    return df.assign(t_iou=df["t_iou"].round(4))


def wang_table() -> pd.DataFrame:
    """Wang 2017 Table 7 as rows `t_iou, finding, acc, afp` (a fresh copy)."""
    return _wang().copy()


def cai_table3() -> pd.DataFrame:
    """Cai 2018 Table 3, long form: `group, t_iou, setting, finding, acc` (group 'AM' or 'KP')."""
    wide = _read("cai2018_table3_ablation.csv")
    return wide.melt(id_vars=["group", "t_iou", "setting"], var_name="finding", value_name="acc")


def nih_bbox_stats() -> pd.DataFrame:
    """`finding, boxes, median_w, median_h` of NIH BBox_List_2017 (1024x1024 frame)."""
    return _read("nih_bbox_stats.csv")


def wang_afp_bound(finding: str, t: float) -> float:
    """Wang's AFP for (finding, T(IoU)): the bound of the `bounded` protocol.

    A T missing from the table takes the bound of the largest tabulated T below it. Wang's AFP never falls as T
    rises (a stricter T turns hits into false positives), so that bound is the tighter, conservative one: it
    never lets us count more false positives than Wang had. With no tabulated T at or below, the bound is NaN
    and the protocol reports NaN (not comparable). The shipped table covers 0.1..0.7 for all 8 findings.
    """
    rows = _wang()
    rows = rows[(rows["finding"] == finding) & (rows["t_iou"] <= round(float(t), 4) + 1e-9)]
    if rows.empty:
        return math.nan
    return float(rows.sort_values("t_iou")["afp"].iloc[-1])
