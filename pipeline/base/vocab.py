"""The NIH ChestX-ray14 vocabulary: 14 findings in one fixed order, plus `No Finding`.

Names are normalized once, at ingestion. An unknown name raises :class:`UnknownFinding`; it is never
silently dropped (docs/design.md#data-contracts).
"""
from __future__ import annotations

import hashlib

FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
SPLITS: tuple[str, ...] = ("train", "val", "test")   # the warehouse's `images.split` values; test: the evaluation split
# The 8 findings that carry ground-truth boxes in BBox_List_2017.csv, in the paper's table order.
BOXED_FINDINGS: tuple[str, ...] = FINDINGS[:8]
INDEX = {name: i for i, name in enumerate(FINDINGS)}

# Spellings seen in the wild -> official name. Exact matches only, never substrings.
_ALIASES = {
    "Infiltrate": "Infiltration",
    "Pleural Thickening": "Pleural_Thickening",
    "Pleural-Thickening": "Pleural_Thickening",
    "No finding": NO_FINDING,
    "NoFinding": NO_FINDING,
}


class UnknownFinding(ValueError):
    """A finding name outside the vocabulary."""


def normalize_finding(name: str) -> str:
    """Official spelling of one finding name, or raise :class:`UnknownFinding`."""
    name = name.strip()
    name = _ALIASES.get(name, name)
    if name in INDEX or name == NO_FINDING:
        return name
    raise UnknownFinding(f"unknown finding {name!r}; expected one of {', '.join(FINDINGS)} or {NO_FINDING!r}")


def parse_labels(field: str) -> list[str]:
    """`Finding Labels` cell (pipe-separated) -> sorted official positive findings (`No Finding` -> [])."""
    names = {normalize_finding(part) for part in field.split("|") if part.strip()}
    if NO_FINDING in names and len(names) > 1:
        raise UnknownFinding(f"'No Finding' combined with findings in {field!r}")
    names.discard(NO_FINDING)
    return sorted(names, key=INDEX.__getitem__)


def held_out(patient: str, seed: int, fraction: float) -> bool:
    """Whether training holds `patient` out of `train` for validation when the warehouse has no `val` split: a
    seeded hash of the patient id below `fraction` (data.val_fraction), so a patient is never split and the choice
    is stable when new images arrive. The rule of `pipeline.training.stages.split_ids`, which exports follow
    (a test holds the two equal)."""
    return int(hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()[:8], 16) / 2 ** 32 < fraction
