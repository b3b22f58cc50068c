"""Train the detector on one mining run's boxes, resumably, and register it (`models`, stage 'detector').

The detector's id is `detector-<fingerprint[:12]>`: the fingerprint covers the mining run, the classifier's
checkpoint, the resolved config (amp included) and the targets themselves (so reviewed boxes arriving later
make a new detector). `checkpoints/<id>/last.pt` is rewritten every `runtime.save_every_steps` steps and at
each epoch's end; a rerun after a kill resumes from it at the same step, with the same batches (each epoch's
order and negatives come from the seed). `final.pt` is registered with `parent_id` = the classifier and the
mining run in its config: `SELECT * FROM models WHERE stage = 'detector'`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.base.amp import autocast, device_of, resolve_amp
from pipeline.base.home import Home
from pipeline.base.vocab import INDEX
from pipeline.config.check import fingerprint
from pipeline.config.detector import DetectorConfig
from pipeline.detector.data import (MiningSource, Targets, input_boxes, mining_source, training_images,
                                    training_targets)
from pipeline.detector.model import build_detector, fit_anchors, init_from_classifier
from pipeline.images.dataset import CacheDataset
from pipeline.training.checkpoint import Resumable, load_checkpoint, model_meta
from pipeline.training.engine import seed_of

log = logging.getLogger("pipeline.detector")
STAGE, NECK = "detector", "fpn"


@dataclass
class Plan:
    model_id: str
    fingerprint: str
    source: MiningSource
    config: DetectorConfig          # amp resolved
    device: torch.device
    size: int                       # detector input side
    targets: Targets
    anchors: dict
    arch: str


def plan(home, run_id: str, config=None) -> Plan:
    """Everything the training needs, from the warehouse; no weights are read."""
    home = Home.resolve(home)
    cfg = DetectorConfig.load(config)
    device = device_of(cfg.runtime.device)
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, amp=resolve_amp(cfg.runtime.amp, device)))
    source = mining_source(home, run_id)
    arch = cfg.arch or source.arch
    if cfg.model.init and arch != source.arch:
        raise ValueError(f"arch {arch} differs from the mining model's {source.arch}; set arch: null or "
                         "model.init: false")
    size = cfg.model.input_size or source.input_size
    if size > source.input_size:
        raise ValueError(f"model.input_size {size} is larger than the cache the classifier reads "
                         f"({source.input_size} px); use {source.input_size} or less")
    images = training_images(home, source)
    if not images:
        raise ValueError(f"run {run_id!r} covered none of its classifier's training images; mine the train split")
    targets = training_targets(home, run_id, images, cfg.boxes)
    if targets.boxes.empty:
        raise ValueError(f"no box of run {run_id!r} passes the filters (boxes: {cfg.to_dict()['boxes']}) on its "
                         f"{len(images)} training images")
    frames = _frames(home, source.input_size, targets.boxes["image_id"])
    wh = targets.boxes[["w", "h"]].to_numpy(np.float64) * size / frames
    anchors = fit_anchors(wh, size)
    fp = fingerprint("detector", run_id, source.sha256 if cfg.model.init else None, arch, size, cfg.identity(),
                     targets.digest())
    return Plan(f"{STAGE}-{fp[:12]}", fp, source, cfg, device, size, targets, anchors, arch)


def _frames(home: Home, size: int, image_ids) -> np.ndarray:
    """(width, height) of each id, in order."""
    ds = CacheDataset(home, size=size, image_ids=sorted(set(image_ids)))
    pos = {iid: k for k, iid in enumerate(ds.image_ids)}
    return ds.frames[[pos[i] for i in image_ids]].reshape(-1, 2)


def epoch_order(n_pos: int, n_neg: int, fraction: float, seed: int, epoch: int, batch_size: int) -> list[np.ndarray]:
    """Batches of one epoch: every positive (indices 0..n_pos-1) and round(fraction * n_neg) negatives
    (n_pos..), drawn and shuffled from (seed, epoch): the same on a rerun, so a resumed epoch goes on where it
    stopped."""
    rng = np.random.default_rng(seed_of(seed, 7, epoch))
    neg = n_pos + rng.permutation(n_neg)[:round(fraction * n_neg)]
    order = rng.permutation(np.concatenate([np.arange(n_pos), neg]).astype(np.int64))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def resize(images_uint8: torch.Tensor, size: int, device) -> torch.Tensor:
    """uint8 `[B,1,S,S]` -> float in [0, 1] at `size` px (area-averaged when smaller), on `device`."""
    x = images_uint8.to(device=device, dtype=torch.float32).div_(255.0)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def target_list(boxes_by_image: dict, ids: list[str], frames, size: int, device) -> list[dict]:
    """torchvision targets (xyxy in the input frame, labels 1..14) for a batch; empty for negatives."""
    out = []
    for iid, frame in zip(ids, np.asarray(frames)):
        b = boxes_by_image.get(iid)
        if b is None or b.empty:
            xyxy, labels = np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        else:
            xyxy = input_boxes(b, frame, size)
            keep = ((xyxy[:, 2] - xyxy[:, 0]) >= 1) & ((xyxy[:, 3] - xyxy[:, 1]) >= 1)
            xyxy = xyxy[keep]
            labels = np.array([INDEX[f] + 1 for f in b["finding"]], dtype=np.int64)[keep]
        out.append({"boxes": torch.as_tensor(xyxy, dtype=torch.float32, device=device).reshape(-1, 4),
                    "labels": torch.as_tensor(labels, device=device)})
    return out


def train_detector(home, run_id: str, config=None, resume: bool = True, on_step=None) -> str:
    """Train (or reuse, or resume) the detector of `run_id` under `config`; returns its model id.
    `on_step(model_id, epoch, step)` runs after every optimizer step (progress, tests)."""
    home = Home.resolve(home).make()
    p = plan(home, run_id, config)
    cfg, tr = p.config, p.config.train
    ckpt = Resumable(home, p.model_id, p.fingerprint, resume)
    if ckpt.finished() is not None:
        log.info("detector %s: reusing %s", run_id, p.model_id)
        return p.model_id
    torch.manual_seed(seed_of(cfg.seed, 11))
    model = build_detector(p.arch, p.size, p.anchors, representation=cfg.model.representation,
                           rpn_top_n=tuple(cfg.model.rpn_top_n), box_batch=cfg.model.box_batch,
                           trainable_layers=cfg.model.trainable_layers)
    if cfg.model.init:
        init_from_classifier(model, load_checkpoint(home.root / p.source.checkpoint)["model"])
    model.to(p.device)

    ds = CacheDataset(home, size=p.source.input_size, image_ids=p.targets.image_ids)
    by_image = {iid: g for iid, g in p.targets.boxes.groupby("image_id")}
    positive = np.array([iid in by_image for iid in ds.image_ids])
    index = np.concatenate([np.flatnonzero(positive), np.flatnonzero(~positive)])   # positives first
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    steps_per_epoch = len(epoch_order(n_pos, n_neg, tr.negatives, cfg.seed, 0, tr.batch_size))
    total = tr.epochs * steps_per_epoch
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=tr.lr, momentum=tr.momentum, weight_decay=tr.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tr.warmup_steps, total))
    meta = model_meta(
        model_id=p.model_id, parent_id=p.source.model_id, stage=STAGE, arch=p.arch, neck=NECK,
        num_classes=model.roi_heads.box_predictor.cls_score.out_features, input_size=p.size,
        cache_size=p.source.input_size, anchors=p.anchors, fingerprint=p.fingerprint, mining_run=run_id,
        train_images=p.targets.image_ids, reviewed_images=p.targets.reviewed_images,
        config={**cfg.to_dict(), "mining_run": run_id, "classifier": p.source.model_id, "input_size": p.size,
                "anchors": p.anchors, "train_images": len(ds), "positive_images": n_pos,
                "target_boxes": len(p.targets.boxes), "reviewed_images": len(p.targets.reviewed_images),
                "trust": p.targets.trust})
    epoch, start, history = 0, 0, []
    state = ckpt.restore(model, optimizer, scheduler)
    if state is not None:
        epoch, start, history = state["epoch"], state["step"], state["trainer"]["history"]
        torch.set_rng_state(state["rng"])   # the RPN and RoI samplers draw from it: same draws as unkilled
        log.info("detector %s: resuming at epoch %d step %d", p.model_id, epoch, start)

    def save_last(ep: int, step: int) -> None:
        ckpt.save_last(model, optimizer, scheduler, ep, step, {"history": history}, meta, rng=torch.get_rng_state())

    log.info("detector %s on %s (amp %s): %d images (%d with boxes), %d boxes, %d steps/epoch, anchors %s",
             p.model_id, p.device, cfg.runtime.amp, len(ds), n_pos, len(p.targets.boxes), steps_per_epoch, p.anchors)
    model.train()
    while epoch < tr.epochs:
        batches = epoch_order(n_pos, n_neg, tr.negatives, cfg.seed, epoch, tr.batch_size)
        t0, losses = time.perf_counter(), []
        # progress: a bar on the terminal, and about ten lines an epoch for the log (the Prefect UI)
        bar = tqdm(total=len(batches), initial=start, desc=f"detector epoch {epoch + 1}/{tr.epochs}", unit="step",
                   leave=False, mininterval=2)
        report = max(1, len(batches) // 10)
        for step in range(start, len(batches)):
            rows = index[batches[step]]
            batch = ds.get_batch(rows)
            images = resize(batch["image"], p.size, p.device)
            targets = target_list(by_image, batch["image_id"], batch["frame"], p.size, p.device)
            with autocast(p.device, cfg.runtime.amp):
                loss_parts = model(list(images), targets)
            loss = sum(v.float() for v in loss_parts.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detector loss is {loss.item()} at epoch {epoch + 1} step {step + 1}; "
                                         "lower train.lr or use runtime.amp: none")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tr.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, tr.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append({k: float(v.detach()) for k, v in loss_parts.items()})
            bar.update(1)
            if (step + 1) % report == 0 or step + 1 == len(batches):
                log.info("detector %s epoch %d/%d step %d/%d loss %.4f (%.1f s)", p.model_id, epoch + 1, tr.epochs,
                         step + 1, len(batches), float(loss.detach()), time.perf_counter() - t0)
            every = cfg.runtime.save_every_steps
            if every and (step + 1) % every == 0 and step + 1 < len(batches):
                save_last(epoch, step + 1)
            if on_step is not None:
                on_step(p.model_id, epoch, step + 1)
        bar.close()
        record = {"epoch": epoch + 1, "steps": len(losses), "seconds": round(time.perf_counter() - t0, 1),
                  **{k: float(np.mean([l[k] for l in losses])) for k in (losses[0] if losses else {})}}
        if losses:
            record["loss"] = float(sum(v for k, v in record.items() if k.startswith("loss_")))
        history.append(record)
        log.info("detector %s epoch %d/%d: %s", p.model_id, epoch + 1, tr.epochs, record)
        epoch, start = epoch + 1, 0
        save_last(epoch, 0)
    meta["metrics"] = {"history": history, "final_loss": history[-1].get("loss") if history else None}
    ckpt.save_final(model, epoch, {"history": history}, meta)
    return p.model_id
