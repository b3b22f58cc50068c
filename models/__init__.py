"""Pure torch modules: backbone registry, MSA necks, class-wise head, erasure, KP loss. No I/O."""
from models.backbones import BACKBONES, register_backbone
from models.head import ClassWiseHead, classwise_logits_reference
from models.knowledge_preservation import KP_LAYERS, freeze_batchnorm, frozen_copy, kp_loss
from models.msa import NECKS
from models.resnet_msa import ResNetMSA, create_model, list_models

__all__ = [
    "BACKBONES", "NECKS", "KP_LAYERS", "ClassWiseHead", "ResNetMSA", "classwise_logits_reference",
    "create_model", "freeze_batchnorm", "frozen_copy", "kp_loss", "list_models", "register_backbone",
]
