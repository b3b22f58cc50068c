"""The training loop (torchvision-references style): data path, losses, `train_one_epoch`, `evaluate`.

Data path: the uint8 cache is gathered by shuffled index batches (`CacheDataset.get_batch`), moved as uint8,
then augmented and normalized on the model's device. Every random draw is a function of
(seed, stage, epoch, step), so a run resumed mid-epoch replays exactly the batches an uninterrupted run sees.

Losses are modules (`ClassificationLoss`, `AttentionMiningLoss`) so that DDP wraps the whole step: DDP
only hooks `forward`, while AM needs `forward_intermediates`, `cam` and `forward_head` (sec. 2.1-2.2).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.special import expit
from torch import nn
from tqdm import tqdm

from models.erasure import erasure_step
from models.knowledge_preservation import kp_loss
from pipeline.base.amp import autocast, device_of
from pipeline.config.train import AMConfig, AugmentConfig, RuntimeConfig
from pipeline.images.dataset import normalize
from pipeline.training.augment import augment_batch
from pipeline.training.metrics import auroc, summarize

log = logging.getLogger("pipeline.training")


# ------------------------------------------------------------------ devices and distribution

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(runtime: RuntimeConfig) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = device_of(runtime.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True      # fixed input size: pick the fastest convolutions once
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    return info, device


# ------------------------------------------------------------------ data path

def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def epoch_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Shuffled global index batches of one epoch; the ragged tail is dropped (full batches keep n/N exact)."""
    if n < batch_size:
        raise ValueError(f"{n} training images are fewer than one batch of {batch_size}; lower runtime.batch_size")
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def shard(batch: np.ndarray, d: Dist) -> np.ndarray:
    """This rank's contiguous slice of a global batch (DistributedSampler-equivalent, per batch)."""
    if len(batch) % d.world:
        raise ValueError(f"batch of {len(batch)} does not split over {d.world} processes")
    per = len(batch) // d.world
    return batch[d.rank * per:(d.rank + 1) * per]


class _Batches(torch.utils.data.Dataset):
    """Item k = the k-th index batch, gathered in one call from the cache shards."""

    def __init__(self, dataset, batches: list[np.ndarray]):
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        b = self.dataset.get_batch(self.batches[k])
        return {"image": b["image"], "labels": b["labels"]}


def batch_loader(dataset, batches: list[np.ndarray], runtime: RuntimeConfig, device: torch.device):
    """Iterate gathered batches (worker processes overlap gathering with compute when `workers` > 0)."""
    return torch.utils.data.DataLoader(_Batches(dataset, batches), batch_size=None, shuffle=False,
                                       num_workers=runtime.workers, pin_memory=device.type == "cuda")


def prepare(images: torch.Tensor, device: torch.device, runtime: RuntimeConfig,
            augment: AugmentConfig | None = None, seed: int = 0) -> torch.Tensor:
    """uint8 [B,1,S,S] -> augmented, normalized float on `device` (channels_last when configured)."""
    x = images.to(device, non_blocking=True).float()
    if augment is not None and augment.enabled:
        x, _ = augment_batch(x, augment, torch.Generator().manual_seed(seed))
    x = normalize(x, device)
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x


# ------------------------------------------------------------------ losses (eq. 1-6)

def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 2-3: mean over images and classes of the per-branch binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class ClassificationLoss(nn.Module):
    """Plain multi-label classification (stages base, msa_init, end_to_end)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        loss = bce(self.model(x), y)
        return loss, {"loss_cls": loss.detach()}


@torch.no_grad()
def erasure_masks(model: nn.Module, X: torch.Tensor, steps: int) -> torch.Tensor:
    """M^c after `steps` erasure steps (eq. 7), from the current model's CAMs, without gradient.

    M_0 = 1; M_k = erasure_step(CAM, M_{k-1}). Because the head is linear, H_k = CAM ⊙ M_{k-1}, and
    `erasure_step` normalizes over the unerased area, which is exactly eq. 7.
    """
    cam = model.cam(X.detach()).float()
    mask = torch.ones_like(cam)
    for _ in range(steps):
        mask = erasure_step(cam, mask)
    return mask


class AttentionMiningLoss(nn.Module):
    """AM stage t (eq. 1-6): L = L_cls + lambda L_KP.

    The first n = round(N * am_fraction) images of the (per-process) batch are attention-mined: branch c
    sees X ⊙ M_{t-1}^c (t-1 erasure steps from the current model, no gradient; t = 1 erases nothing). The
    other N-n images keep their unerased classification loss when `cls_on_preserved`, and in mode `kp` add
    L_KP between the frozen N_A (`reference`) and the trained N_B over the layers K. Mode `none` mines all N.
    """

    def __init__(self, model: nn.Module, cfg: AMConfig, t: int, reference: nn.Module | None = None):
        super().__init__()
        if cfg.mode == "kp" and reference is None:
            raise ValueError("mode 'kp' needs the frozen pre-AM network N_A as `reference`")
        self.model, self.cfg, self.t = model, cfg, t
        self._reference = (reference,)        # a tuple: not a submodule, so DDP neither syncs nor trains N_A

    def split(self, N: int) -> int:
        return N if self.cfg.mode == "none" else min(N, max(1, round(N * self.cfg.am_fraction)))

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        N = x.shape[0]
        n = self.split(N)
        feats = self.model.forward_intermediates(x)
        X = feats["msa"]
        masks = torch.ones(N, y.shape[1], *X.shape[-2:], device=X.device, dtype=X.dtype)
        masks[:n] = erasure_masks(self.model, X[:n], self.t - 1).to(X.dtype)
        rows = slice(None) if self.cfg.cls_on_preserved else slice(0, n)
        loss_cls = bce(self.model.forward_head(X[rows], masks[rows]), y[rows])
        logs = {"loss_cls": loss_cls.detach(), "erased_frac": 1 - masks[:n].float().mean().detach()}
        if self.cfg.mode != "kp" or n == N:
            return loss_cls, logs
        feats_a = self._reference[0].forward_intermediates(x[n:])           # no gradient (frozen N_A)
        feats_b = {k: v[n:] for k, v in feats.items()}
        loss_kp = kp_loss(feats_a, feats_b, tuple(self.cfg.kp_layers), self.cfg.kp_reduction)
        logs["loss_kp"] = loss_kp.detach()
        return loss_cls + self.cfg.kp_lambda * loss_kp, logs


# ------------------------------------------------------------------ loop

def train_step(step_module: nn.Module, optimizer, scheduler, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, runtime: RuntimeConfig, clip: float = 0.0):
    """One optimizer step on a prepared batch; returns (loss, logs).

    `clip` > 0 clips the gradient norm (after DDP's all-reduce, so every rank clips alike). AM stages need
    it: L_KP (eq. 4) is a norm, not a squared norm, so its gradient keeps unit size however close N_B is
    to N_A, and with momentum the features overshoot and oscillate (L_KP grew to ~10 in a few steps).
    """
    with autocast(device, runtime.amp):
        loss, logs = step_module(x, y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(
            [p for group in optimizer.param_groups for p in group["params"]], clip).detach()
    optimizer.step()
    scheduler.step()
    return loss, logs


def train_one_epoch(step_module: nn.Module, optimizer, scheduler, dataset, batches: list[np.ndarray], *,
                    device: torch.device, runtime: RuntimeConfig, augment: AugmentConfig | None, seed: int,
                    d: Dist = Dist(), start_step: int = 0, on_step=None, desc: str = "train",
                    clip: float = 0.0) -> dict:
    """One pass over `batches[start_step:]` (global index batches; this rank takes its shard).

    `on_step(step)` runs after each optimizer step with the number of steps done in this epoch; it may save
    a resume checkpoint or raise to stop. Returns mean losses, steps and images per second.
    """
    local = [shard(b, d) for b in batches[start_step:]]
    totals: dict[str, float] = {}
    t0, steps = time.perf_counter(), 0
    bar = tqdm(total=len(local), desc=desc, unit="step", disable=not d.main, leave=False, mininterval=2)
    for k, batch in enumerate(batch_loader(dataset, local, runtime, device)):
        step = start_step + k
        x = prepare(batch["image"], device, runtime, augment, seed_of(seed, step, d.rank))   # ranks differ
        loss, logs = train_step(step_module, optimizer, scheduler, x, batch["labels"].to(device, non_blocking=True),
                                device, runtime, clip)
        steps += 1
        for key, v in {"loss": loss.detach(), **logs}.items():
            totals[key] = totals.get(key, 0.0) + float(v)
        bar.update(1)
        if d.main and runtime.log_every and (step + 1) % runtime.log_every == 0:
            log.info("%s step %d/%d loss %.4f lr %.2e", desc, step + 1, len(batches), float(loss.detach()),
                     optimizer.param_groups[0]["lr"])
        if on_step is not None:
            on_step(step + 1)
    bar.close()
    seconds = time.perf_counter() - t0
    out = {k: v / max(steps, 1) for k, v in totals.items()}
    images = steps * (len(batches[0]) if batches else 0)
    out.update(steps=steps, img_per_s=images / seconds if seconds > 0 else math.nan)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, device: torch.device, runtime: RuntimeConfig,
             d: Dist = Dist()) -> dict:
    """Validation BCE and per-class AUROC over the whole split (ranks score shards, then gather)."""
    was_training = model.training
    model.eval()
    idx = np.array_split(np.arange(len(dataset)), d.world)[d.rank]
    batches = [idx[i:i + runtime.eval_batch_size] for i in range(0, len(idx), runtime.eval_batch_size)]
    scores, labels = [np.zeros((0, 14), np.float32)], [np.zeros((0, 14), np.float32)]
    for batch in batch_loader(dataset, batches, runtime, device):
        with autocast(device, runtime.amp):
            logits = model(prepare(batch["image"], device, runtime))
        scores.append(logits.float().cpu().numpy())
        labels.append(batch["labels"].numpy())
    model.train(was_training)
    part = (np.concatenate(scores), np.concatenate(labels))
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, part)
        part = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    logits, y = part
    loss = float(bce(torch.from_numpy(logits), torch.from_numpy(y))) if len(y) else math.nan
    return summarize(auroc(expit(logits), y), loss)
