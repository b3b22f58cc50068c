"""Knowledge preservation, KP (sec. 2.2, eq. 4-6).

N_A is a frozen copy of the network taken before attention mining; N_B is trained. On the N-n images of a
batch that get no AM, the GAP features of the layers K = {layer3, layer4, MSA, logits} (sec. 3.3) of N_A
and N_B are pulled together:
    L^k  = (1/(N-n)) Σ_i ||g(X_A(k),i) - g(X_B(k),i)||_2          (eq. 4, our reading)
    L_KP = (1/|K|) Σ_k L^k                                         (eq. 5)
g is GAP over h x w for 4-D maps and the identity for logits.

Our reading of eq. 4: the 1/(N-n) normalizes a sum over images, so we take the mean over images of the
per-image ℓ2 distance (`reduction="mean"`). The literal formula, the Frobenius norm of the (N-n) x D
difference divided by N-n, is `reduction="literal"`; it shrinks like 1/sqrt(N-n) with batch size, which
would make λ = 0.5 (eq. 6) depend on the batch size.

BatchNorm: N_A stays in eval mode (its response to an image is the original network's, independent of
the batch). For L_KP to start at exactly 0 ("initially N_A and N_B are identical"), N_B's BatchNorm must
run in eval mode too during AM/KP stages: call `freeze_batchnorm(N_B)` after each `N_B.train()`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from models.names import KP_LAYERS


def gap_features(t: torch.Tensor) -> torch.Tensor:
    """g(.): GAP over h x w for [N,D,h,w] maps, identity for [N,C] logits; computed in float32."""
    return t.mean(dim=(2, 3), dtype=torch.float32) if t.dim() == 4 else t.float()


def kp_loss(feats_a: dict[str, torch.Tensor], feats_b: dict[str, torch.Tensor],
            layers: tuple[str, ...] = KP_LAYERS, reduction: str = "mean") -> torch.Tensor:
    """L_KP (eq. 4-5) between N_A's features (no gradient) and N_B's, both from `forward_intermediates`."""
    if reduction not in ("mean", "literal"):
        raise ValueError(f"reduction must be 'mean' or 'literal', got {reduction!r}")
    per_layer = []
    for k in layers:
        diff = gap_features(feats_b[k]) - gap_features(feats_a[k]).detach()   # N_A gets no gradient
        if reduction == "mean":
            per_layer.append(torch.linalg.vector_norm(diff, dim=1).mean())
        else:
            per_layer.append(torch.linalg.vector_norm(diff) / diff.shape[0])
    return torch.stack(per_layer).mean()


class FrozenNetwork(nn.Module):
    """N_A: a deep copy that never trains. Parameters need no grad, and `.train()` leaves it in eval."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(model).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenNetwork":
        return self   # a parent's .train() must not switch N_A's BatchNorm to batch statistics

    @torch.no_grad()
    def forward_intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net.forward_intermediates(x)

    forward = forward_intermediates


def frozen_copy(model: nn.Module) -> FrozenNetwork:
    """N_A for eq. 4: take it right before AM starts."""
    return FrozenNetwork(model)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm of `model` in eval mode (running statistics used, not updated); returns model."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model
