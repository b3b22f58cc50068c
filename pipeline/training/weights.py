"""Offline ImageNet weights for the backbone (docs/design.md#method): local torch hub cache only, never a download.

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

from pipeline.base.files import matches_record
from pipeline.config.check import WEIGHTS_FORMAT, weights_problem   # checked torch-free when a config loads

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


# ------------------------------------------------------------------ project-made weights (`model.init`)

def export_weights(home, model_id: str, out: str | os.PathLike) -> str:
    """Write a trained stage's weights as a small file to start other trainings from (`model.init`): float
    tensors in float16 (half the size; a starting point needs no more), with the stage's meta. Returns sha256,
    also recorded beside the file (`<out>.sha256`, checked by `load_init`)."""
    from pipeline.base.files import record_sha256
    from pipeline.base.home import Home
    from pipeline.training.checkpoint import FINAL, load_checkpoint

    state = load_checkpoint(Home.resolve(home).checkpoints / model_id / FINAL)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    meta = {k: state["meta"][k] for k in ("model_id", "stage", "arch", "neck", "input_size", "fingerprint",
                                          "metrics") if k in state["meta"]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": WEIGHTS_FORMAT, "model": weights, "meta": meta}, out)
    return record_sha256(out, out)


def load_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the `backbone.*` entries of a whole model's state dict into `model.backbone` (a new neck or head)."""
    model.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                    if k.startswith("backbone.")})


def load_init(model: torch.nn.Module, path: str | os.PathLike, arch: str) -> bool:
    """Load `model.init` weights into `model`: the whole model when every key fits (returns True), else the
    backbone only (a new neck or head: returns False). A file that is not ours: ValueError, one line."""
    problem = weights_problem(path) or ("does not match its recorded sha256 (modified or truncated)"
                                        if matches_record(path) is False else None)
    try:
        state = None if problem else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # a damaged archive, a foreign pickle: torch's message runs over many lines
        problem = f"cannot be loaded: {' '.join(str(exc).split())[:200]}"
    if problem:
        raise ValueError(f"model.init {path}: {problem}")
    if not isinstance(state, dict) or state.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a cxr-harvest weights file (expected format {WEIGHTS_FORMAT!r})")
    if state["meta"].get("arch") != arch:
        raise ValueError(f"{path} holds {state['meta'].get('arch')} weights; the config's model.arch is {arch}")
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    whole = set(weights) == set(model.state_dict()) and all(
        weights[k].shape == v.shape for k, v in model.state_dict().items())
    if whole:
        model.load_state_dict(weights)
    else:
        load_backbone(model, weights)
    log.info("started from %s (%s, stage %s of %s): %s", path, arch, state["meta"].get("stage"),
             state["meta"].get("model_id"), "whole model" if whole else "backbone only")
    return whole


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="export a trained stage's weights for `model.init`")
    ap.add_argument("command", choices=["export"])
    ap.add_argument("--home", required=True)
    ap.add_argument("--model", required=True, help="model id of the stage")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(f"{args.out}: sha256 {export_weights(args.home, args.model, args.out)}")
