"""The Wang/Cai localization protocol (docs/design.md#evaluation; Cai et al. 2018 sec. 3.2; Wang et al. 2017).

For each boxed finding c and threshold T:

1. I_c = evaluation images with a ground-truth (GT) box of c; n_images = |I_c|, n_gt = GT boxes of c.
2. B_c = the mined boxes of c on I_c: every rank-1 box (score descending, ties by image_id), then every rank-2
   box, then rank-3 (and any higher rank, in order).
3. A box is a *hit* when its overlap with some GT box of c **on its own image** is strictly > T; otherwise it
   is a false positive (FP). A second box on an already-hit GT box is still a hit, not an FP (the protocol
   counts GT boxes found and boxes that find nothing; it is not PASCAL-style matching).
4. Acc = GT boxes hit at least once / n_gt; AFP = FPs / n_images.

Modes:
- ``all``: every box of B_c counts (Cai's Table 3).
- ``bounded``: walk B_c in order and stop *before* the first FP that would take AFP above Wang's AFP for
  (c, T) (Cai's Table 2). Boxes after the stop, hits included, do not count: selection is sequential. The
  bound is applied as an FP budget floor(afp_wang * n_images) (+1e-9: Wang's AFPs are rounded to 4 digits).
  A T missing from Wang's table uses :func:`references.wang_afp_bound` (largest tabulated T below; else NaN).

Decisions the paper leaves open:
- **Boxes on images outside I_c** (an image labeled c without a GT box, or any other image) are not in B_c and
  are ignored: they are neither hits nor FPs, exactly as in Wang's AFP, which is per image of I_c. So a model
  is not charged for boxes where no one drew a box, and AFP is comparable to Wang's.
- **IoBB family** (intersection over the detected box, T in {0.1, 0.25, 0.5, 0.75, 0.9}) runs in ``all`` mode
  only. Our reference data has no Wang AFP per IoBB threshold, and borrowing the IoU bound would produce
  numbers that look comparable to Wang's IoBB table but are not; ``bounded`` + ``iobb`` raises.
- **Oracle**: anything tuned on the evaluation boxes (e.g. mining thresholds picked on them) must be run with
  ``oracle=True``, which puts ``oracle`` into every protocol name (``all/iou/oracle``).
- A finding with no GT box on the evaluation images gives rows with n_gt = 0 and NaN Acc/AFP.

Rows follow the warehouse table ``eval_results(run_id, protocol, metric, finding, t, acc, afp, n_gt,
n_images)`` with ``metric = 'acc'``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from pipeline.base.vocab import BOXED_FINDINGS
from pipeline.evaluation.iou import box_overlap_reference, number_gt, overlap_pairs, overlap_pairs_sql
from pipeline.evaluation.references import wang_afp_bound
from warehouse.db import transaction

IOU_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
IOBB_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
THRESHOLDS = {"iou": IOU_THRESHOLDS, "iobb": IOBB_THRESHOLDS}
MODES = ("bounded", "all")
# (mode, family) pairs computed by default: Cai's Table 2, Cai's Table 3, and the IoBB family.
DEFAULT_PROTOCOLS: tuple[tuple[str, str], ...] = (("bounded", "iou"), ("all", "iou"), ("all", "iobb"))
RESULT_COLUMNS = ["run_id", "protocol", "metric", "finding", "t", "acc", "afp", "n_gt", "n_images"]
BOX_COLUMNS = ["image_id", "finding", "rank", "x", "y", "w", "h", "score"]
GT_COLUMNS = ["image_id", "finding", "x", "y", "w", "h"]
_EPS = 1e-9


def protocol_name(mode: str, family: str, oracle: bool = False) -> str:
    """`bounded/iou`, `all/iobb`, ...; with `oracle` when anything was tuned on the evaluation boxes."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    if family not in THRESHOLDS:
        raise ValueError(f"unknown family {family!r}; use one of {tuple(THRESHOLDS)}")
    if mode == "bounded" and family == "iobb":
        raise ValueError("bounded/iobb is undefined: there is no Wang AFP per IoBB threshold in our reference "
                         "data; evaluate IoBB with mode 'all'")
    return f"{mode}/{family}" + ("/oracle" if oracle else "")


def ranked_list(boxes: pd.DataFrame, images: Iterable[str], finding: str) -> pd.DataFrame:
    """B_c: boxes of `finding` on `images`, rank ascending, then score descending, then image_id."""
    b = boxes[(boxes["finding"] == finding) & boxes["image_id"].isin(set(images))]
    b = b.sort_values(["rank", "score", "image_id"], ascending=[True, False, True], kind="mergesort")
    return b.reset_index(drop=True).assign(pos=lambda d: np.arange(len(d), dtype=np.int64))


def _fp_budget(finding: str, t: float, n_images: int) -> float:
    """Most FPs `bounded` mode may count: floor(Wang AFP x |I_c|), NaN when Wang has no bound."""
    bound = wang_afp_bound(finding, t)
    return math.nan if math.isnan(bound) else math.floor(bound * n_images + _EPS)


def _score(n_boxes: int, pos: np.ndarray, gt_id: np.ndarray, overlap: np.ndarray, t: float,
           fp_budget: float | None) -> tuple[int, int]:
    """Walk B_c (vectorised): returns (GT boxes hit, FPs counted). `fp_budget=None` counts every box."""
    hit = overlap > t                                   # strictly greater (Wang/Cai)
    box_hit = np.zeros(n_boxes, dtype=bool)
    box_hit[pos[hit]] = True
    fp_cum = np.cumsum(~box_hit)
    # boxes kept: the prefix before the first box whose FP count passes the budget
    kept = n_boxes if fp_budget is None else int(np.searchsorted(fp_cum, fp_budget, side="right"))
    n_fp = int(fp_cum[kept - 1]) if kept else 0
    return int(np.unique(gt_id[hit & (pos < kept)]).size), n_fp


def _check_inputs(boxes: pd.DataFrame, gt: pd.DataFrame) -> None:
    missing = [c for c in BOX_COLUMNS if c not in boxes] + [c for c in GT_COLUMNS if c not in gt]
    if missing:
        raise ValueError(f"missing columns {missing}; boxes need {BOX_COLUMNS}, gt needs {GT_COLUMNS}")
    if "run_id" in boxes and boxes["run_id"].nunique() > 1:
        raise ValueError("boxes hold several run_ids; evaluate one run at a time")
    dup = boxes.duplicated(["image_id", "finding", "rank"])
    if dup.any():
        raise ValueError(f"{int(dup.sum())} mined boxes repeat an (image_id, finding, rank); mining writes one box "
                         "per rank, so the input mixes runs or shards were written twice")


def _evaluate(boxes: pd.DataFrame, gt: pd.DataFrame, run_id: str, pairs_for: Callable[[str], pd.DataFrame],
              findings, protocols, oracle: bool) -> pd.DataFrame:
    rows = []
    for mode, family in protocols:
        name = protocol_name(mode, family, oracle)
        pairs = pairs_for(family)
        for c in findings:
            gt_c = gt[gt["finding"] == c]
            images = gt_c["image_id"].unique()
            n_images, n_gt = len(images), len(gt_c)
            b = ranked_list(boxes, images, c)
            p = pairs[pairs["finding"] == c].merge(b[["image_id", "rank", "pos"]], on=["image_id", "rank"])
            pos, gt_id = p["pos"].to_numpy(np.int64), p["gt_id"].to_numpy(np.int64)
            ov = p["overlap"].to_numpy(np.float64)
            for t in THRESHOLDS[family]:
                budget = _fp_budget(c, t, n_images) if mode == "bounded" else None
                if n_images == 0 or (budget is not None and math.isnan(budget)):
                    acc = afp = math.nan
                else:
                    n_hit, n_fp = _score(len(b), pos, gt_id, ov, t, budget)
                    acc, afp = n_hit / n_gt, n_fp / n_images
                rows.append((run_id, name, "acc", c, float(t), acc, afp, n_gt, n_images))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def evaluate(boxes: pd.DataFrame, gt: pd.DataFrame, run_id: str, *, findings=BOXED_FINDINGS,
             protocols=DEFAULT_PROTOCOLS, oracle: bool = False) -> pd.DataFrame:
    """Run the protocol on DataFrames (numpy overlap path); returns `eval_results` rows.

    `boxes`: mined boxes of one run (`BOX_COLUMNS`), any images; `gt`: the GT boxes of the evaluation images
    (`GT_COLUMNS`); the evaluation set is the images that appear in `gt`.
    """
    _check_inputs(boxes, gt)
    gt = number_gt(gt)
    return _evaluate(boxes, gt, run_id, lambda kind: overlap_pairs(boxes, gt, kind), findings, protocols, oracle)


def load_eval_inputs(con, run_id: str, split: str | None = None,
                     gt_table: str = "gt_boxes") -> tuple[pd.DataFrame, pd.DataFrame, list | None]:
    """(boxes of `run_id`, GT boxes of the evaluation images, their image_ids or None for all) from the warehouse.

    `split` (e.g. 'test') restricts the evaluation images to `images.split`; None takes every image with a GT box.
    `gt_table` names the ground truth (a table or view, e.g. `gt_boxes` filtered to one `source`).
    """
    image_ids = None
    if split is not None:
        image_ids = [r[0] for r in con.execute(
            f"SELECT DISTINCT g.image_id FROM {gt_table} g JOIN images i USING (image_id) WHERE i.split = ?",
            [split]).fetchall()]
    boxes = con.execute(f"SELECT {', '.join(BOX_COLUMNS)} FROM mined_boxes WHERE run_id = ?", [run_id]).df()
    gt = con.execute(f"SELECT {', '.join(GT_COLUMNS)} FROM {gt_table}").df()
    if image_ids is not None:
        gt = gt[gt["image_id"].isin(set(image_ids))]
    return boxes, gt, image_ids


def evaluate_warehouse(con, run_id: str, *, split: str | None = None, findings=BOXED_FINDINGS,
                       protocols=DEFAULT_PROTOCOLS, oracle: bool = False, gt_table: str = "gt_boxes") -> pd.DataFrame:
    """Run the protocol on the warehouse, overlaps computed in DuckDB (:func:`iou.overlap_pairs_sql`)."""
    boxes, gt, image_ids = load_eval_inputs(con, run_id, split, gt_table)
    _check_inputs(boxes, gt)
    gt = number_gt(gt)   # same order as the SQL row_number(), so gt_ids agree
    return _evaluate(boxes, gt, run_id,
                     lambda kind: overlap_pairs_sql(con, kind, run_id, image_ids, gt_table=gt_table),
                     findings, protocols, oracle)


def evaluate_reference(boxes: pd.DataFrame, gt: pd.DataFrame, finding: str, t: float, mode: str = "all",
                       family: str = "iou") -> tuple[float, float]:
    """(Acc, AFP) for one (finding, T, mode), box by box in plain Python: the slow version of :func:`evaluate`."""
    protocol_name(mode, family)
    gts = [(r.image_id, (r.x, r.y, r.w, r.h)) for r in gt[gt["finding"] == finding].itertuples()]
    images = {img for img, _ in gts}
    if not images:
        return math.nan, math.nan
    bound = wang_afp_bound(finding, t) if mode == "bounded" else math.inf
    if math.isnan(bound):
        return math.nan, math.nan
    found, fp = set(), 0
    for box in ranked_list(boxes, images, finding).itertuples():
        hits = [j for j, (img, g) in enumerate(gts)
                if img == box.image_id and box_overlap_reference((box.x, box.y, box.w, box.h), g, family) > t]
        if not hits:
            if fp + 1 > bound * len(images) + _EPS:   # this FP would take AFP past Wang's: stop
                break
            fp += 1
        found.update(hits)
    return len(found) / len(gts), fp / len(images)


def write_results(con, rows: pd.DataFrame) -> int:
    """Store `eval_results` rows, replacing earlier rows of the same (run_id, protocol); returns rows written."""
    rows = pd.DataFrame(rows)[RESULT_COLUMNS]
    keys = rows[["run_id", "protocol"]].drop_duplicates().itertuples(index=False)
    with transaction(con):
        for run_id, protocol in keys:
            con.execute("DELETE FROM eval_results WHERE run_id = ? AND protocol = ?", [run_id, protocol])
        con.register("_eval_rows", rows)
        try:
            con.execute(f"INSERT INTO eval_results SELECT {', '.join(RESULT_COLUMNS)} FROM _eval_rows")
        finally:
            con.unregister("_eval_rows")
    return len(rows)
