"""What a detector trains on: one mining run's boxes on the training images of the run's classifier.

- Images: the classifier's training set (`pipeline.training.stages.split_ids` with the classifier's own config:
  the warehouse's train split minus the validation patients it carved), cached at the classifier's input size,
  that the run covered (its parts' image lists). An image with no kept box is a negative.
- Boxes: the run's rows filtered by rank, score and finding (`BoxesConfig`), or with `boxes.trust_floor` by the
  trust rule an export applies (the rank and cut per finding fitted on the run's tuning set, the validation
  images, which are never training images here; only the findings trusted at the floor). Where the review module exists
  (`pipeline.export.review.reviewed`, with its `reviews` table) and `boxes.reviewed` is on, a reviewed image takes its
  reviewed boxes instead of the mined ones (none: a reviewed negative).
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.base.home import Home
from pipeline.config.detector import BoxesConfig
from warehouse import db

BOX_COLUMNS = ["image_id", "finding", "x", "y", "w", "h"]


@dataclass
class MiningSource:
    """A mining run and the classifier behind it."""
    run_id: str
    model_id: str            # the classifier (runs.model_id): its backbone, input size and splits
    arch: str
    input_size: int
    config: dict             # the classifier's training config (models.config)
    sha256: str
    checkpoint: str


@dataclass
class Targets:
    image_ids: list[str]                      # training images, sorted
    boxes: pd.DataFrame                       # BOX_COLUMNS, original frame
    reviewed_images: list[str] = field(default_factory=list)
    trust: dict | None = None                 # the trust rule applied (an export manifest's `trust` entry)

    def digest(self) -> str:
        from pipeline.config.check import fingerprint
        rows = self.boxes.sort_values(BOX_COLUMNS).round(3).values.tolist()
        return fingerprint(self.image_ids, rows)


def mining_source(home: Home, run_id: str) -> MiningSource:
    """The run's classifier from its `runs` row (a detector run names its detector: refused)."""
    home = Home.resolve(home)
    con = db.connect(home, read_only=True)
    try:
        row = con.execute("SELECT model_id FROM runs WHERE run_id = ?", [run_id]).fetchone()
        if row is None:
            raise ValueError(f"no run {run_id!r} in {home.warehouse}; list mining runs with "
                             "`harvest sql \"SELECT run_id, status FROM runs WHERE flow = 'mine'\"`")
        model = con.execute("SELECT model_id, arch, stage, config, checkpoint, checkpoint_sha256 FROM models "
                            "WHERE model_id = ?", [row[0]]).fetchone()
    finally:
        con.close()
    if model is None or model[2] == "detector":
        raise ValueError(f"run {run_id!r} names no classifier model ({row[0]!r}); pass a mining run")
    config = json.loads(model[3]) if isinstance(model[3], str) else (model[3] or {})
    return MiningSource(run_id, model[0], model[1], int(config.get("data", {}).get("input_size", 0)) or
                        _meta_input_size(home, model[4]), config, model[5], model[4])


def _meta_input_size(home: Home, checkpoint: str) -> int:
    import torch
    return int(torch.load(home.root / checkpoint, map_location="cpu", weights_only=True, mmap=True)["meta"]
               ["input_size"])


def training_images(home: Home, source: MiningSource) -> list[str]:
    """The classifier's training images (same splits as `harvest train`) that the mining run covered."""
    home = Home.resolve(home)
    from pipeline.config.train import load_config
    from pipeline.runs.parts import mined_image_ids
    from pipeline.training.stages import split_ids

    cfg = load_config({**source.config, "model": {**source.config.get("model", {}), "init": None}})
    train = split_ids(home, cfg)["train"]
    covered = set(mined_image_ids(home, source.run_id))
    if not covered:   # parts written without image lists: the images with boxes
        con = db.connect(home, read_only=True)
        try:
            covered = {r[0] for r in con.execute("SELECT DISTINCT image_id FROM mined_boxes WHERE run_id = ?",
                                                 [source.run_id]).fetchall()}
        finally:
            con.close()
    return sorted(set(train) & covered)


def training_targets(home: Home, run_id: str, image_ids: list[str], cfg: BoxesConfig) -> Targets:
    home = Home.resolve(home)
    trusted = cfg.trust_floor is not None
    con = db.connect(home, read_only=not trusted)   # the trust rows may be measured and stored
    try:
        rules = trust = None
        if trusted:
            from pipeline.evaluation.trust import gate, keep, manifest_entry
            rules = gate(con, run_id, cfg.trust_floor)
            trust = manifest_entry(rules)
        where, params = ["run_id = ?", "image_id IN (SELECT unnest(?))", "score >= ?"], [run_id, image_ids,
                                                                                           cfg.min_score]
        if rules is None:
            where.append("rank IN (SELECT unnest(?))")
            params.append(list(cfg.ranks))
        if cfg.findings is not None:
            where.append("finding IN (SELECT unnest(?))")
            params.append(list(cfg.findings))
        boxes = con.execute(f"SELECT {', '.join(BOX_COLUMNS)}, rank, score FROM mined_boxes WHERE "
                            f"{' AND '.join(where)} ORDER BY image_id, finding, rank", params).df()
        reviewed = reviewed_boxes(con) if cfg.reviewed else None
    finally:
        con.close()
    if rules is not None:
        boxes = pd.DataFrame(keep(boxes.to_dict("records"), rules), columns=boxes.columns)
    boxes = boxes[BOX_COLUMNS]
    boxes = boxes.astype({c: "float64" for c in "xywh"})
    used: list[str] = []
    if reviewed is not None and set(reviewed[1]) & set(image_ids):
        rboxes, rids = reviewed
        used = sorted(set(rids) & set(image_ids))
        rboxes = rboxes[rboxes["image_id"].isin(used)][BOX_COLUMNS]
        if cfg.findings is not None:
            rboxes = rboxes[rboxes["finding"].isin(cfg.findings)]
        boxes = pd.concat([boxes[~boxes["image_id"].isin(used)], rboxes.astype({c: "float64" for c in "xywh"})],
                          ignore_index=True).sort_values(["image_id", "finding"], kind="mergesort")
    return Targets(sorted(image_ids), boxes.reset_index(drop=True), used, trust)


def reviewed_boxes(con) -> tuple[pd.DataFrame, set] | None:
    """`pipeline.export.review.reviewed(con)` where that module and its `reviews` table exist, else None."""
    if importlib.util.find_spec("pipeline.export.review") is None:
        return None
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'reviews'").fetchone()[0]:
        return None
    from pipeline.export.review import reviewed
    boxes, ids = reviewed(con)
    return boxes, set(ids)


def input_boxes(boxes: pd.DataFrame, frame: np.ndarray, size: int) -> np.ndarray:
    """xywh boxes of one image (original frame) -> xyxy in the `size` px input, clipped; degenerate ones dropped."""
    from pipeline.base.coords import image_to_input
    xywh = image_to_input(boxes[["x", "y", "w", "h"]].to_numpy(np.float64), frame, size)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).clip(0, size)
    return xyxy
