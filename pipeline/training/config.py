"""Training configuration: typed dataclasses loaded from YAML (one config type per concern).

The resolved config (defaults filled in) is stored, as plain JSON-able dicts, in every checkpoint and in the
warehouse `models.config` column. Unknown keys are errors: a typo must not silently fall back to a default.

Stages follow the paper's schedule (sec. 3.1): `base` fine-tune -> `msa_init` (below-MSA frozen) ->
`end_to_end` (early stopping on the validation loss) -> AM stages t = 1..T (`am`). A stage with
`epochs: 0` is skipped and its parent passes through.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from models.knowledge_preservation import KP_LAYERS
from pipeline.amp import MODES as AMP_MODES
from pipeline.harvest_config import HARVEST_SECTIONS


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
    amp: str = "auto"               # auto | bf16 | none: auto is bf16 where native, else fp32 (pipeline/amp.py)
    channels_last: bool = True
    batch_size: int = 64            # global batch N; under DDP each rank takes N / world_size
    eval_batch_size: int = 128
    workers: int = 0                # DataLoader workers gathering index batches from the uint8 cache
    threads: int = 0                # torch intra-op threads (0: leave torch's default)
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
        return _plain(dataclasses.asdict(self))

    def validate(self) -> "TrainConfig":
        if self.am.mode not in ("kp", "vanilla", "none"):
            raise ValueError(f"am.mode must be kp, vanilla or none, got {self.am.mode!r}")
        if not 0 < self.am.am_fraction <= 1:
            raise ValueError(f"am.am_fraction (n/N) must be in (0, 1], got {self.am.am_fraction}")
        if self.runtime.amp not in AMP_MODES:
            raise ValueError(f"runtime.amp must be one of {', '.join(AMP_MODES)}, got {self.runtime.amp!r}")
        for name, st in self.stage_configs().items():
            if st.schedule not in ("cosine", "constant"):
                raise ValueError(f"{name}.schedule must be cosine or constant, got {st.schedule!r}")
        return self

    def stage_configs(self) -> dict[str, StageConfig]:
        return {"base": self.stages.base, "msa_init": self.stages.msa_init,
                "end_to_end": self.stages.end_to_end, "am": self.am.stage}


def _plain(obj):
    """Tuples -> lists, recursively: the form JSON and `torch.load(weights_only=True)` accept."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def from_dict(cls, data: dict | None):
    """Build dataclass `cls` from a nested dict; unknown keys raise with the valid ones named.

    A nested section given in part keeps the field's own defaults for the rest: `base: {epochs: 5}` keeps
    the base stage's lr 0.1 (StagesConfig's default), not StageConfig's generic one.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} for {cls.__name__}; valid: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            f = fields[key]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else typ()
            kwargs[key] = from_dict(typ, merge(_plain(dataclasses.asdict(default)), value or {}))
        elif typing.get_origin(typ) is tuple:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def load_config(source: str | Path | dict | TrainConfig, overrides: dict | None = None) -> TrainConfig:
    """A YAML path, a dict or a TrainConfig -> validated TrainConfig; `overrides` is merged deeply on top."""
    if isinstance(source, TrainConfig):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    else:
        data = yaml.safe_load(Path(source).read_text()) or {}
    if overrides:
        data = merge(data, overrides)
    # the sections of other flows: training ignores them, so they never change a stage's fingerprint
    data = {k: v for k, v in data.items() if k not in HARVEST_SECTIONS}
    return from_dict(TrainConfig, data).validate()


def merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def fingerprint(*parts) -> str:
    """sha256 of canonical JSON: the identity of a stage (its inputs), used to skip finished stages."""
    return hashlib.sha256(json.dumps(_plain(parts), sort_keys=True).encode()).hexdigest()
