"""Class-wise head (sec. 2.1, eq. 1-3): one weight vector w^c (+ bias b^c) per class on GAP features.

Returns logits; the sigmoid of eq. 2 is applied in the loss (`binary_cross_entropy_with_logits`).
The head is linear, so branch c on the erased map X ⊙ M^c (eq. 1) needs no per-class copy of X:
    (w^c)^T g(X ⊙ M^c) = mean_hw(CAM^c ⊙ M^c),   CAM^c = X · w^c,
where g is GAP over the full h x w grid (eq. 2 pools the erased map, zeros included).
`classwise_logits_reference` is the literal version (expand X per class, pool, dot), kept for tests.

`pool_top` < 1 replaces the mean by the mean of the top share of each class map's cells (k-max pooling,
WILDCAT): logit^c = topmean(CAM^c ⊙ M^c) + b^c; 1 is the paper's GAP. CAM^c itself does not change.
"""
from __future__ import annotations

import torch
from torch import nn


class ClassWiseHead(nn.Linear):
    """C binary branches; `weight[c]` is w^c (D,), `bias[c]` is b^c. Initialized like `nn.Linear`."""

    def __init__(self, in_features: int, out_features: int, pool_top: float = 1.0):
        super().__init__(in_features, out_features)
        if not 0 < pool_top <= 1:
            raise ValueError(f"pool_top must be in (0, 1], got {pool_top}")
        self.pool_top = float(pool_top)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", pool_top={self.pool_top}" if self.pool_top < 1 else "")

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """[B,C,h,w] -> [B,C]: the mean (pool_top 1, eq. 2) or the mean of the top `pool_top` share of cells."""
        if self.pool_top >= 1:
            return maps.mean(dim=(2, 3))
        flat = maps.flatten(2)
        k = max(1, round(self.pool_top * flat.shape[-1]))
        return flat.topk(k, dim=-1, sorted=False).values.mean(-1)

    def cam(self, X: torch.Tensor) -> torch.Tensor:
        """Class activation maps [B,C,h,w] = X · w^c for all classes in one contraction (no bias)."""
        return torch.einsum("bdhw,cd->bchw", X, self.weight.to(X.dtype))

    def forward(self, X: torch.Tensor, masks: torch.Tensor | None = None,
                pre_logits: bool = False) -> torch.Tensor:
        """Logits [B,C]. masks [B,C,h,w] (1 keep, 0 erased) gives branch c the map X ⊙ M^c (eq. 1-2).

        pre_logits=True returns the GAP features g(X) [B,D] (only without masks: they are per class).
        """
        if pre_logits and (masks is not None or self.pool_top < 1):
            raise ValueError("pre_logits has no single value with class-wise masks or top-share pooling")
        if masks is None and self.pool_top >= 1:
            pooled = X.mean(dim=(2, 3))
            return pooled if pre_logits else super().forward(pooled)
        if masks is None:
            cams = self.cam(X)
            return self.pool(cams) + self.bias.to(cams.dtype)
        if masks.shape[1] != self.out_features or masks.shape[-2:] != X.shape[-2:]:
            raise ValueError(f"masks must be [B,{self.out_features},{X.shape[-2]},{X.shape[-1]}], "
                             f"got {list(masks.shape)}")
        cams = self.cam(X)
        erased = cams * masks.to(cams.dtype)
        return self.pool(erased) + self.bias.to(erased.dtype)


def prior_bias(labels) -> torch.Tensor:
    """Log-odds of each class's prevalence in `labels` `[N, C]` (0/1), Laplace-smoothed ((k + 1) / (N + 2)), so
    that a new head starts at the base rate instead of p = 0.5 (the prior-probability initialization of Lin et
    al. 2017, sec. 4.1). A class absent from `labels` gets a finite, low prior."""
    labels = torch.as_tensor(labels, dtype=torch.float64)
    p = (labels.sum(0) + 1) / (labels.shape[0] + 2)
    return torch.log(p / (1 - p)).float()


def classwise_logits_reference(X: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor, pool_top: float = 1.0) -> torch.Tensor:
    """Eq. 1-2 literally: per class c, X^c = X ⊙ M^c (mask replicated over D), g = GAP, logit = w^c·g + b^c.
    With pool_top < 1, per image and class: the cell scores w^c·X^c[:, i, j], sorted, the top k averaged."""
    logits = []
    for c in range(weight.shape[0]):
        erased = X * masks[:, c:c + 1]                     # M^c replicated across the D channels
        if pool_top >= 1:
            logits.append(erased.mean(dim=(2, 3)) @ weight[c] + bias[c])
            continue
        per_image = []
        for b in range(X.shape[0]):
            cells = sorted((float(erased[b, :, i, j] @ weight[c]) for i in range(X.shape[2])
                            for j in range(X.shape[3])), reverse=True)
            k = max(1, round(pool_top * len(cells)))
            per_image.append(sum(cells[:k]) / k + float(bias[c]))
        logits.append(torch.tensor(per_image, dtype=X.dtype))
    return torch.stack(logits, dim=1)
