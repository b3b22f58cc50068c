"""One YAML file configures a whole harvest: the training config plus the sections below.

    phantom:  {n, seed, size, difficulty}     # the embedded default data (`harvest demo`)
    mining:   {split, shard_size, ...}        # `split`/`shard_size` for the flow, the rest is MiningConfig
    export:   {formats: [coco, yolo, nih-csv], ranks: [1], min_score: null, trust_floor: 0.5}
    incremental: {retrain: false}             # a scheduled run with new images: mine them with the current model
                                              # (false), or train on all the data first (true; stages whose data
                                              # did not change are reused) and mine everything with the new model

`pipeline.config.train.load_config` ignores these sections, so they never change a stage's fingerprint.
`check(path)` validates the whole file (training config and these sections) before anything runs.
"""
from __future__ import annotations

from pipeline.base.vocab import SPLITS
from pipeline.config.check import (check_keys, check_section, config_file, invalid, is_int, is_number, read_yaml,
                                   require)
from pipeline.config.check import MAX_RANKS, MAX_SEED, at_most
from pipeline.config.mining import MiningConfig
from pipeline.config.train import HARVEST_SECTIONS, load_config

# The export formats a config or `harvest export --format` may name; their writers are
# `pipeline.export.write.FORMATS`
# (a test holds the two equal), so a config is checked without loading pycocotools.
EXPORT_FORMATS = ("coco", "yolo", "nih-csv", "labelstudio", "cvat")
REVIEW_FORMATS = ("labelstudio", "cvat")   # for people to review: every finding, trusted or not
DIFFICULTY = {"easy": 0.0, "default": 0.0, "medium": 0.5, "hard": 1.0}   # the phantom's named difficulties
DEFAULTS = {
    "phantom": {"n": 600, "seed": 0, "size": 1024},
    "mining": {"split": "all", "shard_size": 256},
    "export": {"formats": ["coco", "yolo", "nih-csv"], "ranks": [1], "min_score": None, "trust_floor": 0.5},
    "incremental": {"retrain": False},
}
# The estimated Acc@0.3 a finding needs for the pseudo-label exports to keep it (pipeline.evaluation.trust)
TRUST_FLOOR = DEFAULTS["export"]["trust_floor"]
PHANTOM_KEYS = ("n", "seed", "size", "difficulty")
MAX_PHANTOM, MAX_SHARD = 1_000_000, 1_000_000


def parse_difficulty(value) -> float:
    """A name (easy/default, medium, hard) or a number in [0, 1]."""
    if isinstance(value, str) and value in DIFFICULTY:
        return DIFFICULTY[value]
    d = float(value)
    if not 0 <= d <= 1:
        raise ValueError(f"difficulty {value!r}: give easy, medium, hard or a number in [0, 1]")
    return d


def load_sections(path) -> dict:
    """The harvest sections of a config file, defaults filled in and validated (ValueError, one line)."""
    with config_file(path):
        data = read_yaml(path)
        sections = {k: {**DEFAULTS[k], **check_section(k, data.get(k))} for k in HARVEST_SECTIONS}
        _validate(**sections)
    return sections


def check(path) -> None:
    """Validate a whole harvest config (training and the sections above): a bad value fails here, in one line,
    before any data is generated or any Prefect server starts."""
    load_config(path)
    load_sections(path)


def _validate(phantom: dict, mining: dict, export: dict, incremental: dict) -> None:
    check_keys("incremental", incremental, DEFAULTS["incremental"])
    require(isinstance(incremental["retrain"], bool), "incremental.retrain", incremental["retrain"],
            "must be true (train on new data before mining) or false (mine new images with the current model)")
    check_keys("phantom", phantom, PHANTOM_KEYS)
    n, seed, size = phantom["n"], phantom["seed"], phantom["size"]
    require(is_int(n) and n > 0, "phantom.n", n, "must be a positive integer (images)")
    at_most("phantom.n", n, MAX_PHANTOM, "images; NIH ChestX-ray14 has 112,120")
    require(is_int(seed) and seed >= 0, "phantom.seed", seed, "must be an integer >= 0")
    at_most("phantom.seed", seed, MAX_SEED, "a 32-bit seed")
    require(is_int(size) and 64 <= size <= 4096 and size % 16 == 0, "phantom.size", size,
            "must be a multiple of 16 in [64, 4096] (pixels; NIH images are 1024)")
    if "difficulty" in phantom:
        try:
            parse_difficulty(phantom["difficulty"])
        except (ValueError, TypeError):
            raise invalid("phantom.difficulty", phantom["difficulty"],
                          "must be easy, medium, hard or a number in [0, 1]") from None

    split, shard_size = mining["split"], mining["shard_size"]
    require(split in (*SPLITS, "all"), "mining.split", split, f"must be one of {', '.join(SPLITS)}, all")
    require(is_int(shard_size) and shard_size > 0, "mining.shard_size", shard_size, "must be a positive integer")
    at_most("mining.shard_size", shard_size, MAX_SHARD, "images per shard")
    MiningConfig.from_dict({k: v for k, v in mining.items() if k not in DEFAULTS["mining"]}, path="mining")

    check_keys("export", export, DEFAULTS["export"])
    formats, ranks, min_score = export["formats"], export["ranks"], export["min_score"]
    require(isinstance(formats, list) and formats and all(f in EXPORT_FORMATS for f in formats), "export.formats",
            formats, f"must be a non-empty list of {', '.join(EXPORT_FORMATS)}")
    require(ranks is None or isinstance(ranks, list) and all(is_int(r) and 0 < r <= MAX_RANKS for r in ranks),
            "export.ranks", ranks, f"must be a list of integers in [1, {MAX_RANKS}] (null or []: every rank)")
    require(min_score is None or is_number(min_score) and 0 <= min_score <= 1, "export.min_score", min_score,
            "must be null or a number in [0, 1]")
    floor = export["trust_floor"]
    require(floor is None or is_number(floor) and 0 <= floor <= 1, "export.trust_floor", floor,
            "must be null (every finding) or an estimated Acc in [0, 1]")


def trusted_by_default(fmt: str) -> bool:
    """Pseudo-label formats keep only trusted findings unless told otherwise; the review formats keep every
    finding, since people review them to make the truth that trust is measured on."""
    return fmt not in REVIEW_FORMATS


def input_size(path) -> int:
    return int(load_config(path).data.input_size)


def cache_sizes(path) -> list[int]:
    """The cache sizes a harvest of the config reads: the training input size, and the mining one when the
    `mining` section sets another (`mining.input_size`: boxes cut from a finer CAM grid)."""
    mining = load_sections(path)["mining"].get("input_size")
    return sorted({input_size(path), *([int(mining)] if mining else [])})
