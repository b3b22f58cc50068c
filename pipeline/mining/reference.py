"""The reference mining path: numpy and scikit-image, one map at a time, written to be obviously correct.

It follows eq. 7-8 and sec. 3.2 literally (see `heatmap_fusion` and `boxes` for our reading) and works on the
full-size, bilinearly upsampled heatmap. Tests and `bench/mine.py` hold the fast torch path to it.
"""
from __future__ import annotations

import numpy as np

from models.erasure import THRESHOLD, erasure_step_reference, normalize_unerased_reference


def fused_heatmap_reference(cam: np.ndarray, steps: int = 3, threshold: float = THRESHOLD) -> np.ndarray:
    """Eq. 8 for one `[h, w]` step-1 CAM, with the sums written out as in the paper."""
    cam = np.asarray(cam, dtype=np.float32)
    masks = [np.ones_like(cam)]                                     # M_0 = 1
    heatmaps = []
    for t in range(1, steps + 1):
        heatmaps.append(normalize_unerased_reference(cam, masks[t - 1]))   # H_t: eq. 7, renormalized
        masks.append(erasure_step_reference(cam, masks[t - 1], threshold))  # M_t
    fused = np.zeros(cam.shape, dtype=np.float64)
    for t in range(1, steps + 1):
        term = heatmaps[t - 1].astype(np.float64)
        for tp in range(1, t):
            term = term + heatmaps[tp - 1] * (1 - masks[tp])         # H_t' ⊙ M̄_t'
        fused += term
    return fused / steps


def upsample_reference(fused: np.ndarray, frame) -> np.ndarray:
    """`[h, w]` heatmap -> `[height, width]` of the image frame, bilinear, pixel centres at i + 0.5."""
    from skimage.transform import resize

    width, height = (int(round(v)) for v in frame)
    return resize(np.asarray(fused, dtype=np.float64), (height, width), order=1, mode="edge",
                  anti_aliasing=False, preserve_range=True)


def boxes_reference(fused: np.ndarray, frame, thresholds=(0.5, 0.35, 0.2)) -> list[dict]:
    """Sec. 3.2 boxes for one `[h, w]` fused heatmap, ranked best first.

    Each box: `{"x", "y", "w", "h"}` in pixels of `frame = (width, height)`, `"score"` (mean H_f inside) and
    `"threshold"` (the first threshold, in config order, that gave it).
    """
    from skimage.measure import label

    full = upsample_reference(fused, frame)
    # H_f's maximum: a bilinear surface peaks at a grid node (the first maximal one); the seed is the pixel under it.
    fused = np.asarray(fused)
    i, j = np.unravel_index(np.argmax(fused), fused.shape)
    seed = tuple(min(int((k + 0.5) * n / m), n - 1) for k, n, m in zip((i, j), full.shape, fused.shape))
    out: list[dict] = []
    for tau in thresholds:
        labels = label(full >= tau, connectivity=2)
        if labels[seed] == 0:
            continue
        ys, xs = np.nonzero(labels == labels[seed])
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        box = {"x": float(x0), "y": float(y0), "w": float(x1 - x0 + 1), "h": float(y1 - y0 + 1)}
        if any(all(b[k] == box[k] for k in "xywh") for b in out):
            continue  # the same box as at a higher threshold: a duplicate collapses
        box["score"] = float(full[y0:y1 + 1, x0:x1 + 1].mean())
        box["threshold"] = float(tau)
        out.append(box)
    return sorted(out, key=lambda b: -b["score"])  # stable: ties keep threshold order


def mine_reference(cam: np.ndarray, frame, thresholds=(0.5, 0.35, 0.2), steps: int = 3) -> list[dict]:
    """Step-1 CAM of one (image, finding) -> ranked boxes: the whole reference post-processing."""
    return boxes_reference(fused_heatmap_reference(cam, steps), frame, thresholds)
