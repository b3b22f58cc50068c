"""Training configuration: typed dataclasses loaded from YAML (one config type per concern).

The resolved config (defaults filled in) is stored, as plain JSON-able dicts, in every checkpoint and in the
warehouse `models.config` column. Unknown keys are errors: a typo must not silently fall back to a default.

Stages follow the paper's schedule (sec. 3.1): `base` fine-tune -> `msa_init` (below-MSA frozen) ->
`end_to_end` (early stopping on the validation loss) -> AM stages t = 1..T (`am`). A stage with
`epochs: 0` is skipped and its parent passes through.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from models.names import BACKBONE_NAMES, KP_LAYERS, NECK_NAMES
from pipeline.base.amp import MODES as AMP_MODES
from pipeline.base.vocab import SPLITS
from pipeline.config.check import (SIZE_RULE, config_file, device_ok, from_dict, merge, one_of, plain, read_yaml,
                                   require, size_ok)
from pipeline.config.check import MAX_AM_STEPS, MAX_BATCH, MAX_EPOCHS, MAX_SEED, MAX_STEPS, at_most, weights_problem

# The sections of the other flows in a harvest config (`pipeline.config.harvest`): training ignores them, so
# they never change a stage's fingerprint.
HARVEST_SECTIONS = ("phantom", "mining", "export", "incremental")


@dataclass
class ModelConfig:
    arch: str = "resnet50"          # resnet18 | resnet34 | resnet50
    neck: str = "bilinear"          # baseline | bilinear | deconv (the neck of msa_init and later stages)
    imagenet: bool = True           # ImageNet weights from the local torch cache when present (never downloads)
    # A new head's bias b^c starts at the log-odds of finding c in the stage's training labels (the paper is
    # silent on the head's initialization). With b^c ~ 0 the network must build every rare finding's negative
    # prior from features present in every image, and CAM^c = X·w^c then peaks on anatomy, not on lesions
    # (docs/results.md). See `models.head.prior_bias`.
    head_prior: bool = True
    # The fraction of each class map's cells the head averages into its logit. 1 is eq. 2's global average
    # pooling (the paper). Below 1 the logit is the mean of the top `pool_top` share of CAM^c's cells (k-max
    # pooling, as in WILDCAT, Durand et al. 2017): a nodule of one cell moves its logit as much as an effusion
    # of a hundred, so the classifier is paid for evidence on the lesion (docs/results.md, tenth session).
    pool_top: float = 1.0
    # Project-made weights to start from instead of ImageNet (a file written by `python -m pipeline.training.weights
    # export`, e.g. models/weights/; relative paths are taken from the config file's folder). The first stage
    # that runs starts from them: the whole model when its neck matches, else the backbone. Their sha256 enters
    # the stages' fingerprints.
    init: str | None = None


@dataclass
class AugmentConfig:
    """Small geometric jitter (augment.py). No horizontal flip: CXR laterality (heart left) is a real cue."""
    enabled: bool = True
    scale: tuple[float, float] = (1.0, 1.15)    # zoom factor range (>1 magnifies: a random-resized crop)
    shift: float = 0.05                         # max translation, fraction of the side
    rotate: float = 5.0                         # max rotation, degrees


@dataclass
class DataConfig:
    input_size: int = 512
    val_fraction: float = 0.1       # patients carved from `train` when the warehouse has no `val` split
    train_splits: tuple[str, ...] = ("train",)
    # During AM the images to be mined join training with their labels only (sec. 3): the paper adds the
    # boxed test images. Boxes are never read by training.
    am_splits: tuple[str, ...] = ("train", "test")
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class RuntimeConfig:
    device: str = "auto"            # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    amp: str = "auto"               # auto | bf16 | none: auto is bf16 where native, else fp32 (pipeline/base/amp.py)
    channels_last: bool = True
    batch_size: int = 64            # global batch N; under DDP each rank takes N / world_size
    eval_batch_size: int = 128
    workers: int = 0                # DataLoader workers gathering index batches from the uint8 cache
    threads: int = 0                # torch intra-op threads (0: leave torch's default)
    compile: bool = False           # torch.compile (inductor) the training step: x1.09 on 2 AVX2 cores after a
                                    # ~70 s compile per stage, so for stages of more than ~200 steps (benchmarks.md)
    save_every_steps: int = 0       # extra mid-epoch resume checkpoints (0: at epoch ends only)
    log_every: int = 20
    sync_bn: bool = True            # SyncBatchNorm under DDP on GPU (gloo/CPU has none: per-rank BN)


@dataclass
class StageConfig:
    epochs: int = 1                 # max epochs when patience > 0; 0 skips the stage
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "cosine"        # cosine | constant (per step, after a linear warmup)
    warmup_steps: int = 0
    patience: int = 0               # > 0: early stopping when val loss has not improved for this many epochs
    min_delta: float = 0.0
    freeze_backbone: bool = False   # msa_init: "fix the network parameters below MSA" (sec. 3.1)
    freeze_bn: bool = False         # BatchNorm in eval mode (running statistics, not updated)
    clip_grad_norm: float = 0.0     # > 0: clip the gradient norm (AM stages: see engine.train_step)


@dataclass
class AMConfig:
    """Attention mining with knowledge preservation (sec. 2.1-2.2, eq. 1-6).

    `steps` is T: AM stages t = 1..T are trained one after another, stage t with t-1 erasure steps
    (eq. 7: H_t uses M_{t-1}; M_0 is all ones, so t = 1 is the paper's "baseline": KP split, no erasure).
    `mode`: kp (L = L_cls + lambda L_KP, eq. 6) | vanilla (the same split, no L_KP) | none (every image erased).
    `cls_on_preserved`: the N-n preserved images also add to L_cls, unerased. Default True: KP-Vanilla
    "leaves the later N-n untouched", i.e. trained as before, which only means something if they keep
    their classification loss.
    """
    steps: int = 3
    mode: str = "kp"
    kp_lambda: float = 0.5
    am_fraction: float = 0.125      # n/N
    cls_on_preserved: bool = True
    kp_layers: tuple[str, ...] = KP_LAYERS
    kp_reduction: str = "mean"      # see models.knowledge_preservation
    stage: StageConfig = field(default_factory=lambda: StageConfig(epochs=2, lr=0.001, freeze_bn=True,
                                                                   clip_grad_norm=1.0))


@dataclass
class StagesConfig:
    base: StageConfig = field(default_factory=lambda: StageConfig(epochs=50, lr=0.1))
    msa_init: StageConfig = field(default_factory=lambda: StageConfig(epochs=10, lr=0.1, freeze_backbone=True))
    end_to_end: StageConfig = field(default_factory=lambda: StageConfig(epochs=100, lr=0.01, patience=5))


@dataclass
class TrainConfig:
    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    am: AMConfig = field(default_factory=AMConfig)

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))

    def validate(self) -> "TrainConfig":
        """Ranges and choices (`from_dict` checked the types); ValueError naming the first bad value."""
        m, d, r, a = self.model, self.data, self.runtime, self.am
        aug = d.augment
        init_problem = None if m.init is None else weights_problem(m.init)
        checks = [
            ("name", self.name, self.name != "", "must be a non-empty string"),
            ("seed", self.seed, self.seed >= 0, "must be an integer >= 0"),
            ("model.arch", m.arch, m.arch in backbone_names(), one_of(backbone_names())),
            ("model.neck", m.neck, m.neck in NECK_NAMES, one_of(NECK_NAMES)),
            ("model.init", m.init, not init_problem, init_problem),
            ("model.pool_top", m.pool_top, 0 < m.pool_top <= 1, "must be in (0, 1] (1 = global average pooling)"),
            ("data.input_size", d.input_size, size_ok(d.input_size), f"must be {SIZE_RULE}"),
            ("data.val_fraction", d.val_fraction, 0 < d.val_fraction < 1, "must be in (0, 1)"),
            ("data.train_splits", list(d.train_splits), bool(d.train_splits) and set(d.train_splits) <= set(SPLITS),
             f"must be a non-empty list of {', '.join(SPLITS)}"),
            ("data.am_splits", list(d.am_splits), set(d.am_splits) <= set(SPLITS),
             f"must be a list of {', '.join(SPLITS)}"),
            ("data.augment.scale", list(aug.scale), 0 < aug.scale[0] <= aug.scale[1],
             "must be [low, high] zoom factors with 0 < low <= high"),
            ("data.augment.shift", aug.shift, 0 <= aug.shift <= 0.5, "must be in [0, 0.5] (a fraction of the side)"),
            ("data.augment.rotate", aug.rotate, 0 <= aug.rotate <= 180, "must be in [0, 180] (degrees)"),
            ("runtime.device", r.device, device_ok(r.device, auto=True), "must be auto, cpu, cuda or cuda:N"),
            ("runtime.amp", r.amp, r.amp in AMP_MODES, one_of(AMP_MODES)),
            ("runtime.batch_size", r.batch_size, r.batch_size > 0, "must be a positive integer"),
            ("runtime.eval_batch_size", r.eval_batch_size, r.eval_batch_size > 0, "must be a positive integer"),
            *((f"runtime.{k}", getattr(r, k), getattr(r, k) >= 0, "must be an integer >= 0")
              for k in ("workers", "threads", "save_every_steps", "log_every")),
            ("am.steps", a.steps, a.steps >= 0, "must be an integer >= 0 (T, the number of AM stages)"),
            ("am.mode", a.mode, a.mode in AM_MODES, one_of(AM_MODES)),
            ("am.kp_lambda", a.kp_lambda, a.kp_lambda >= 0, "must be >= 0"),
            ("am.am_fraction", a.am_fraction, 0 < a.am_fraction <= 1, "must be in (0, 1] (n/N)"),
            ("am.kp_layers", list(a.kp_layers), bool(a.kp_layers) and set(a.kp_layers) <= set(KP_LAYERS),
             f"must be a non-empty list of {', '.join(KP_LAYERS)}"),
            ("am.kp_reduction", a.kp_reduction, a.kp_reduction in KP_REDUCTIONS, one_of(KP_REDUCTIONS)),
        ]
        for name, st in self.stage_configs().items():
            p = "am.stage" if name == "am" else f"stages.{name}"
            checks += [
                (f"{p}.epochs", st.epochs, st.epochs >= 0, "must be an integer >= 0 (0 skips the stage)"),
                (f"{p}.momentum", st.momentum, 0 <= st.momentum < 1, "must be in [0, 1)"),
                (f"{p}.schedule", st.schedule, st.schedule in SCHEDULES, one_of(SCHEDULES)),
                *((f"{p}.{k}", getattr(st, k), getattr(st, k) >= 0, "must be >= 0")
                  for k in ("lr", "weight_decay", "warmup_steps", "patience", "min_delta", "clip_grad_norm")),
            ]
        for path, value, ok, allowed in checks:
            require(ok, path, value, allowed)
        caps = [("seed", self.seed, MAX_SEED, "a 32-bit seed"),
                ("runtime.batch_size", r.batch_size, MAX_BATCH, "images per step"),
                ("runtime.eval_batch_size", r.eval_batch_size, MAX_BATCH, "images per step"),
                ("runtime.workers", r.workers, 64, "DataLoader processes"),
                ("runtime.threads", r.threads, 1024, "threads"),
                ("runtime.save_every_steps", r.save_every_steps, MAX_STEPS, "steps"),
                ("runtime.log_every", r.log_every, MAX_STEPS, "steps"),
                ("am.steps", a.steps, MAX_AM_STEPS, "AM stages; the paper's best is 3")]
        for name, st in self.stage_configs().items():
            p = "am.stage" if name == "am" else f"stages.{name}"
            caps += [(f"{p}.epochs", st.epochs, MAX_EPOCHS, "epochs"),
                     (f"{p}.warmup_steps", st.warmup_steps, MAX_STEPS, "steps"),
                     (f"{p}.patience", st.patience, MAX_EPOCHS, "epochs")]
        for path, value, high, what in caps:
            at_most(path, value, high, what)
        return self
    def stage_configs(self) -> dict[str, StageConfig]:
        return {"base": self.stages.base, "msa_init": self.stages.msa_init,
                "end_to_end": self.stages.end_to_end, "am": self.am.stage}


RECORD_KEY = "trained_on"   # models.config's record of the data a stage trained on


def load_config(source: str | Path | dict | TrainConfig, overrides: dict | None = None) -> TrainConfig:
    """A YAML path, a dict or a TrainConfig -> validated TrainConfig; `overrides` is merged deeply on top.

    A bad value raises ValueError: one line naming the file, the dotted key, the value and what is allowed."""
    if isinstance(source, (TrainConfig, dict)):
        return _load(source.to_dict() if isinstance(source, TrainConfig) else source, overrides)
    with config_file(source):
        data = read_yaml(source)
        init = (data.get("model") or {}).get("init") if isinstance(data.get("model"), dict) else None
        if isinstance(init, str) and not Path(init).is_absolute():
            data = merge(data, {"model": {"init": str((Path(source).parent / init).resolve())}})
        return _load(data, overrides)


def _load(data: dict, overrides: dict | None) -> TrainConfig:
    if overrides:
        data = merge(data, overrides)
    # the sections of other flows: training ignores them, so they never change a stage's fingerprint; and
    # `trained_on`, the data record a trained model's config carries (pipeline.training.stages.data_digest)
    data = {k: v for k, v in data.items() if k not in HARVEST_SECTIONS and k != RECORD_KEY}
    return from_dict(TrainConfig, data).validate()


AM_MODES = ("kp", "vanilla", "none")
SCHEDULES = ("cosine", "constant")
KP_REDUCTIONS = ("mean", "literal")     # models.knowledge_preservation.kp_loss


def backbone_names() -> tuple[str, ...]:
    """The built-in backbones, and any that code registered (`models.register_backbone`, which needs the
    registry imported): the check stays torch-free when nothing was registered."""
    registry = sys.modules.get("models.backbones")
    return tuple(dict.fromkeys([*BACKBONE_NAMES, *(registry.BACKBONES if registry else ())]))
