"""Pure torch modules: backbone registry, MSA necks, class-wise head, erasure, KP loss. No I/O.

Names are imported lazily: `models.names` (what a config may name) loads without torch.
"""
import importlib

_EXPORTS = {
    "BACKBONES": "backbones", "register_backbone": "backbones", "NECKS": "msa",
    "ClassWiseHead": "head", "classwise_logits_reference": "head",
    "KP_LAYERS": "knowledge_preservation", "freeze_batchnorm": "knowledge_preservation",
    "frozen_copy": "knowledge_preservation", "kp_loss": "knowledge_preservation",
    "ResNetMSA": "resnet_msa", "create_model": "resnet_msa", "list_models": "resnet_msa",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"models.{_EXPORTS[name]}"), name)
