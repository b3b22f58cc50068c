"""The detector: torchvision Faster R-CNN on a ResNet-FPN whose ResNet is the mining run's classifier backbone.

Why Faster R-CNN (docs/results.md#downstream-detector): the harvested boxes are few per image (rank 1 of each
labeled finding) and of a few sizes per finding; a two-stage detector with anchors fitted to those sizes learns
from a few hundred images, and its RoI head scores each box per finding, which is what the Wang/Cai protocol
and COCO AP rank by. The backbone is the classifier's own (gray 1-channel `conv1`, weights of the run's
model), so the detector starts from the features that made the boxes; nothing is downloaded
(`weights=None`), BatchNorm is frozen (detection batches are small). Images enter at the cache size
(`min_size = max_size = S`: no resize), normalized like the classifier's (`pipeline.images.dataset.NORM_*`).
"""
from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pipeline.base.vocab import FINDINGS
from pipeline.images.dataset import NORM_MEAN, NORM_STD

NUM_CLASSES = len(FINDINGS) + 1      # background + the 14 findings; label k is FINDINGS[k - 1]
RETURNED_LAYERS = (2, 3, 4)          # FPN levels at strides 8, 16, 32, plus a max-pooled level at 64
N_LEVELS = len(RETURNED_LAYERS) + 1


def fit_anchors(wh: np.ndarray, size: int, n_levels: int = N_LEVELS) -> dict:
    """Anchor sizes (one per FPN level) and aspect ratios (h/w) fitted to training boxes `wh [N,2]` (input frame):
    sizes at the (k + 0.5) / n quantiles of sqrt(w h), ratios at the 10/50/90 % quantiles of h / w. Without
    boxes: sizes spread geometrically over [S/16, S/2], ratios 0.5, 1, 2."""
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    wh = wh[(wh > 0).all(1)]
    if len(wh) < n_levels:
        sizes = np.geomspace(size / 16, size / 2, n_levels)
        ratios = np.array([0.5, 1.0, 2.0])
    else:
        sizes = np.quantile(np.sqrt(wh.prod(1)), (np.arange(n_levels) + 0.5) / n_levels)
        ratios = np.quantile(wh[:, 1] / wh[:, 0], (0.1, 0.5, 0.9))
    sizes = np.maximum.accumulate(np.maximum(np.round(sizes), 4.0))
    sizes = sizes + np.arange(n_levels) * (np.diff(sizes, prepend=-np.inf) <= 0)   # strictly increasing
    ratios = np.unique(np.round(np.clip(ratios, 0.25, 4.0), 2))
    return {"sizes": [float(s) for s in sizes], "ratios": [float(r) for r in ratios]}


def build_detector(arch: str, size: int, anchors: dict, *, representation: int = 256, score_thresh: float = 0.01,
                   detections_per_img: int = 100, rpn_top_n: tuple[int, int] = (600, 300),
                   box_batch: int = 128, trainable_layers: int = 5) -> FasterRCNN:
    """A Faster R-CNN for 1-channel `size` px images with random weights (see :func:`init_from_classifier`).
    `rpn_top_n`: proposals kept before/after NMS per image (training; half at inference)."""
    resnet = getattr(torchvision.models, arch)(weights=None, norm_layer=FrozenBatchNorm2d)
    old = resnet.conv1
    resnet.conv1 = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    backbone = _resnet_fpn_extractor(resnet, trainable_layers, returned_layers=list(RETURNED_LAYERS),
                                     extra_blocks=LastLevelMaxPool())
    generator = AnchorGenerator(sizes=tuple((s,) for s in anchors["sizes"]),
                                aspect_ratios=(tuple(anchors["ratios"]),) * len(anchors["sizes"]))
    levels = [str(k) for k in range(len(RETURNED_LAYERS))]
    pre, post = rpn_top_n
    return FasterRCNN(
        backbone, num_classes=None, min_size=size, max_size=size, image_mean=[NORM_MEAN], image_std=[NORM_STD],
        rpn_anchor_generator=generator, box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, NUM_CLASSES),
        rpn_pre_nms_top_n_train=pre, rpn_post_nms_top_n_train=post,
        rpn_pre_nms_top_n_test=max(pre // 2, 1), rpn_post_nms_top_n_test=max(post // 2, 1),
        box_batch_size_per_image=box_batch, box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_img)


def init_from_classifier(detector: FasterRCNN, classifier_state: dict[str, torch.Tensor]) -> int:
    """Load the classifier's `backbone.*` weights (conv1 .. layer4) into the detector's ResNet; returns how
    many tensors were loaded. The FPN, RPN and RoI heads stay random."""
    state = {k.removeprefix("backbone."): v for k, v in classifier_state.items() if k.startswith("backbone.")}
    body = detector.backbone.body
    state = {k: v for k, v in state.items() if k.split(".")[0] in dict(body.named_children())}
    body.load_state_dict(state, strict=True)
    return len(state)
