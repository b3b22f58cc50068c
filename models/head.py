"""Class-wise head (sec. 2.1, eq. 1-3): one weight vector w^c (+ bias b^c) per class on GAP features.

Returns logits; the sigmoid of eq. 2 is applied in the loss (`binary_cross_entropy_with_logits`).
The head is linear, so branch c on the erased map X ⊙ M^c (eq. 1) needs no per-class copy of X:
    (w^c)^T g(X ⊙ M^c) = mean_hw(CAM^c ⊙ M^c),   CAM^c = X · w^c,
where g is GAP over the full h x w grid (eq. 2 pools the erased map, zeros included).
`classwise_logits_reference` is the literal version (expand X per class, pool, dot), kept for tests.
"""
from __future__ import annotations

import torch
from torch import nn


class ClassWiseHead(nn.Linear):
    """C binary branches; `weight[c]` is w^c (D,), `bias[c]` is b^c. Initialized like `nn.Linear`."""

    def cam(self, X: torch.Tensor) -> torch.Tensor:
        """Class activation maps [B,C,h,w] = X · w^c for all classes in one contraction (no bias)."""
        return torch.einsum("bdhw,cd->bchw", X, self.weight.to(X.dtype))

    def forward(self, X: torch.Tensor, masks: torch.Tensor | None = None,
                pre_logits: bool = False) -> torch.Tensor:
        """Logits [B,C]. masks [B,C,h,w] (1 keep, 0 erased) gives branch c the map X ⊙ M^c (eq. 1-2).

        pre_logits=True returns the GAP features g(X) [B,D] (only without masks: they are per class).
        """
        if masks is None:
            pooled = X.mean(dim=(2, 3))
            return pooled if pre_logits else super().forward(pooled)
        if pre_logits:
            raise ValueError("pre_logits has no single value with class-wise masks")
        if masks.shape[1] != self.out_features or masks.shape[-2:] != X.shape[-2:]:
            raise ValueError(f"masks must be [B,{self.out_features},{X.shape[-2]},{X.shape[-1]}], "
                             f"got {list(masks.shape)}")
        cams = self.cam(X)
        erased = cams * masks.to(cams.dtype)
        return erased.mean(dim=(2, 3)) + self.bias.to(erased.dtype)


def prior_bias(labels) -> torch.Tensor:
    """Log-odds of each class's prevalence in `labels` `[N, C]` (0/1), Laplace-smoothed ((k + 1) / (N + 2)), so
    that a new head starts at the base rate instead of p = 0.5 (the prior-probability initialization of Lin et
    al. 2017, sec. 4.1). A class absent from `labels` gets a finite, low prior."""
    labels = torch.as_tensor(labels, dtype=torch.float64)
    p = (labels.sum(0) + 1) / (labels.shape[0] + 2)
    return torch.log(p / (1 - p)).float()


def classwise_logits_reference(X: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor) -> torch.Tensor:
    """Eq. 1-2 literally: per class c, X^c = X ⊙ M^c (mask replicated over D), g = GAP, logit = w^c·g + b^c."""
    logits = []
    for c in range(weight.shape[0]):
        erased = X * masks[:, c:c + 1]                     # M^c replicated across the D channels
        logits.append(erased.mean(dim=(2, 3)) @ weight[c] + bias[c])
    return torch.stack(logits, dim=1)
