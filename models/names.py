"""The names a config may give, importable without torch: `harvest train --config` checks a config in a fraction
of a second, before torch loads. The registries (`models.backbones.BACKBONES`, `models.msa.NECKS`) are keyed by
these names, and a test checks that they agree."""
BACKBONE_NAMES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")
NECK_NAMES: tuple[str, ...] = ("baseline", "bilinear", "deconv")
KP_LAYERS: tuple[str, ...] = ("layer3", "layer4", "msa", "logits")   # the layers K of sec. 3.3
