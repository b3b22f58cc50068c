"""Detector configuration (`harvest detector train --config`, configs/detector*.yaml): typed, checked like the
training config (unknown keys and bad values raise one line naming the dotted key).

Sections: `boxes` (which of the mining run's boxes are training targets), `model`, `train`, `predict`,
`runtime`. Fields that change the trained weights enter the detector's fingerprint (its model id); `runtime`
fields (where and how fast it runs, except `amp`, which is resolved first and recorded) do not.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.base.amp import MODES as AMP_MODES
from pipeline.base.vocab import FINDINGS
from pipeline.config.check import config_file, read_yaml, require
from pipeline.config.check import MAX_BATCH, MAX_EPOCHS, MAX_RANKS, MAX_SEED, MAX_STEPS, at_most
from pipeline.config.check import SIZE_RULE, device_ok, from_dict, one_of, plain, size_ok

ARCHS = ("resnet18", "resnet34", "resnet50")


@dataclass
class BoxesConfig:
    min_score: float = 0.0               # keep mined boxes with score >= this
    ranks: tuple[int, ...] = (1,)        # which ranks (rank 1: the box at the highest threshold)
    findings: tuple[str, ...] | None = None   # None: every finding the run mined
    # Where `pipeline.export.review` exists and an image was reviewed, its reviewed boxes replace the mined ones
    reviewed: bool = True
    # The exports' trust rule (pipeline.evaluation.trust): per finding, the rank its tuning set picked and its score
    # cut, only for findings whose estimated Acc reaches this floor; `ranks` then applies only to a run without a
    # tuning set. None: `ranks` and `min_score` alone.
    trust_floor: float | None = None

    def __post_init__(self):
        require(0 <= self.min_score <= 1, "min_score", self.min_score, "must be in [0, 1]")
        require(self.trust_floor is None or 0 <= self.trust_floor <= 1, "trust_floor", self.trust_floor,
                "must be in [0, 1] or null")
        require(bool(self.ranks) and all(1 <= r <= MAX_RANKS for r in self.ranks), "ranks", list(self.ranks),
                f"must be 1 or more ranks in [1, {MAX_RANKS}]")
        bad = [f for f in self.findings or () if f not in FINDINGS]
        require(not bad, "findings", bad, f"must be findings of {', '.join(FINDINGS)}")


@dataclass
class ModelSection:
    # input side in pixels; None: the mining model's input size (the cache it reads). Smaller: area-downsampled
    input_size: int | None = None
    representation: int = 256           # width of the RoI head's two MLP layers
    init: bool = True                   # start the ResNet from the mining run's classifier (else random)
    trainable_layers: int = 5           # ResNet stages trained, from the top (5: all; 3: conv1 and layer1 fixed)
    rpn_top_n: tuple[int, int] = (600, 300)   # proposals per image kept before / after NMS (training)
    box_batch: int = 128                # RoIs sampled per image for the box head's loss

    def __post_init__(self):
        require(self.input_size is None or size_ok(self.input_size), "input_size", self.input_size,
                f"must be null or {SIZE_RULE}")
        require(0 <= self.trainable_layers <= 5, "trainable_layers", self.trainable_layers, "must be in 0..5")
        require(self.representation >= 8, "representation", self.representation, "must be >= 8")
        require(all(n >= 1 for n in self.rpn_top_n), "rpn_top_n", list(self.rpn_top_n), "must be positive")
        require(self.box_batch >= 1, "box_batch", self.box_batch, "must be a positive integer")
        at_most("representation", self.representation, 4096, "MLP width")
        at_most("rpn_top_n", max(self.rpn_top_n), 100_000, "proposals per image")
        at_most("box_batch", self.box_batch, MAX_BATCH, "RoIs per image")


@dataclass
class TrainSection:
    epochs: int = 6
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 50              # linear warm-up, then cosine decay to 0 over the run
    clip_grad_norm: float = 10.0        # 0: off
    # fraction of the training images without a kept box used per epoch (resampled each epoch)
    negatives: float = 0.25

    def __post_init__(self):
        for key, ok, allowed in [("epochs", self.epochs >= 1, "must be >= 1"),
                                 ("batch_size", self.batch_size >= 1, "must be >= 1"),
                                 ("lr", self.lr > 0, "must be > 0"),
                                 ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
                                 ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
                                 ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
                                 ("clip_grad_norm", self.clip_grad_norm >= 0, "must be >= 0"),
                                 ("negatives", 0 <= self.negatives <= 1, "must be in [0, 1]")]:
            require(ok, key, getattr(self, key), allowed)
        at_most("epochs", self.epochs, MAX_EPOCHS, "epochs")
        at_most("batch_size", self.batch_size, MAX_BATCH, "images per step")
        at_most("warmup_steps", self.warmup_steps, MAX_STEPS, "steps")


@dataclass
class PredictSection:
    # 0: a labeled finding always gets its best boxes, however low their score, as attention mining always
    # boxes every labeled finding; raise it to drop low-scoring boxes
    score_threshold: float = 0.0
    per_finding: int = 3                # boxes kept per (image, finding), as ranks 1..n (AM mines 3)
    labels: bool = True                 # keep the image's labeled findings only, as attention mining does
    max_detections: int = 1000          # per image, all findings, before the per-finding cut (torchvision: 100)
    batch_size: int = 16

    def __post_init__(self):
        require(0 <= self.score_threshold < 1, "score_threshold", self.score_threshold, "must be in [0, 1)")
        require(self.per_finding >= 1, "per_finding", self.per_finding, "must be >= 1")
        require(self.max_detections >= 1, "max_detections", self.max_detections, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        at_most("per_finding", self.per_finding, MAX_RANKS, "boxes per finding")
        at_most("max_detections", self.max_detections, 100_000, "boxes per image")
        at_most("batch_size", self.batch_size, MAX_BATCH, "images per batch")


@dataclass
class RuntimeSection:
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    amp: str = "auto"                   # auto | bf16 | none (pipeline/base/amp.py)
    save_every_steps: int = 20          # last.pt every N steps (and at each epoch's end); 0: epochs only

    def __post_init__(self):
        require(device_ok(self.device, auto=True), "device", self.device, "must be auto, cpu, cuda or cuda:N")
        require(self.amp in AMP_MODES, "amp", self.amp, one_of(AMP_MODES))
        require(self.save_every_steps >= 0, "save_every_steps", self.save_every_steps, "must be >= 0")
        at_most("save_every_steps", self.save_every_steps, MAX_STEPS, "steps")


@dataclass
class DetectorConfig:
    name: str = "detector"
    seed: int = 0
    arch: str | None = None             # None: the mining model's arch (its backbone initializes the detector)
    boxes: BoxesConfig = field(default_factory=BoxesConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    predict: PredictSection = field(default_factory=PredictSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def __post_init__(self):
        require(self.arch is None or self.arch in ARCHS, "arch", self.arch, f"must be null or {one_of(ARCHS)[8:]}")
        require(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"must be an integer in [0, {MAX_SEED:,}]")

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))

    def identity(self) -> dict:
        """What determines the trained weights (runtime's device and save cadence do not)."""
        out = self.to_dict()
        out["runtime"] = {"amp": out["runtime"]["amp"]}
        out.pop("predict")
        if out["boxes"]["trust_floor"] is None:   # unset: the ids of detectors trained before the key existed
            out["boxes"].pop("trust_floor")
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> "DetectorConfig":
        return from_dict(cls, data or {})

    @classmethod
    def load(cls, source: "str | Path | dict | DetectorConfig | None") -> "DetectorConfig":
        """A YAML path, a dict, a DetectorConfig or None (the defaults)."""
        if isinstance(source, DetectorConfig):
            return source
        if source is None or isinstance(source, dict):
            return cls.from_dict(source)
        with config_file(source):
            return cls.from_dict(read_yaml(source))

