"""Necks: the baseline (layer4 as is) and multi-scale aggregation, MSA (sec. 2.3, Table 1).

MSA: layer4 (stride 32) -> 1x1 conv to 512 -> x2 upsampling (bilinear, or a 3x3 deconvolution);
layer3 (stride 16) -> 1x1 conv to 256; concatenated: X has 768 channels at stride 16.

Our reading where the paper is silent: the 1x1 convs (with bias) and the deconvolution are linear, with no
BatchNorm or ReLU, as the text names only the convolutions. The upsampled map is cropped/padded to layer3's
size, so odd input sizes work (layer4 is ceil(layer3 / 2), hence 2x layer4 is at most one cell larger).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLED_CHANNELS = 512    # path one: layer4 -> 512
LATERAL_CHANNELS = 256      # path two: layer3 -> 256


class BaselineNeck(nn.Module):
    """The original ResNet: X is layer4 itself (stride 32). Table 1's "baseline"."""

    def __init__(self, channels: dict[str, int]):
        super().__init__()
        self.out_channels, self.stride = channels["layer4"], 32

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return feats["layer4"]


class MSANeck(nn.Module):
    """X = [up(conv1x1(layer4)), conv1x1(layer3)], 768 channels at stride 16 (sec. 2.3)."""

    def __init__(self, channels: dict[str, int], upsample: str = "bilinear"):
        super().__init__()
        if upsample not in ("bilinear", "deconv"):
            raise ValueError(f"upsample must be 'bilinear' or 'deconv', got {upsample!r}")
        self.upsample = upsample
        self.reduce4 = nn.Conv2d(channels["layer4"], UPSAMPLED_CHANNELS, kernel_size=1)
        self.reduce3 = nn.Conv2d(channels["layer3"], LATERAL_CHANNELS, kernel_size=1)
        # Deconvolution [Noh et al.] with a 3x3 kernel: stride 2 gives exactly 2h x 2w.
        self.deconv = (nn.ConvTranspose2d(UPSAMPLED_CHANNELS, UPSAMPLED_CHANNELS, kernel_size=3, stride=2,
                                          padding=1, output_padding=1)
                       if upsample == "deconv" else None)
        self.out_channels, self.stride = UPSAMPLED_CHANNELS + LATERAL_CHANNELS, 16

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        lateral = self.reduce3(feats["layer3"])
        size = lateral.shape[-2:]
        top = self.reduce4(feats["layer4"])
        if self.deconv is None:
            top = F.interpolate(top, size=size, mode="bilinear", align_corners=False)
        else:
            top = _fit(self.deconv(top), size)
        return torch.cat([top, lateral], dim=1)


def _fit(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Crop (or zero-pad) the bottom/right edge of x to `size`."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    return F.pad(x, (0, dw, 0, dh)) if (dh or dw) else x


NECKS: dict[str, Callable[[dict[str, int]], nn.Module]] = {
    "baseline": BaselineNeck,
    "bilinear": lambda channels: MSANeck(channels, "bilinear"),
    "deconv": lambda channels: MSANeck(channels, "deconv"),
}
