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
label propagation with pointer jumping (`connected_component`). ``erasure_step_reference``
does the same with numpy and ``skimage.measure.label``, one map at a time; a test holds them bit-equal.
"""
from __future__ import annotations

import numpy as np
import torch

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


def connected_component(foreground: torch.Tensor, seed: torch.Tensor, diagonals=None) -> torch.Tensor:
    """8-connected component of `foreground` that holds `seed`, for a batch of `[..., h, w]` bool maps.

    Label propagation with hooking and pointer jumping (Shiloach-Vishkin style, as GPU connected-component
    labelling does it), so the number of rounds grows with the log of a component's length, not with the length:
    every foreground pixel starts labelled with its own flat index; each round takes the minimum label over the
    pixel's neighbourhood, lowers the label of the pixel's current root to it (scatter-min), and jumps labels
    twice through their roots (label[label]). Labels only fall and always name a pixel of the same component,
    so when a round changes nothing every component carries one label. The seed's component is its label.

    `diagonals=(down_right, down_left)`, bool `[..., h-1, w-1]`, makes diagonal steps conditional instead: cell
    (i, j) joins (i+1, j+1) only where `down_right[i, j]`, and (i, j+1) joins (i+1, j) only where
    `down_left[i, j]` (used for the saddles of a bilinear surface, see `pipeline.mining.boxes`).
    """
    shape = foreground.shape
    h, w = shape[-2:]
    fg = foreground.reshape(-1, h, w)
    maps, n = fg.shape[0], h * w
    sink = n                        # the label of background, and a spare slot that background scatters into
    labels = torch.where(fg, torch.arange(n, device=fg.device).view(1, h, w), sink)
    links = None if diagonals is None else tuple(_pad_links(d.reshape(-1, h - 1, w - 1)) for d in diagonals)
    spare = labels.new_full((maps, 1), sink)
    while True:
        low = torch.where(fg, _neighbourhood_min(labels, links, sink), sink).flatten(1)
        root = torch.cat([low, spare], 1)
        root.scatter_reduce_(1, labels.flatten(1), low, "amin")        # hook: a root takes its members' minimum
        root = root.gather(1, root)                                   # jump: label[label], twice
        root = root.gather(1, root)
        new = root[:, :n].view(maps, h, w)
        if torch.equal(new, labels):
            break
        labels = new
    seed = seed.reshape(maps, n) & fg.reshape(maps, n)
    seed_label = labels.flatten(1).gather(1, seed.to(torch.uint8).argmax(1, keepdim=True))
    return ((labels == seed_label.view(maps, 1, 1)) & fg & seed.any(1).view(maps, 1, 1)).reshape(shape)


def _pad_links(link: torch.Tensor) -> torch.Tensor:
    """`[M, h-1, w-1]` diagonal links -> `[M, h+1, w+1]`, the link of cell (i, j) at (i+1, j+1), zeros around."""
    return torch.nn.functional.pad(link, (1, 1, 1, 1))


def _neighbourhood_min(labels: torch.Tensor, links, sink: int) -> torch.Tensor:
    """Minimum label over each pixel and its neighbours: the 3x3 window, or the 4 neighbours and the diagonals
    that `links` (padded by `_pad_links`) allow."""
    P = torch.nn.functional.pad(labels, (1, 1, 1, 1), value=sink)
    if links is None:  # separable 3x3 minimum: along rows, then along columns
        row = torch.minimum(torch.minimum(P[..., :, :-2], P[..., :, 1:-1]), P[..., :, 2:])
        return torch.minimum(torch.minimum(row[..., :-2, :], row[..., 1:-1, :]), row[..., 2:, :])
    out = torch.minimum(torch.minimum(P[..., 1:-1, :-2], P[..., 1:-1, 2:]),
                        torch.minimum(P[..., :-2, 1:-1], P[..., 2:, 1:-1]))
    out = torch.minimum(out, labels)
    down_right, down_left = links
    for link, neighbour in ((down_right[:, 1:, 1:], P[..., 2:, 2:]), (down_right[:, :-1, :-1], P[..., :-2, :-2]),
                            (down_left[:, 1:, :-1], P[..., 2:, :-2]), (down_left[:, :-1, 1:], P[..., :-2, 2:])):
        out = torch.minimum(out, torch.where(link, neighbour, sink))
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
