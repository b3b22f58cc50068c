"""Batched geometric augmentation on the model's device: small zoom (random-resized crop), shift, rotation.

One affine `theta` per image maps output coordinates to input coordinates in grid_sample's normalized frame
(align_corners=False: pixel edge 0 is -1, edge S is +1):  p_in = A p_out + b,  A = R(angle) / zoom.
Boxes (xywh, pixels of the S x S input) move with their image through the inverse map; the result is the
axis-aligned hull of the moved corners, clipped to the image. Training reads no boxes (weak supervision);
the box path exists so that anything that does (e.g. a detector trained on exported boxes) stays consistent.

No horizontal flip: chest X-rays have a laterality (heart on the patient's left, gastric bubble, aortic
knob); a flipped film is an anatomically wrong image, and findings such as Cardiomegaly depend on the side.
Randomness comes from an explicit `torch.Generator`, so a batch's augmentation is a function of its seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.config.train import AugmentConfig


def sample_affine(n: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """`[n, 2, 3]` float32 thetas (CPU) drawn from `cfg`."""
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    zoom = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[:, 0]
    angle = math.radians(cfg.rotate) * (2 * u[:, 1] - 1)
    shift = 2 * cfg.shift * (2 * u[:, 2:] - 1)          # fraction of the side -> normalized units (side = 2)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return theta.float()


def warp_images(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Float images `[B,C,S,S]` resampled through `theta` (bilinear; outside the film is 0, i.e. black)."""
    grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)


def warp_boxes(boxes: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """xywh boxes `[K,4]` (pixels of the S x S input) -> where they land after `warp_images` with `theta [2,3]`."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float()
    x0, y0, w, h = boxes.double().unbind(1)
    corners = torch.stack([torch.stack([x0, y0], 1), torch.stack([x0 + w, y0], 1),
                           torch.stack([x0, y0 + h], 1), torch.stack([x0 + w, y0 + h], 1)], 1)  # [K,4,2]
    p_in = corners * (2.0 / size) - 1.0
    A, b = theta[:, :2].double(), theta[:, 2].double()
    p_out = (p_in - b) @ torch.linalg.inv(A).T                # invert p_in = A p_out + b
    pix = ((p_out + 1.0) * (size / 2.0)).clamp(0, size)
    lo, hi = pix.min(dim=1).values, pix.max(dim=1).values
    return torch.cat([lo, hi - lo], dim=1).float()


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator,
                  boxes: list[torch.Tensor] | None = None):
    """Augment a float batch `[B,C,S,S]`; returns (images, moved boxes or None)."""
    if not cfg.enabled:
        return x, boxes
    theta = sample_affine(x.shape[0], cfg, generator)
    moved = None if boxes is None else [warp_boxes(b, t, x.shape[-1]) for b, t in zip(boxes, theta)]
    return warp_images(x, theta), moved
