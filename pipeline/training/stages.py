"""The staged schedule of sec. 3.1, each stage a resumable step whose checkpoint records its parent.

    base        ResNet with the `baseline` neck (X = layer4), fine-tuned end to end ("fine-tune the base
                network ResNet-50 with a learning rate of 0.1 for 50 epochs")
    msa_init    ResNet-MSA: the backbone's weights come from `base`; neck and head are new. The backbone is
                frozen, BatchNorm included ("fix the network parameters below MSA ... 10 epochs")
    end_to_end  everything trains until the validation loss plateaus (early stopping, `patience`)
    am1..amT    attention mining with knowledge preservation (eq. 1-6); stage t trains with t-1 erasure steps
                (eq. 7: H_t uses M_{t-1}; t = 1 is the paper's "baseline"), on the AM image set (the training
                images plus the images to be mined, labels only). N_A, frozen, is the network am1 starts
                from (the parent's weights) for every t: "initially N_A and N_B are identical".
With the `baseline` neck, `msa_init` does not exist (nothing new to initialise). A stage with 0 epochs is
skipped and its parent passes through.

A stage's identity is a fingerprint of its own config and its parent's fingerprint, so a rerun with the
same resolved config skips finished stages (their `final.pt`) and resumes an unfinished one from `last.pt`.
New images in the warehouse do not invalidate finished stages.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch._dynamo
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models import create_model, freeze_batchnorm, frozen_copy
from models.head import prior_bias
from pipeline.base.amp import device_of, resolve_amp
from pipeline.base.files import sha256_file
from pipeline.base.home import Home
from pipeline.config.check import fingerprint
from pipeline.config.train import RECORD_KEY, StageConfig, TrainConfig, load_config
from pipeline.images.dataset import CacheDataset, CacheIndex
from pipeline.training.checkpoint import FINAL, Resumable, load_checkpoint, model_meta, save_checkpoint
from pipeline.training.data import data_digest, split_ids
from pipeline.training.engine import (AttentionMiningLoss, ClassificationLoss, Dist, epoch_batches, evaluate,
                                      init_distributed, seed_of, train_one_epoch)
from pipeline.training.weights import load_backbone, load_imagenet, load_init
from warehouse import db

log = logging.getLogger("pipeline.training")


@dataclass
class StagePlan:
    name: str                  # base | msa_init | end_to_end | am<t>
    index: int                 # position in the schedule (seeds its randomness)
    neck: str
    cfg: StageConfig
    fingerprint: str
    parent: "StagePlan | None"
    t: int = 0                 # AM stage t (0: plain classification)
    reference: "StagePlan | None" = None   # the first AM stage: N_A is its starting network
    data: dict | None = None   # what it trains and validates on: digest and image counts (`data_digest`)

    @property
    def model_id(self) -> str:
        return f"{self.name}-{self.fingerprint[:12]}"


def plan_stages(cfg: TrainConfig, data: dict | None = None) -> list[StagePlan]:
    """The stages to run, in order, with fingerprints chained through their parents.

    `data` (:func:`data_digest` of the home's images) enters each stage's fingerprint: new, changed or
    relabelled images give new model ids, so `harvest train` trains anew. Without it (planning with no home),
    the ids are those of a config alone, as homes made before lineage named its data had them."""
    shared = {"seed": cfg.seed, "arch": cfg.model.arch, "imagenet": cfg.model.imagenet,
              "head_prior": cfg.model.head_prior,
              **({"pool_top": cfg.model.pool_top} if cfg.model.pool_top < 1 else {}),   # GAP keeps older ids
              "input_size": cfg.data.input_size, "val_fraction": cfg.data.val_fraction,
              "augment": asdict(cfg.data.augment), "batch_size": cfg.runtime.batch_size, "amp": cfg.runtime.amp}
    if cfg.model.init:                  # the weights' content, not where the file lies
        shared["init"] = sha256_file(cfg.model.init)
    steps: list[tuple[str, str, StageConfig, int, dict]] = [
        ("base", "baseline", cfg.stages.base, 0, {"splits": cfg.data.train_splits})]
    if cfg.model.neck != "baseline":
        steps.append(("msa_init", cfg.model.neck, cfg.stages.msa_init, 0, {"splits": cfg.data.train_splits}))
    steps.append(("end_to_end", cfg.model.neck, cfg.stages.end_to_end, 0, {"splits": cfg.data.train_splits}))
    am = {k: v for k, v in asdict(cfg.am).items() if k not in ("stage", "steps")}
    steps += [(f"am{t}", cfg.model.neck, cfg.am.stage, t, {"splits": cfg.data.am_splits, "am": am})
              for t in range(1, cfg.am.steps + 1)]
    plans: list[StagePlan] = []
    parent, reference = None, None
    for index, (name, neck, st, t, extra) in enumerate(steps):
        if st.epochs <= 0:
            continue
        used = data and data["am" if t else "train"]
        fp = fingerprint(parent.fingerprint if parent else None, name, neck, asdict(st), shared,
                         {**extra, "data": used["digest"]} if used else extra)
        parent = StagePlan(name, index, neck, st, fp, parent, t, reference, used or None)
        if t and reference is None:     # the first AM stage: N_A is the network it starts from
            reference = parent.reference = parent
        plans.append(parent)
    if not plans:
        raise ValueError("every stage has 0 epochs: nothing to train")
    return plans


# ------------------------------------------------------------------ one stage

def _build(cfg: TrainConfig, plan: StagePlan, home: Home, labels) -> nn.Module:
    """The stage's model: the parent's weights (backbone only when the neck changes), else `model.init`, else
    ImageNet. A new head
    starts at the prevalence of the stage's training `labels` (`model.head_prior`)."""
    torch.manual_seed(seed_of(cfg.seed, plan.index))
    model = create_model(cfg.model.arch, plan.neck, pool_top=cfg.model.pool_top)
    if plan.parent is None:
        if cfg.model.init:
            if load_init(model, cfg.model.init, cfg.model.arch):
                return model                        # trained neck and head too: keep its head
        elif cfg.model.imagenet:
            load_imagenet(model, cfg.model.arch)
    else:
        state = load_checkpoint(home.checkpoints / plan.parent.model_id / FINAL)["model"]
        if plan.parent.neck == plan.neck:
            model.load_state_dict(state)
            return model
        # base -> msa_init: backbone carried over, neck and head new
        load_backbone(model, state)
    if cfg.model.head_prior:
        with torch.no_grad():
            model.head.bias.copy_(prior_bias(labels))
    return model


def _schedule(optimizer, st: StageConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < st.warmup_steps:
            return (step + 1) / st.warmup_steps
        if st.schedule == "constant":
            return 1.0
        progress = (step - st.warmup_steps) / max(1, total_steps - st.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _set_train_mode(model: nn.Module, st: StageConfig) -> None:
    model.train()
    if st.freeze_backbone:
        model.backbone.eval()           # frozen below MSA: BatchNorm statistics too
    if st.freeze_bn:
        freeze_batchnorm(model)


def run_stage(home: Home, cfg: TrainConfig, plan: StagePlan, ids: dict, d: Dist, device: torch.device,
              resume: bool = True, on_step=None, index: CacheIndex | None = None) -> dict:
    """Train one stage to its `final.pt` (or reuse it); returns the stage's meta. `index`: the cache index of
    the `ids` (read once for every stage), else each image set's is read here."""
    ckpt = Resumable(home, plan.model_id, plan.fingerprint, resume, d.main)
    meta = ckpt.finished()
    if meta is not None:
        log.info("stage %s: reusing %s", plan.name, plan.model_id)
        d.barrier()
        return meta
    st = plan.cfg
    set_name = "am" if plan.t else "train"
    train_set = CacheDataset(home, cfg.data.input_size, image_ids=ids[set_name], index=index)
    model = _build(cfg, plan, home, train_set.labels)
    if st.freeze_backbone:
        model.backbone.requires_grad_(False)
    if d.world > 1 and device.type == "cuda" and cfg.runtime.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)

    val_set = CacheDataset(home, cfg.data.input_size, image_ids=ids["val"], index=index)
    if st.patience and not len(val_set):
        raise ValueError(f"stage {plan.name} stops early on the validation loss but the validation split is "
                         "empty; raise data.val_fraction or set patience: 0")
    steps_per_epoch = len(train_set) // cfg.runtime.batch_size

    step_module = _loss_module(cfg, plan, model, home, device, train_set.labels)
    if cfg.runtime.compile:   # the step (forward, loss, backward graphs); the model's weights and state_dict stay its own
        torch._dynamo.config.suppress_errors = True   # no C compiler, an unsupported op: eager, with a warning
        step_module = torch.compile(step_module)
    if d.world > 1:
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda"
                                              else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay,
                                nesterov=st.nesterov)
    scheduler = _schedule(optimizer, st, st.epochs * steps_per_epoch)
    meta = model_meta(model_id=plan.model_id, parent_id=plan.parent.model_id if plan.parent else None,
                      reference_id=plan.reference.parent.model_id if plan.reference and plan.reference.parent
                      else None, stage=plan.name,
                      t=plan.t, arch=cfg.model.arch, neck=plan.neck, num_classes=model.num_classes,
                      input_size=cfg.data.input_size, config={**cfg.to_dict(), RECORD_KEY: plan.data},
                      fingerprint=plan.fingerprint)
    epoch, start_step = 0, 0
    trainer = {"history": [], "best_loss": None, "best_epoch": None, "bad_epochs": 0, "stopped": False}
    state = ckpt.restore(model, optimizer, scheduler)
    if state is not None:
        epoch, start_step, trainer = state["epoch"], state["step"], state["trainer"]
        log.info("stage %s: resuming at epoch %d step %d", plan.name, epoch, start_step)

    def save_last(ep: int, step: int) -> None:
        ckpt.save_last(model, optimizer, scheduler, ep, step, trainer, meta)
        d.barrier()

    while epoch < st.epochs and not trainer["stopped"]:
        ep = epoch                      # bound now: the hook below must see this epoch

        def hook(step: int) -> None:
            every = cfg.runtime.save_every_steps
            if every and step % every == 0 and step < steps_per_epoch:
                save_last(ep, step)
            if on_step is not None:
                on_step(plan.model_id, ep, step)

        _set_train_mode(model, st)
        batches = epoch_batches(len(train_set), cfg.runtime.batch_size, seed_of(cfg.seed, plan.index, ep))
        train_stats = train_one_epoch(step_module, optimizer, scheduler, train_set, batches, device=device,
                                      runtime=cfg.runtime, augment=cfg.data.augment,
                                      seed=seed_of(cfg.seed, plan.index, ep, 1), d=d, start_step=start_step,
                                      on_step=hook, desc=f"{plan.name} epoch {ep + 1}/{st.epochs}",
                                      clip=st.clip_grad_norm)
        metrics = evaluate(model, val_set, device=device, runtime=cfg.runtime, d=d) if len(val_set) else {}
        record = {"epoch": ep + 1, "train": {k: float(v) for k, v in train_stats.items()}, **metrics}
        trainer["history"].append(record)
        _early_stopping(trainer, record, st)
        if d.main:
            log.info("stage %s epoch %d: train loss %.4f, val loss %s, AUROC mean %s (boxed %s)", plan.name,
                     ep + 1, train_stats.get("loss", math.nan), metrics.get("val_loss"),
                     metrics.get("auroc_mean"), metrics.get("auroc_boxed_mean"))
            if trainer["best_epoch"] == ep + 1 and st.patience:
                save_checkpoint({"model": model.state_dict(), "meta": meta}, ckpt.folder / "best.pt")
        epoch, start_step = epoch + 1, 0
        save_last(epoch, 0)

    return _finish(ckpt, model, trainer, meta, st, epoch, d)


def _loss_module(cfg: TrainConfig, plan: StagePlan, model: nn.Module, home: Home, device, labels) -> nn.Module:
    """The stage's loss: classification, or AM (eq. 1-6) with N_A for KP (`labels`: the AM training set's, as
    the first AM stage saw them when it was built)."""
    if not plan.t:
        return ClassificationLoss(model)
    reference = None
    if cfg.am.mode == "kp":     # N_A: the network the first AM stage starts from, rebuilt (deterministic)
        reference = frozen_copy(_build(cfg, plan.reference, home, labels).to(device))
        if cfg.runtime.channels_last:
            reference = reference.to(memory_format=torch.channels_last)
    return AttentionMiningLoss(model, cfg.am, plan.t, reference)


def _finish(ckpt: Resumable, model: nn.Module, trainer: dict, meta: dict, st: StageConfig, epochs: int,
            d: Dist) -> dict:
    """Pick the final weights (the best epoch under early stopping), write `final.pt`, register it."""
    if st.patience and trainer["best_epoch"] is not None and trainer["best_epoch"] != epochs:
        model.load_state_dict(load_checkpoint(ckpt.folder / "best.pt")["model"])
    chosen = trainer["best_epoch"] if st.patience and trainer["best_epoch"] else len(trainer["history"])
    record = trainer["history"][chosen - 1] if trainer["history"] else {}
    meta["metrics"] = {**record, "epochs_run": len(trainer["history"]), "stopped_early": trainer["stopped"]}
    ckpt.save_final(model, epochs, trainer, meta)
    d.barrier()
    return meta


def _early_stopping(trainer: dict, record: dict, st: StageConfig) -> None:
    """Track the best validation loss; stop after `patience` epochs without an improvement of min_delta."""
    loss = record.get("val_loss")
    if loss is None or (isinstance(loss, float) and math.isnan(loss)):
        return
    if trainer["best_loss"] is None or loss < trainer["best_loss"] - st.min_delta:
        trainer.update(best_loss=loss, best_epoch=record["epoch"], bad_epochs=0)
    else:
        trainer["bad_epochs"] += 1
        trainer["stopped"] = bool(st.patience) and trainer["bad_epochs"] >= st.patience


# ------------------------------------------------------------------ all stages

def train(home, config, resume: bool = True, on_step=None) -> str:
    """Run every stage of `config` (a YAML path, dict or TrainConfig); returns the final model_id.

    Finished stages with the same fingerprint are reused; an unfinished one resumes from its last
    checkpoint (`resume=False` retrains everything). Under torchrun, each process calls this; rank 0 writes.
    `on_step(model_id, epoch, step)` runs after every optimizer step (progress, tests).
    """
    home = (home if isinstance(home, Home) else Home.resolve(home)).make()
    cfg = load_config(config)
    d, device = init_distributed(cfg.runtime)
    cfg = resolved_config(cfg, device)
    with db.reading(home) as con:   # the image sets, their digest and their cache index: one read for all stages
        ids = split_ids(home, cfg, con)
        plans = plan_stages(cfg, data_digest(home, ids, con))
        index = CacheIndex.read(con, cfg.data.input_size, image_ids={i for part in ids.values() for i in part})
    log.info("training %s on %s (amp %s): %d train, %d val, %d AM images, world size %d", cfg.name, device, cfg.runtime.amp,
             len(ids["train"]), len(ids["val"]), len(ids["am"]), d.world)
    meta = None
    for plan in plans:
        meta = run_stage(home, cfg, plan, ids, d, device, resume=resume, on_step=on_step, index=index)
    return meta["model_id"]


def train_distributed(home, config_path, nproc: int, resume: bool = True) -> str:
    """Run `train` in `nproc` processes under torchrun (one per GPU; gloo on CPU); returns the final model_id.

    With nproc <= 1 this is `train` in this process.
    """
    if nproc <= 1:
        return train(home, config_path, resume=resume)
    home = Home.resolve(home) if not isinstance(home, Home) else home
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "pipeline.training.stages", "--home", str(home.root), "--config", str(config_path)]
    subprocess.run(cmd + ([] if resume else ["--no-resume"]), check=True)
    return final_model_id(home, resolved_config(config_path))


def home_plans(home, cfg: TrainConfig) -> list[StagePlan]:
    """The stages `train` runs for `cfg` (resolved) on the home's images: the ids it gives them."""
    with db.reading(Home.resolve(home)) as con:
        return plan_stages(cfg, data_digest(home, split_ids(home, cfg, con), con))


def final_model_id(home, cfg: TrainConfig) -> str:
    """The model id `train` gives the last stage of `cfg` on the home's images."""
    return home_plans(home, cfg)[-1].model_id


def resolved_config(config, device: torch.device | None = None) -> TrainConfig:
    """`load_config` with `runtime.amp: auto` replaced by the mode `device` runs (pipeline/base/amp.py), so stage
    fingerprints, checkpoints and `models.config` record the precision actually used."""
    cfg = load_config(config)
    amp = resolve_amp(cfg.runtime.amp, device or device_of(cfg.runtime.device))
    return replace(cfg, runtime=replace(cfg.runtime, amp=amp))


def default_nproc() -> int:
    """One process per visible GPU; one on CPU (two CPU processes only split the same cores)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


if __name__ == "__main__":      # the torchrun entry point of `train_distributed`
    parser = argparse.ArgumentParser(description="one training process (run by torchrun)")
    parser.add_argument("--home", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--no-resume", dest="resume", action="store_false")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(message)s")
    train(args.home, args.config, resume=args.resume)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
