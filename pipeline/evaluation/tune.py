"""Choose the box thresholds of sec. 3.2 on a validation split, never on the evaluation boxes.

The validation images are those training held out (`pipeline.training.stages.split_ids`, by patient), scored
against their `truth` boxes (a phantom has them for every image; the real NIH data has none, so there the
defaults stay priors). For each candidate triple, the images are mined and scored with the `all/iou`
protocol; the objective is the mean Acc at T(IoU) = `t_iou` over the boxed findings present.
"""
from __future__ import annotations

import itertools

import pandas as pd

from pipeline.base.home import Home
from pipeline.config.mining import MiningConfig
from pipeline.evaluation.protocol import evaluate
from pipeline.mining.shard import mine_shard
from warehouse import db

CANDIDATES = tuple(t for t in itertools.combinations((0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1), 3))


def validation_ids(home: Home, model_meta: dict) -> list[str]:
    from pipeline.config.train import load_config
    from pipeline.training.stages import split_ids
    return split_ids(home, load_config(model_meta["config"]))["val"]


def tune_thresholds(home, model_id: str = "latest", candidates=CANDIDATES, t_iou: float = 0.3,
                    base: MiningConfig | None = None) -> tuple[tuple[float, ...], pd.DataFrame]:
    """(best thresholds, table of candidates and their validation score), best first."""
    from pipeline.training.checkpoint import load_model
    home = Home.resolve(home)
    model, meta = load_model(home, model_id)
    ids = validation_ids(home, meta)
    con = db.connect(home, read_only=True)
    try:
        gt = con.execute("SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE source = 'truth' "
                         "AND image_id IN (SELECT unnest(?))", [ids]).df()
    finally:
        con.close()
    if gt.empty:
        raise ValueError("no `truth` boxes on the validation images: thresholds cannot be chosen without "
                         "looking at evaluation boxes; keep the defaults")
    base = base or MiningConfig()
    rows = []
    for cand in candidates:
        cfg = MiningConfig(**{**base.to_dict(), "thresholds": tuple(cand)})
        boxes = mine_shard(home, meta["model_id"], ids, cfg, "tune", model=model).to_pandas()
        res = evaluate(boxes, gt, "tune", protocols=(("all", "iou"),))
        at_t = res[(res["t"].round(3) == t_iou) & (res["n_gt"] > 0)]
        rows.append((tuple(cand), float(at_t["acc"].mean()), float(at_t["afp"].mean())))
    table = pd.DataFrame(rows, columns=["thresholds", f"val_acc@{t_iou}", f"val_afp@{t_iou}"])
    table = table.sort_values([f"val_acc@{t_iou}", f"val_afp@{t_iou}"], ascending=[False, True], kind="stable")
    return table.iloc[0]["thresholds"], table.reset_index(drop=True)
