"""Mining configuration (eq. 7-8, sec. 3.2): one typed dataclass, loaded from YAML or a dict.

Fields that change the mined rows enter `config_hash()`, which flows use to skip shards already mined with
the same (model, config); fields that only change how fast or where it runs do not.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline.base.amp import MODES as AMP_MODES, resolve_amp
from pipeline.base.vocab import FINDINGS
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
    # Per-finding box thresholds, {finding: [t1, .., tK]} with as many values as `thresholds`, which serves the
    # findings not named: a box rule fitted to each finding's size and spread (`harvest tune --per-finding`,
    # chosen on validation truth only). Stored as sorted (finding, thresholds) pairs.
    finding_thresholds: dict = dataclasses.field(default_factory=dict)
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
        object.__setattr__(self, "finding_thresholds", _per_finding(self.finding_thresholds, len(self.thresholds)))
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
        """Plain JSON/YAML-able values (thresholds as lists)."""
        return {**dataclasses.asdict(self), "thresholds": list(self.thresholds),
                "finding_thresholds": {f: list(t) for f, t in self.finding_thresholds}}

    def threshold_table(self) -> list[tuple[float, ...]]:
        """The box thresholds of each finding, in `FINDINGS` order: `[14][K]`."""
        named = dict(self.finding_thresholds)
        return [named.get(f, self.thresholds) for f in FINDINGS]

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
        if not rows["finding_thresholds"]:     # one rule for all: the ids of runs mined before the field existed
            del rows["finding_thresholds"]
        return fingerprint("mining", rows)[:16]


def _per_finding(value, k: int) -> tuple:
    """`finding_thresholds` as sorted (finding, thresholds) pairs, each checked: a known finding, K values in (0, 1]."""
    pairs = value.items() if isinstance(value, dict) else value
    out = []
    for finding, ts in pairs:
        key = f"finding_thresholds.{finding}"
        require(finding in FINDINGS, key, finding, "must name a finding: " + ", ".join(FINDINGS))
        require(isinstance(ts, (list, tuple)) and len(ts) == k and all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in ts), key, ts,
            f"must be {k} values in (0, 1], as many as `thresholds`")
        out.append((finding, tuple(float(t) for t in ts)))
    return tuple(sorted(out))
