"""Class-wise erasure masks for attention mining (Cai et al. 2018, eq. 1 and 7, sec. 3.2).

One erasure step, per (image, class) map: min-max normalize the CAM over the unerased area (mask == 1),
binarize at 0.5, and zero, in the cumulative mask, the connected component of the binary map that holds the
global maximum of the unerased CAM: ``M_t = M_{t-1}`` minus that component.

Our reading of what the paper leaves open:
- connectivity is 8 (a 3x3 neighbourhood, skimage ``connectivity=2``): a lesion touching itself diagonally is one;
- the global maximum is the first maximal pixel in raster order (``argmax``), so ties are deterministic;
- a map that is constant over its unerased area normalizes to 1 there (every pixel is its maximum), so the
  component of the unerased area holding the first pixel is erased; a fully erased map stays fully erased.

``erasure_step`` is batched on the tensor's device (no loop over images or classes); connected components are
a flood fill from the seed, one 3x3 max-pool per ring, restricted to the foreground. ``erasure_step_reference``
does the same with numpy and ``skimage.measure.label``, one map at a time; a test holds them bit-equal.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLD = 0.5  # sec. 3.2: "normalized to [0,1] and binarized with a threshold of 0.5"


def normalize_unerased(cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each `[..., h, w]` map to [0, 1] over its unerased area; erased pixels become 0."""
    cam = cam.float()
    keep = mask > 0
    big = torch.finfo(cam.dtype).max
    lo = cam.masked_fill(~keep, big).amin((-2, -1), keepdim=True)
    hi = cam.masked_fill(~keep, -big).amax((-2, -1), keepdim=True)
    span = hi - lo
    # The same float32 operations as the numpy reference, in the same order, so the two agree bit for bit.
    norm = torch.where(span > 0, (cam - lo) / span.clamp_min(torch.finfo(cam.dtype).tiny), 1.0)
    return norm.masked_fill(~keep, 0.0)


def connected_component(foreground: torch.Tensor, seed: torch.Tensor, diagonals=None,
                        check_every: int = 4) -> torch.Tensor:
    """8-connected component of `foreground` that holds `seed`, for a batch of `[..., h, w]` bool maps.

    Grows the seed by one ring of neighbours per iteration (a 3x3 max-pool), keeps only foreground pixels, and
    stops when no map changes. Convergence is checked every `check_every` rings: the fill is monotone, so extra
    rings past the fixed point are harmless, and fewer checks mean fewer device syncs.

    `diagonals=(down_right, down_left)`, bool `[..., h-1, w-1]`, makes diagonal steps conditional instead: cell
    (i, j) joins (i+1, j+1) only where `down_right[i, j]`, and (i, j+1) joins (i+1, j) only where
    `down_left[i, j]` (used for the saddles of a bilinear surface, see `pipeline.mining.boxes`).
    """
    shape = foreground.shape
    fg = foreground.reshape(-1, 1, *shape[-2:])
    region = seed.reshape(fg.shape) & fg
    if diagonals is None:
        fg, region = fg.float(), region.float()
        grow = lambda r: F.max_pool2d(r, 3, stride=1, padding=1) * fg  # noqa: E731
    else:
        down_right, down_left = (d.reshape(-1, 1, *d.shape[-2:]) for d in diagonals)
        grow = lambda r: _grow_4_and_diagonals(r, fg, down_right, down_left)  # noqa: E731
    count = region.sum()
    while True:
        for _ in range(check_every):
            region = grow(region)
        new_count = region.sum()
        if bool(new_count == count):
            return region.reshape(shape) > 0
        count = new_count


def _grow_4_and_diagonals(region, fg, down_right, down_left):
    out = region.clone()
    out[..., 1:, :] |= region[..., :-1, :]
    out[..., :-1, :] |= region[..., 1:, :]
    out[..., :, 1:] |= region[..., :, :-1]
    out[..., :, :-1] |= region[..., :, 1:]
    out &= fg
    out[..., 1:, 1:] |= region[..., :-1, :-1] & down_right
    out[..., :-1, :-1] |= region[..., 1:, 1:] & down_right
    out[..., 1:, :-1] |= region[..., :-1, 1:] & down_left
    out[..., :-1, 1:] |= region[..., 1:, :-1] & down_left
    return out


def argmax_seed(maps: torch.Tensor) -> torch.Tensor:
    """Bool `[..., h, w]`: True at the first (raster order) maximum of each map."""
    flat = maps.flatten(-2)
    seed = torch.zeros_like(flat, dtype=torch.bool)
    seed.scatter_(-1, flat.argmax(-1, keepdim=True), True)
    return seed.reshape(maps.shape)


def erase_component(norm: torch.Tensor, mask: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """One erasure step on maps already normalized over the unerased area (see `normalize_unerased`)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    # Erased pixels are 0 < threshold, so they are background; the seed has norm 1, so it is foreground
    # unless the whole map is erased, in which case the component is empty.
    component = connected_component(norm >= threshold, argmax_seed(norm))
    return mask.masked_fill(component, 0)


@torch.no_grad()
def erasure_step(cam: torch.Tensor, mask: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """Eq. 7 / sec. 3.2: `M_t` from `M_{t-1}` for a batch of `[..., h, w]` CAMs (e.g. `[B, C, h, w]`).

    `mask` holds 1 where kept and 0 where erased; the result has its dtype and device. No gradient flows:
    masks come from the current model without gradient (sec. 2.1).
    """
    return erase_component(normalize_unerased(cam, mask), mask, threshold)


# ---------------------------------------------------------------- reference (numpy + skimage, one map at a time)

def normalize_unerased_reference(cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
    cam = np.asarray(cam, dtype=np.float32)
    keep = np.asarray(mask) > 0
    norm = np.zeros_like(cam)
    if keep.any():
        lo, hi = cam[keep].min(), cam[keep].max()
        norm[keep] = (cam[keep] - lo) / (hi - lo) if hi > lo else 1.0
    return norm


def erasure_step_reference(cam: np.ndarray, mask: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """One `[h, w]` map: the obviously correct version of `erasure_step`."""
    from skimage.measure import label

    mask = np.array(mask, copy=True)
    keep = mask > 0
    if not keep.any():
        return mask
    norm = normalize_unerased_reference(cam, mask)
    labels = label(norm >= threshold, connectivity=2)
    seed = np.unravel_index(np.argmax(np.where(keep, norm, -1.0)), norm.shape)
    mask[labels == labels[seed]] = 0
    return mask
