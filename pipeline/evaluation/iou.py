"""Box overlap for the evaluation protocol (docs/design.md#evaluation): IoU and IoBB, three ways that must agree.

- :func:`box_overlap`: numpy, vectorised, broadcasting over leading dims (pairs or matrices);
- :func:`box_overlap_reference`: one pair at a time in plain Python, the obviously correct version;
- :func:`overlap_pairs_sql`: the same arithmetic in DuckDB over the `mined_boxes` / `gt_boxes` tables.

Boxes are `x, y, w, h` (pixels, top-left origin, image frame). `kind="iou"` is intersection over union;
`kind="iobb"` is intersection over the *detected* box's area (Wang et al. 2017). A zero denominator gives 0.
All three paths evaluate the same expression in float64 in the same order, so they agree bit for bit.

Ground-truth boxes are identified by `gt_id`: their position in (finding, image_id, x, y, w, h) order over the
ground-truth set being evaluated (:func:`number_gt` and the SQL `row_number()` use the same order).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

KINDS = ("iou", "iobb")
GT_ORDER = ["finding", "image_id", "x", "y", "w", "h"]
PAIR_COLUMNS = ["image_id", "finding", "rank", "gt_id", "overlap"]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown overlap kind {kind!r}; use one of {KINDS}")


def box_overlap(det, gt, kind: str = "iou") -> np.ndarray:
    """Overlap of detected boxes `det [..., 4]` with ground-truth boxes `gt [..., 4]` (xywh), broadcast.

    Pairs: `box_overlap(a[N,4], b[N,4])` -> [N]. Matrix: `box_overlap(a[:, None], b[None])` -> [N, M].
    """
    _check_kind(kind)
    det = np.asarray(det, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    dx, dy, dw, dh = np.moveaxis(det, -1, 0)
    gx, gy, gw, gh = np.moveaxis(gt, -1, 0)
    iw = np.maximum(0.0, np.minimum(dx + dw, gx + gw) - np.maximum(dx, gx))
    ih = np.maximum(0.0, np.minimum(dy + dh, gy + gh) - np.maximum(dy, gy))
    inter = iw * ih
    denom = dw * dh if kind == "iobb" else dw * dh + gw * gh - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, inter / np.where(denom > 0, denom, 1.0), 0.0)


def box_overlap_reference(det, gt, kind: str = "iou") -> float:
    """One pair, plain Python floats: the slow, obviously correct version of :func:`box_overlap`."""
    _check_kind(kind)
    dx, dy, dw, dh = (float(v) for v in det)
    gx, gy, gw, gh = (float(v) for v in gt)
    iw = max(0.0, min(dx + dw, gx + gw) - max(dx, gx))
    ih = max(0.0, min(dy + dh, gy + gh) - max(dy, gy))
    inter = iw * ih
    denom = dw * dh if kind == "iobb" else dw * dh + gw * gh - inter
    return inter / denom if denom > 0 else 0.0


def number_gt(gt: pd.DataFrame) -> pd.DataFrame:
    """Ground-truth boxes sorted in `GT_ORDER` with a `gt_id` column 0..n-1 (the SQL path numbers alike)."""
    gt = gt.astype({c: "float64" for c in "xywh"}).sort_values(GT_ORDER, kind="mergesort")
    return gt.reset_index(drop=True).assign(gt_id=lambda d: np.arange(len(d), dtype=np.int64))


def overlap_pairs(boxes: pd.DataFrame, gt: pd.DataFrame, kind: str = "iou") -> pd.DataFrame:
    """Every (mined box, GT box) pair of the same image and finding, with its overlap (numpy path).

    `boxes` needs image_id, finding, rank, x, y, w, h; `gt` needs image_id, finding, x, y, w, h, gt_id.
    Returns `PAIR_COLUMNS`, sorted by (finding, image_id, rank, gt_id).
    """
    _check_kind(kind)
    pairs = boxes[["image_id", "finding", "rank", "x", "y", "w", "h"]].merge(
        gt[["image_id", "finding", "gt_id", "x", "y", "w", "h"]], on=["image_id", "finding"], suffixes=("", "_gt"))
    det = pairs[["x", "y", "w", "h"]].to_numpy(np.float64)
    ref = pairs[["x_gt", "y_gt", "w_gt", "h_gt"]].to_numpy(np.float64)
    pairs["overlap"] = box_overlap(det, ref, kind).reshape(len(pairs))
    pairs["rank"] = pairs["rank"].astype(np.int64)
    return pairs[PAIR_COLUMNS].sort_values(["finding", "image_id", "rank", "gt_id"]).reset_index(drop=True)


def _overlap_sql(kind: str) -> str:
    """SQL expression over b.(x,y,w,h) and g.(x,y,w,h), DOUBLE, same operation order as :func:`box_overlap`."""
    inter = ("greatest(0.0, least(b.x + b.w, g.x + g.w) - greatest(b.x, g.x))"
             " * greatest(0.0, least(b.y + b.h, g.y + g.h) - greatest(b.y, g.y))")
    denom = "b.w * b.h" if kind == "iobb" else f"b.w * b.h + g.w * g.h - {inter}"
    return f"CASE WHEN {denom} > 0 THEN ({inter}) / ({denom}) ELSE 0.0 END"


def overlap_pairs_sql(con, kind: str = "iou", run_id: str | None = None, image_ids=None,
                      boxes_table: str = "mined_boxes", gt_table: str = "gt_boxes") -> pd.DataFrame:
    """The SQL path of :func:`overlap_pairs`: DuckDB joins `boxes_table` to `gt_table` on (image_id, finding).

    `run_id` filters the mined boxes; `image_ids` (a list) restricts the ground truth, which fixes the
    `gt_id` numbering (so pass the same GT set as on the numpy path). Coordinates are cast to DOUBLE first:
    mined boxes are stored as FLOAT and DuckDB would otherwise do FLOAT arithmetic.
    """
    _check_kind(kind)
    where_b = "WHERE run_id = $run_id" if run_id is not None else ""
    where_g = "WHERE list_contains($image_ids, image_id)" if image_ids is not None else ""
    order = ", ".join(GT_ORDER)
    sql = f"""
        WITH b AS (
            SELECT image_id, finding, CAST(rank AS BIGINT) AS rank, CAST(x AS DOUBLE) AS x, CAST(y AS DOUBLE) AS y,
                   CAST(w AS DOUBLE) AS w, CAST(h AS DOUBLE) AS h
            FROM {boxes_table} {where_b}),
        g AS (
            SELECT image_id, finding, CAST(x AS DOUBLE) AS x, CAST(y AS DOUBLE) AS y, CAST(w AS DOUBLE) AS w,
                   CAST(h AS DOUBLE) AS h, CAST(row_number() OVER (ORDER BY {order}) - 1 AS BIGINT) AS gt_id
            FROM {gt_table} {where_g})
        SELECT b.image_id, b.finding, b.rank, g.gt_id, {_overlap_sql(kind)} AS overlap
        FROM b JOIN g ON b.image_id = g.image_id AND b.finding = g.finding
        ORDER BY b.finding, b.image_id, b.rank, g.gt_id"""
    params = {}
    if run_id is not None:
        params["run_id"] = run_id
    if image_ids is not None:
        params["image_ids"] = [str(i) for i in image_ids]
    return con.execute(sql, params).df()[PAIR_COLUMNS]
