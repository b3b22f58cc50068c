"""Conversions between the three frames a box lives in (docs/design.md#data-contracts).

- image frame: the original image, `width x height` pixels (`images.width/height`);
- input frame: the square model input, `size x size` (images are resized, not padded, so each axis scales alone);
- grid frame: a map of `gh x gw` cells covering the input (CAMs at the feature stride, or a finer mining grid).

Boxes are `x, y, w, h` floats with a top-left origin; a pixel/cell i covers [i, i+1).
"""
from __future__ import annotations

import numpy as np


def scale_boxes(boxes, src_wh, dst_wh) -> np.ndarray:
    """Rescale `[K,4]` xywh boxes from a `src_wh=(w,h)` frame to a `dst_wh` frame (works with broadcasting)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx = np.asarray(dst_wh[0], dtype=np.float64) / np.asarray(src_wh[0], dtype=np.float64)
    sy = np.asarray(dst_wh[1], dtype=np.float64) / np.asarray(src_wh[1], dtype=np.float64)
    return boxes * np.stack([sx, sy, sx, sy], axis=-1)


def image_to_input(boxes, image_wh, size: int) -> np.ndarray:
    return scale_boxes(boxes, image_wh, (size, size))


def input_to_image(boxes, size: int, image_wh) -> np.ndarray:
    return scale_boxes(boxes, (size, size), image_wh)


def grid_to_image(boxes, grid_hw, image_wh) -> np.ndarray:
    """Boxes in grid cells (x0, y0 = first cell, w, h = number of cells) -> image-frame pixels."""
    gh, gw = grid_hw
    return scale_boxes(boxes, (gw, gh), image_wh)


def box_inside(box, width: float, height: float, tol: float = 0.5) -> bool:
    """True when an xywh box has positive size and lies inside the image (half-pixel tolerance)."""
    x, y, w, h = box
    return w > 0 and h > 0 and x >= -tol and y >= -tol and x + w <= width + tol and y + h <= height + tol
