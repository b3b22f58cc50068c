"""Mining configuration (eq. 7-8, sec. 3.2): one typed dataclass, loaded from YAML or a dict.

Fields that change the mined rows enter `config_hash()`, which flows use to skip shards already mined with
the same (model, config); fields that only change how fast or where it runs do not.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline.base.amp import MODES as AMP_MODES, resolve_amp
from pipeline.config.check import (SIZE_RULE, config_file, device_ok, fingerprint, from_dict, one_of, read_yaml,
                                   require, size_ok)
from pipeline.config.check import MAX_AM_STEPS, MAX_BATCH, MAX_RANKS, at_most

# Not part of the rows' identity: the same rows come out whatever these are.
_EXECUTION_FIELDS = ("batch_size", "device", "channels_last", "compile", "save_heatmaps")


@dataclass(frozen=True)
class MiningConfig:
    steps: int = 3                  # T of eq. 7-8; "T=3 works best" (sec. 3.2)
    erase_threshold: float = 0.5    # binarization of the normalized CAM for each erasure (sec. 3.2)
    # Box thresholds on H_f (sec. 3.2 gives no values): a prior. Choose them per model with `harvest tune` on the
    # validation split's truth boxes (never evaluation boxes); configs/demo.yaml records the demo model's choice
    # (0.9, 0.8, 0.7, 2026-11-26), where this prior gave whole-image boxes (docs/results.md).
    thresholds: tuple[float, ...] = (0.5, 0.35, 0.2)
    input_size: int | None = None   # None: the model's training input size (checkpoint meta)
    unlabeled: bool = False         # mine predicted findings (sigmoid prob >= prob_threshold), not the labels
    prob_threshold: float = 0.5
    amp: str = "auto"               # auto | bf16 | none: autocast of the forward; auto is bf16 where native
                                    # (pipeline/base/amp.py). Flows resolve auto before hashing: the hash and the run
                                    # record the mode used.
    fast: bool = True               # batched torch post-processing; False: the numpy/skimage reference path
    batch_size: int = 32
    device: str = "cpu"
    channels_last: bool = True
    compile: bool = False           # torch.compile the backbone (GPU)
    save_heatmaps: bool = False     # store fused heatmaps (uint8, CAM grid) next to the part, for reports

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        for key, ok, allowed in [
                ("steps", self.steps >= 1, "must be an integer >= 1 (T)"),
                ("erase_threshold", 0 < self.erase_threshold <= 1, "must be in (0, 1]"),
                ("thresholds", bool(self.thresholds) and all(0 < t <= 1 for t in self.thresholds),
                 "must be 1 or more values in (0, 1]"),
                ("input_size", self.input_size is None or size_ok(self.input_size), f"must be null or {SIZE_RULE}"),
                ("prob_threshold", 0 <= self.prob_threshold <= 1, "must be in [0, 1]"),
                ("amp", self.amp in AMP_MODES, one_of(AMP_MODES)),
                ("batch_size", self.batch_size >= 1, "must be a positive integer"),
                ("device", device_ok(self.device), "must be cpu, cuda or cuda:N")]:
            require(ok, key, getattr(self, key), allowed)
        at_most("steps", self.steps, MAX_AM_STEPS, "erasure steps; T=3 works best")
        at_most("batch_size", self.batch_size, MAX_BATCH, "images per batch")
        require(len(self.thresholds) <= MAX_RANKS, "thresholds", self.thresholds,
                f"must be at most {MAX_RANKS} values (one box rank each)")

    def to_dict(self) -> dict:
        """Plain JSON/YAML-able values (thresholds as a list)."""
        return {**dataclasses.asdict(self), "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, data: dict | None, path: str = "") -> "MiningConfig":
        """Unknown keys and bad values raise, naming the key (under `path`, e.g. `mining`)."""
        return from_dict(cls, data, path)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MiningConfig":
        with config_file(path):
            return cls.from_dict(read_yaml(path))

    def resolved(self, device=None) -> "MiningConfig":
        """This config with `amp: auto` replaced by the mode `device` (default: `self.device`) runs."""
        return dataclasses.replace(self, amp=resolve_amp(self.amp, device or self.device))

    def config_hash(self) -> str:
        """Stable 16-hex-digit identity of the settings that determine the mined rows."""
        rows = {k: v for k, v in self.to_dict().items() if k not in _EXECUTION_FIELDS}
        return fingerprint("mining", rows)[:16]
