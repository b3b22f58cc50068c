"""The data a training run draws from the warehouse, without torch: its image sets (`split_ids`), their digest
(`data_digest`, which model ids and `models.config.trained_on` record), and whether the newest model was trained on
the data the warehouse gives its config now (`newest_model_outdated`, what `harvest status` says)."""
from __future__ import annotations

import hashlib
import json

from pipeline.base.home import Home
from pipeline.base.vocab import held_out
from pipeline.config.train import RECORD_KEY, TrainConfig, load_config
from warehouse import db


def split_ids(home: Home, cfg: TrainConfig, con=None) -> dict[str, list[str]]:
    """Image ids of the train, validation and AM sets (only images cached at the input size).

    Validation: the warehouse's `val` split when there is one, else patients carved from `train` by a
    seeded hash of the patient id (NIH lists only train_val and test): deterministic, never splitting a
    patient, and stable when new images arrive. Read on `con`, else on a read-only connection of its own.
    """
    with db.reading(home, con) as con:
        rows = con.execute("""SELECT DISTINCT i.image_id, i.patient_id, i.split FROM images i
            JOIN cache_entries c ON c.source_sha256 = i.source_sha256 WHERE c.size = ? ORDER BY 1""",
                           [cfg.data.input_size]).fetchall()
    is_val = held_out_rule(cfg.seed, cfg.data.val_fraction, any(r[2] == "val" for r in rows))

    val = {r[0] for r in rows if is_val(r[1], r[2])}
    out = {"val": sorted(val),
           "train": [r[0] for r in rows if r[2] in cfg.data.train_splits and r[0] not in val],
           "am": [r[0] for r in rows if r[2] in cfg.data.am_splits and r[0] not in val]}
    if not out["train"]:
        raise ValueError(f"no {cfg.data.input_size}px cached images in splits {cfg.data.train_splits}; "
                         f"ingest with size {cfg.data.input_size} first (`harvest ingest ...`)")
    return out


def data_digest(home: Home, ids: dict[str, list[str]], con=None) -> dict[str, dict]:
    """What the stages train and validate on, per image set (`train` with `val`, `am` with `val`): a sha256
    over every image's id, its source file's sha256 and its sorted labels, in `split_ids` order, and the counts.
    """
    with db.reading(home, con) as con:
        rows = con.execute("""SELECT i.image_id, i.source_sha256,
                                     coalesce(string_agg(l.finding, '|' ORDER BY l.finding), '')
                              FROM images i LEFT JOIN labels l USING (image_id)
                              WHERE i.image_id IN (SELECT unnest(?)) GROUP BY ALL""",
                           [sorted({i for part in ids.values() for i in part})]).fetchall()
    line = {r[0]: f"{r[0]}\t{r[1]}\t{r[2]}\n".encode() for r in rows}
    out = {}
    for name, parts in (("train", ("train", "val")), ("am", ("am", "val"))):
        h = hashlib.sha256()
        for part in parts:
            h.update(f"[{part}]\n".encode())
            for image_id in ids.get(part, []):
                h.update(line[image_id])
        out[name] = {"digest": h.hexdigest()[:16], "images": {part: len(ids.get(part, [])) for part in parts}}
    return out


def newest_model_outdated(home, con=None) -> str | None:
    """One line when the newest model's `trained_on` digest differs from the one its config's image sets give on the
    warehouse now (images added, changed or relabelled since), naming the verb that retrains; else None (up to date,
    no model, or a model made before data lineage, which records none)."""
    with db.reading(home, con) as con:
        row = con.execute("SELECT model_id, config FROM models ORDER BY created_at DESC LIMIT 1").fetchone()
        if row is None:
            return None
        config = json.loads(row[1]) if isinstance(row[1], str) else row[1] or {}
        record = config.get(RECORD_KEY)
        if not record:
            return None
        key = "am" if "am" in record["images"] else "train"
        try:
            ids = split_ids(home, load_config(config), con)
        except (ValueError, FileNotFoundError):   # a config this code no longer reads, or no cached images left:
            return None                            # nothing to compare
        now = data_digest(home, ids, con)[key]
        if now["digest"] == record["digest"]:
            return None
        trained = con.execute("SELECT params FROM runs WHERE flow = 'train' AND status = 'completed' "
                              "ORDER BY started_at DESC LIMIT 1").fetchone()
    path = (json.loads(trained[0]) if trained and isinstance(trained[0], str) else {}).get("config") or "CONFIG"
    counts = " + ".join(f"{n} {part}" for part, n in record["images"].items())
    current = " + ".join(f"{n} {part}" for part, n in now["images"].items())
    return (f"the newest model {row[0]} is older than the warehouse's data: trained on {counts} images (digest "
            f"{record['digest']}), its config now gives {current} (digest {now['digest']}); "
            f"retrain with `harvest train --config {path}`")


def validation_rule(model: dict | None, has_val: bool):
    """(is_val(patient, split), its description): the images the training of `model` (its `models` row, config
    parsed) held out for validation, as `pipeline.training.stages.split_ids` draws them: the warehouse's `val`
    split, else the `train` patients that the config's `seed` and `data.val_fraction` hold out (TrainConfig's
    defaults where the model records none)."""
    config, default = (model or {}).get("config") or {}, TrainConfig()
    seed = config.get("seed", default.seed)
    fraction = (config.get("data") or {}).get("val_fraction", default.data.val_fraction)
    if has_val:
        return held_out_rule(seed, fraction, True), "the warehouse's val split"
    source = f"model {model['model_id']}" if "seed" in config else "TrainConfig defaults (the model records none)"
    return held_out_rule(seed, fraction, False), \
        f"held out of train as training holds it out (seed {seed}, val_fraction {fraction}, {source})"


def held_out_rule(seed: int, fraction: float, has_val: bool):
    """is_val(patient, split): the warehouse's `val` split when it has one, else the `train` patients that
    `seed` and `fraction` hold out. The one rule of training (`split_ids`), trust and exports."""
    if has_val:
        return lambda patient, split: split == "val"
    return lambda patient, split: split == "train" and held_out(patient, seed, fraction)
