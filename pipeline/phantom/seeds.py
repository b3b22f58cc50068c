"""Which phantom seeds serve what, so that no score is ever made on images a model was pretrained on.

- `PRETRAIN_SEEDS`: reserved for making starting weights (`harvest pretrain`). `harvest pretrain` refuses any
  other seed, and evaluation refuses a phantom drawn from these (`check_scorable`).
- `DEVELOPMENT_SEEDS`: the demo's phantom (0), the first weights' phantom (1) and the seeds recipes were
  developed on. Numbers reported as "unseen" come from seeds outside both sets.
"""
from __future__ import annotations

PRETRAIN_SEEDS = range(1000, 2000)
DEVELOPMENT_SEEDS = range(0, 10)


def is_pretrain_seed(seed: int) -> bool:
    return int(seed) in PRETRAIN_SEEDS


def require_pretrain_seed(seed: int) -> None:
    """ValueError unless `seed` is reserved for pretraining."""
    if not is_pretrain_seed(seed):
        raise ValueError(f"phantom.seed {seed}: pretraining draws only from the reserved seeds "
                         f"{PRETRAIN_SEEDS.start}-{PRETRAIN_SEEDS.stop - 1} (pipeline.phantom.seeds), which no "
                         "evaluation uses")


def check_scorable(seed: int) -> None:
    """ValueError if a phantom of `seed` was reserved for pretraining: scores on it would be scores on
    training images of the shipped weights."""
    if is_pretrain_seed(seed):
        raise ValueError(f"this phantom was drawn from seed {seed}, reserved for pretraining "
                         "(pipeline.phantom.seeds.PRETRAIN_SEEDS): the shipped weights were trained on such "
                         "images, so it is never scored; generate another seed")


def ingested_phantom_seeds(con, home) -> set[int]:
    """The seeds of the phantoms a home ingested (`phantom_manifest.json` in its recorded ingest roots)."""
    import json

    from pipeline.runs.record import ingest_roots
    manifests = [root / "phantom_manifest.json" for root in ingest_roots(con, home)]
    return {int(json.loads(m.read_text())["seed"]) for m in manifests if m.is_file()}
