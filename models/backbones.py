"""Backbone registry: torchvision ResNets with single-channel input, exposing layer3 and layer4.

The paper uses ResNet-50 (sec. 2.3); ResNet-18/34 are CPU-sized options. Variants are registered functions,
so `BACKBONES[name]()` builds any of them (timm-style). Weights are always random here: loading ImageNet
weights is the loader's job (`pipeline.training.weights.load_imagenet`), never the constructor's.
"""
from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn

BACKBONES: dict[str, Callable[[], "ResNetBackbone"]] = {}


def register_backbone(fn: Callable[[], "ResNetBackbone"]) -> Callable[[], "ResNetBackbone"]:
    """Register a backbone constructor under its function name."""
    BACKBONES[fn.__name__] = fn
    return fn


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc, taking 1-channel input, returning layer3 and layer4.

    Submodule names equal torchvision's (`conv1`, `bn1`, `layer1`..`layer4`), so an ImageNet state dict
    loads directly once `fc` is dropped and `conv1`'s RGB filters are summed.
    """

    def __init__(self, resnet: torchvision.models.ResNet):
        super().__init__()
        old = resnet.conv1
        # Gray input: a 1-channel stem with the same geometry as torchvision's.
        self.conv1 = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1, self.relu, self.maxpool = resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        self.channels = {"layer3": _out_channels(self.layer3), "layer4": _out_channels(self.layer4)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        layer3 = self.layer3(self.layer2(self.layer1(x)))
        return {"layer3": layer3, "layer4": self.layer4(layer3)}


def _out_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2   # Bottleneck vs BasicBlock
    return last_bn.num_features


@register_backbone
def resnet18() -> ResNetBackbone:
    return ResNetBackbone(torchvision.models.resnet18(weights=None))


@register_backbone
def resnet34() -> ResNetBackbone:
    return ResNetBackbone(torchvision.models.resnet34(weights=None))


@register_backbone
def resnet50() -> ResNetBackbone:
    return ResNetBackbone(torchvision.models.resnet50(weights=None))
