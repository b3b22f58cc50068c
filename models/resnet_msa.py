"""ResNet-MSA (sec. 2.3): backbone -> neck -> class-wise head, with timm's uniform calls.

    X = m.forward_features(x)          # [B,D,h,w]: MSA D=768 at stride 16; baseline: layer4 at stride 32
    logits = m.forward_head(X, masks)  # eq. 1-2, class-wise erasure when masks [B,C,h,w] are given
    logits = m.forward(x)
    feats = m.forward_intermediates(x) # {"layer3", "layer4", "msa" (= X), "logits"}: the KP layers K
    cams = m.cam(X)                    # [B,C,h,w]

CAM, AM and KP use these calls only and never reach inside the modules.
"""
from __future__ import annotations

import torch
from torch import nn

from models.backbones import BACKBONES
from models.head import ClassWiseHead
from models.msa import NECKS

NUM_CLASSES = 14


class ResNetMSA(nn.Module):
    """Classifier whose last feature map X feeds C class-wise branches (sec. 2.1)."""

    def __init__(self, arch: str = "resnet50", neck: str = "bilinear", num_classes: int = NUM_CLASSES,
                 pool_top: float = 1.0):
        super().__init__()
        if arch not in BACKBONES:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(BACKBONES)}")
        if neck not in NECKS:
            raise ValueError(f"unknown neck {neck!r}; choose one of {sorted(NECKS)}")
        self.arch, self.neck_name, self.num_classes = arch, neck, num_classes
        self.backbone = BACKBONES[arch]()
        self.neck = NECKS[neck](self.backbone.channels)
        self.num_features, self.feature_stride = self.neck.out_channels, self.neck.stride
        self.head = ClassWiseHead(self.num_features, num_classes, pool_top)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,1,S,S] (normalized gray) -> X [B,D,h,w]."""
        return self.neck(self.backbone(x))

    def forward_head(self, X: torch.Tensor, masks: torch.Tensor | None = None,
                     pre_logits: bool = False) -> torch.Tensor:
        """X -> logits [B,C]; masks [B,C,h,w] (1 keep, 0 erased) apply eq. 1 per class."""
        return self.head(X, masks, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, intermediates: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits [B,C]; intermediates=True returns `forward_intermediates(x)` instead.

        The switch exists for DistributedDataParallel, which syncs gradients only for work started in
        `forward`: call `ddp(x, intermediates=True)`, then `ddp.module.forward_head(X[:n], masks)` for AM.
        """
        if intermediates:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The maps of the KP layer set K (sec. 3.3): layer3, layer4, MSA output X, and unmasked logits.

        For the baseline neck "msa" is layer4 itself (X is what the head sees).
        """
        feats = self.backbone(x)
        X = self.neck(feats)
        return {"layer3": feats["layer3"], "layer4": feats["layer4"], "msa": X, "logits": self.forward_head(X)}

    def cam(self, X: torch.Tensor) -> torch.Tensor:
        """CAMs [B,C,h,w] = X · w^c (no bias; higher is more salient, not normalized)."""
        return self.head.cam(X)


def create_model(arch: str = "resnet50", neck: str = "bilinear", num_classes: int = NUM_CLASSES,
                 pool_top: float = 1.0) -> ResNetMSA:
    """Build any registered backbone x neck with random weights (see `pipeline.training.weights.load_imagenet`);
    `pool_top`: the head's pooling (1 = GAP, eq. 2; see `models.head`)."""
    return ResNetMSA(arch, neck, num_classes, pool_top)


def list_models() -> list[tuple[str, str]]:
    """All (arch, neck) pairs `create_model` accepts."""
    return [(a, n) for a in sorted(BACKBONES) for n in NECKS]
