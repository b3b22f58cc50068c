"""MaxBoxAccV2-style summary (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right",
CVPR 2020), per boxed finding.

For a CAM threshold tau, every connected region of {H >= tau} gives a box (V2: all regions, not only the
largest). An image of I_c is correct at IoU delta when some box has IoU >= delta with some GT box of c (Choe's
`>=`, unlike the `>` of the Wang/Cai protocol). BoxAcc(tau, delta) = correct images / |I_c|; images of I_c
without a heatmap count as wrong.

Choe's point is that tau must not be tuned on the test boxes. So tau is chosen per (finding, delta) as the
argmax of BoxAcc on a *validation* split (ties: the lowest tau) and then applied to the evaluation images:
protocol ``maxboxacc/val``. Without validation maps, tau is maximised on the evaluation boxes themselves
(Choe's MaxBoxAcc as an upper bound): protocol ``maxboxacc/oracle``.

Rows (``eval_results``): metric ``maxboxacc`` (acc = BoxAcc at the chosen tau, t = delta, afp NaN) and metric
``cam_threshold`` (acc holds the chosen tau, so every number is traceable). The V2 headline is the mean of the
``maxboxacc`` rows over delta in {0.3, 0.5, 0.7}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline.base.coords import grid_to_image
from pipeline.base.vocab import BOXED_FINDINGS
from pipeline.evaluation.iou import box_overlap
from pipeline.evaluation.protocol import RESULT_COLUMNS

MAXBOXACC_IOUS: tuple[float, ...] = (0.3, 0.5, 0.7)
CAM_THRESHOLDS: np.ndarray = np.round(np.arange(0.0, 1.0, 0.01), 2)   # Choe's cam_curve_interval = 0.01
_EIGHT = np.ones((3, 3), dtype=bool)                                    # 8-connectivity, like skimage's default


@dataclass(frozen=True)
class Heatmap:
    """One H_f^c of one image: `heatmap [h, w]` in [0, 1] (higher = more salient) covering the whole image of
    size `width x height` (image frame, where the GT boxes live)."""
    image_id: str
    finding: str
    heatmap: np.ndarray
    width: float
    height: float


def component_boxes(heatmap: np.ndarray, tau: float) -> np.ndarray:
    """Boxes `[K, 4]` xywh in grid cells of the 8-connected regions of {heatmap >= tau} (scipy)."""
    labels, n = ndimage.label(np.asarray(heatmap) >= tau, structure=_EIGHT)
    return np.array([(s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start)
                     for s in ndimage.find_objects(labels)], dtype=np.float64).reshape(n, 4)


def component_boxes_reference(heatmap: np.ndarray, tau: float) -> np.ndarray:
    """The same with skimage.measure.regionprops: the slow, obviously correct version."""
    from skimage.measure import label, regionprops

    props = regionprops(label(np.asarray(heatmap) >= tau, connectivity=2))
    return np.array([(p.bbox[1], p.bbox[0], p.bbox[3] - p.bbox[1], p.bbox[2] - p.bbox[0]) for p in props],
                    dtype=np.float64).reshape(len(props), 4)


def best_iou_curve(item: Heatmap, gt_boxes: np.ndarray, cam_thresholds=CAM_THRESHOLDS) -> np.ndarray:
    """Best IoU between any region box and any GT box (image frame), for each tau: `[len(cam_thresholds)]`."""
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros(len(cam_thresholds))
    for i, tau in enumerate(cam_thresholds):
        boxes = grid_to_image(component_boxes(item.heatmap, tau), item.heatmap.shape, (item.width, item.height))
        if len(boxes) and len(gt_boxes):
            out[i] = box_overlap(boxes[:, None], gt_boxes[None]).max()
    return out


def box_acc_table(maps: Sequence[Heatmap], gt: pd.DataFrame, finding: str, iou_thresholds=MAXBOXACC_IOUS,
                  cam_thresholds=CAM_THRESHOLDS) -> tuple[np.ndarray, int, int]:
    """BoxAcc `[len(cam_thresholds), len(iou_thresholds)]` over I_c, with (n_gt, n_images); NaN when I_c is empty."""
    gt_c = gt[gt["finding"] == finding]
    by_image = {iid: g[["x", "y", "w", "h"]].to_numpy(np.float64) for iid, g in gt_c.groupby("image_id")}
    curves = {m.image_id: best_iou_curve(m, by_image[m.image_id], cam_thresholds)
              for m in maps if m.finding == finding and m.image_id in by_image}
    if not by_image:
        return np.full((len(cam_thresholds), len(iou_thresholds)), math.nan), 0, 0
    best = np.zeros((len(by_image), len(cam_thresholds)))
    for row, curve in enumerate(curves.values()):   # images without a map keep IoU 0: wrong at every tau
        best[row] = curve
    correct = best[:, :, None] >= np.asarray(iou_thresholds)[None, None, :]
    return correct.mean(axis=0), len(gt_c), len(by_image)


def max_box_acc(eval_maps: Sequence[Heatmap], eval_gt: pd.DataFrame, run_id: str, *,
                val_maps: Sequence[Heatmap] | None = None, val_gt: pd.DataFrame | None = None,
                findings=BOXED_FINDINGS, iou_thresholds=MAXBOXACC_IOUS,
                cam_thresholds=CAM_THRESHOLDS) -> pd.DataFrame:
    """MaxBoxAccV2-style rows; tau from the validation maps, or labeled ``oracle`` when none are given."""
    oracle = val_maps is None
    protocol = "maxboxacc/oracle" if oracle else "maxboxacc/val"
    rows = []
    for c in findings:
        acc_eval, n_gt, n_images = box_acc_table(eval_maps, eval_gt, c, iou_thresholds, cam_thresholds)
        acc_sel = acc_eval if oracle else box_acc_table(val_maps, val_gt, c, iou_thresholds, cam_thresholds)[0]
        for j, delta in enumerate(iou_thresholds):
            if np.isnan(acc_sel[:, j]).all() or n_images == 0:
                tau = acc = math.nan
            else:
                k = int(np.nanargmax(acc_sel[:, j]))            # first maximum: the lowest tau among ties
                tau, acc = float(cam_thresholds[k]), float(acc_eval[k, j])
            rows.append((run_id, protocol, "maxboxacc", c, float(delta), acc, math.nan, n_gt, n_images))
            rows.append((run_id, protocol, "cam_threshold", c, float(delta), tau, math.nan, n_gt, n_images))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
