"""Offline ImageNet weights for the backbone (DESIGN.md sec. 5): local torch hub cache only, never a download.

torchvision's file names are taken from its weight enums (data, not code), e.g. resnet50-11ad3fa6.pth
(IMAGENET1K_V2) or resnet50-0676ba61.pth (V1), looked for in `torch.hub.get_dir()/checkpoints`
(`$TORCH_HOME/hub/checkpoints`). Adapting them to our model: the RGB filters of conv1 are summed into one
gray channel (exact for a gray image replicated to RGB, which our 0.449/0.226 normalization mimics), and
the ImageNet `fc` is dropped (our class-wise head stays random).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torchvision.models import get_model_weights

log = logging.getLogger(__name__)


def imagenet_candidates(arch: str) -> list[tuple[str, str]]:
    """(file name, url) of torchvision's ImageNet weights for `arch`, the default (best) first."""
    enum = get_model_weights(arch)
    ordered = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    return [(os.path.basename(w.url), w.url) for w in ordered]


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def adapt_to_gray(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum conv1's RGB filters into one channel and drop the ImageNet classifier."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    return state


def load_imagenet(model: torch.nn.Module, arch: str) -> bool:
    """Load ImageNet weights into `model.backbone` from the local cache; False (and a message) if absent."""
    candidates = imagenet_candidates(arch)
    for name, _ in candidates:
        path = checkpoint_dir() / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # a truncated or foreign file must not silently mean "from scratch"
            raise RuntimeError(f"cannot read ImageNet weights {path}: {e}. Delete or replace the file.") from e
        model.backbone.load_state_dict(adapt_to_gray(state), strict=True)
        log.info("loaded ImageNet weights for %s from %s (conv1 summed to 1 channel, fc dropped)", arch, path)
        return True
    name, url = candidates[0]
    log.warning("No ImageNet weights for %s in the local torch cache: training from scratch. To use them, "
                "put %s (from %s) at %s", arch, name, url, checkpoint_dir() / name)
    return False
