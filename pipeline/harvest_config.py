"""One YAML file configures a whole harvest: the training config plus the sections below.

    phantom:  {n, seed, size, difficulty}     # the embedded default data (`harvest demo`)
    mining:   {split, shard_size, ...}        # `split`/`shard_size` for the flow, the rest is MiningConfig
    export:   {formats: [coco, yolo, nih-csv], ranks: [1], min_score: null}

`pipeline.training.config.load_config` ignores these sections, so they never change a stage's fingerprint.
"""
from __future__ import annotations

from pathlib import Path

import yaml

HARVEST_SECTIONS = ("phantom", "mining", "export")
DEFAULTS = {
    "phantom": {"n": 600, "seed": 0, "size": 1024},
    "mining": {"split": "all", "shard_size": 256},
    "export": {"formats": ["coco", "yolo", "nih-csv"], "ranks": [1], "min_score": None},
}


def load_sections(path) -> dict:
    """The harvest sections of a config file, defaults filled in."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return {k: {**DEFAULTS[k], **(data.get(k) or {})} for k in HARVEST_SECTIONS}


def input_size(path) -> int:
    from pipeline.training.config import load_config
    return int(load_config(path).data.input_size)
