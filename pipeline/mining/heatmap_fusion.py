"""Attention mining at inference and the fused heatmap (Cai et al. 2018, eq. 7-8), batched torch.

Because the head is linear, the step-t CAM of eq. 7, ``(X ⊙ M_{t-1}) w^c``, is the step-1 CAM masked by
``M_{t-1}``; renormalized over the unerased area it is ``H_t`` (0 on erased pixels). So one backbone forward
gives all T steps: only the masks change. Eq. 8 then averages the T steps, each erased area filled in from the
earlier heatmaps:

    H_f = 1/T  Σ_t [ H_t + Σ_{t'<t} H_{t'} ⊙ (1 - M_{t'}) ].

Since ``H_{t'}`` is 0 wherever ``M_{t'-1}`` already erased, the inner sum at a pixel erased at step s is exactly
``H_s``: each erased area is filled from the step that erased it, and ``H_f`` stays in [0, 1] with value 1 at
the step-1 maximum. ``M_T`` never enters eq. 8, so T steps need T-1 erasures.
"""
from __future__ import annotations

import torch

from models.erasure import THRESHOLD, erase_component, normalize_unerased


@torch.no_grad()
def attention_mining(cam: torch.Tensor, steps: int = 3, threshold: float = THRESHOLD):
    """Step-1 CAMs `[..., h, w]` -> (`H` `[T, ..., h, w]`: H_1..H_T, `M` `[T-1, ..., h, w]`: M_1..M_{T-1})."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cam = cam.float()
    mask = torch.ones_like(cam)
    heatmaps, masks = [], []
    for t in range(steps):  # a loop over the T steps only; every map of the batch moves together
        heatmaps.append(normalize_unerased(cam, mask))               # H_{t+1}, eq. 7
        if t + 1 < steps:
            mask = erase_component(heatmaps[-1], mask, threshold)    # M_{t+1}
            masks.append(mask)
    empty = cam.new_empty((0, *cam.shape))
    return torch.stack(heatmaps), (torch.stack(masks) if masks else empty)


def fuse(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Eq. 8 as written, from `H` `[T, ...]` and `M` `[T-1, ...]` (see `attention_mining`)."""
    T = heatmaps.shape[0]
    filled = heatmaps[:-1] * (1 - masks)                      # H_{t'} ⊙ M̄_{t'}, t' = 1..T-1
    # Σ_t Σ_{t'<t} f_{t'} = Σ_{t'} (T - t') f_{t'}: term t' appears in every later step.
    weights = torch.arange(T - 1, 0, -1, dtype=heatmaps.dtype, device=heatmaps.device)
    weights = weights.reshape(-1, *([1] * (heatmaps.dim() - 1)))
    return (heatmaps.sum(0) + (weights * filled).sum(0)) / T


def fused_heatmap(cam: torch.Tensor, steps: int = 3, threshold: float = THRESHOLD) -> torch.Tensor:
    """`H_f` `[..., h, w]` in [0, 1] from step-1 CAMs `[..., h, w]` (eq. 7-8)."""
    return fuse(*attention_mining(cam, steps, threshold))
