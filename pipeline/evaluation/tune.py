"""Choose the box thresholds of sec. 3.2 on a validation split, never on the evaluation boxes.

The tuning set is the validation images that training held out (`pipeline.training.stages.split_ids`, by
patient), scored against their `truth` boxes (a phantom has them for every image); on real data, which has
none, the images people reviewed outside the evaluation split, against their `review` boxes (`harvest
import-review`). Without either the defaults stay priors. The images go through the model once: their fused heatmaps H_f are kept, and each
candidate triple cuts its boxes from them (`boxes_from_heatmaps`), scored with the `all/iou` protocol. The
objective is the mean Acc at T(IoU) = `t_iou` over the boxed findings present; per finding
(`tune`), each finding's own Acc there, where it has enough truth instances.

The validation images may come from another home (`data`): a phantom of a seed no evaluation uses, larger than
the model's own, so that a finding with few validation boxes in its own home (Cardiomegaly: 7 in the 251
validation images of a 2,000-image phantom) still gets enough to choose a rule on. Its validation split is the
model's config applied to that home. A pretraining phantom's home is the clean choice: `harvest evaluate`
refuses it, so none of its images is ever scored.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from pipeline.base.home import Home
from pipeline.base.vocab import FINDINGS
from pipeline.config.mining import MiningConfig
from pipeline.evaluation.protocol import evaluate
from pipeline.images.dataset import CacheDataset
from pipeline.mining.boxes import boxes_from_heatmaps
from pipeline.mining.shard import fused_pairs
from warehouse import db

CANDIDATES = tuple(t for t in itertools.combinations((0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1), 3))
MIN_INSTANCES = 10
COLUMNS = ("image_id", "finding", "rank", "x", "y", "w", "h", "score")   # a finding gets its own rule only with at least this many validation truth instances


def validation_ids(home: Home, model_meta: dict) -> list[str]:
    from pipeline.config.train import load_config
    from pipeline.training.stages import split_ids
    return split_ids(home, load_config(model_meta["config"]))["val"]


def validation_maps(home: Home, model, meta: dict, ids: list[str], config: MiningConfig) -> dict:
    """The fused heatmaps of every mined (image, finding) pair of `ids`, from one forward per batch."""
    dataset = CacheDataset(home, size=config.input_size or int(meta["input_size"]), image_ids=ids)
    parts = []
    for start in range(0, len(dataset), config.batch_size):
        batch = dataset.get_batch(np.arange(start, min(start + config.batch_size, len(dataset))))
        fused, b, c, frames, prob = fused_pairs(model, batch["image"], None if config.unlabeled else
                                                batch["labels"], batch["frame"], config)
        parts.append({"fused": fused, "frames": frames, "finding": c, "prob": prob,
                      "image_id": np.asarray(batch["image_id"], dtype=object)[b.numpy()]})
    return {k: torch.cat([p[k] for p in parts]) if k != "image_id" else np.concatenate([p[k] for p in parts])
            for k in parts[0]} if parts else {}


def cut(maps: dict, thresholds) -> pd.DataFrame:
    """Boxes of one threshold rule (`[K]`, or `[M, K]` per pair) on the kept heatmaps, as mined rows."""
    boxes = boxes_from_heatmaps(maps["fused"], maps["frames"], thresholds)
    m, k = np.nonzero(boxes.valid.numpy())
    xywh = boxes.xywh.numpy()[m, k]
    return pd.DataFrame({"image_id": maps["image_id"][m], "finding": np.asarray(FINDINGS)[maps["finding"].numpy()[m]],
                         "rank": k + 1, "x": xywh[:, 0], "y": xywh[:, 1], "w": xywh[:, 2], "h": xywh[:, 3],
                         "score": boxes.score.numpy()[m, k]})


def _scores(home, model_id: str, candidates, t_iou: float, base: MiningConfig | None, data=None) -> pd.DataFrame:
    """Acc and AFP at `t_iou` per (candidate, finding) on the validation truth of `data` (default: the model's
    home): long format."""
    from pipeline.training.checkpoint import load_model
    model, meta = load_model(Home.resolve(home), model_id)
    src = Home.resolve(data if data is not None else home)   # the validation images' home
    ids = validation_ids(src, meta)
    con = db.connect(src, read_only=True)
    try:
        gt = con.execute("SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE source = 'truth' "
                         "AND image_id IN (SELECT unnest(?))", [ids]).df()
        if gt.empty:   # real data: the boxes people reviewed, outside the evaluation split
            gt = con.execute("SELECT g.image_id, g.finding, g.x, g.y, g.w, g.h FROM gt_boxes g JOIN images i "
                             "USING (image_id) WHERE g.source = 'review' AND i.split <> 'test'").df()
            ids = sorted(set(gt["image_id"]))
    finally:
        con.close()
    if gt.empty:
        raise ValueError("no `truth` boxes on the validation images and no reviewed boxes outside the test split: "
                         "thresholds cannot be chosen without looking at evaluation boxes; keep the defaults, or "
                         "review some mined boxes (`harvest export --format labelstudio`, `harvest import-review`)")
    maps = validation_maps(src, model, meta, ids, base or MiningConfig())
    rows = []
    for cand in candidates:
        rows += [(tuple(cand), *r) for r in _at(maps, cand, gt, t_iou)]
    rule = lambda best, own: torch.tensor(MiningConfig(thresholds=best, finding_thresholds=own)  # noqa: E731
                                          .threshold_table())[maps["finding"]] if maps else best
    return pd.DataFrame(rows, columns=["thresholds", "finding", "acc", "afp", "n_gt"]), \
        lambda best, own: _at(maps, rule(best, own), gt, t_iou)


def _at(maps: dict, thresholds, gt: pd.DataFrame, t_iou: float) -> list[tuple]:
    """(finding, Acc, AFP, n_gt) at `t_iou`, `all/iou`, for the boxes one rule cuts from the kept heatmaps."""
    boxes = cut(maps, thresholds) if maps else pd.DataFrame(columns=list(COLUMNS))
    res = evaluate(boxes, gt, "tune", protocols=(("all", "iou"),))
    at_t = res[(res["t"].round(3) == t_iou) & (res["n_gt"] > 0)]
    return [(r.finding, float(r.acc), float(r.afp), int(r.n_gt)) for r in at_t.itertuples()]


def tune_thresholds(home, model_id: str = "latest", candidates=CANDIDATES, t_iou: float = 0.3,
                    base: MiningConfig | None = None, data=None) -> tuple[tuple[float, ...], pd.DataFrame]:
    """(best thresholds, table of candidates and their validation score), best first."""
    best, table, _, _ = tune(home, model_id, candidates, t_iou, base, data=data)
    return best, table


def tune(home, model_id: str = "latest", candidates=CANDIDATES, t_iou: float = 0.3,
         base: MiningConfig | None = None, min_instances: int = MIN_INSTANCES, data=None):
    """(best thresholds for all findings, their table best first, {finding: thresholds} where a finding with at
    least `min_instances` validation instances scores higher with a rule of its own, and the validation Acc
    per finding of the two rules: a frame with columns finding, n_gt, one_rule, per_finding). The model is
    `home`'s, the validation images `data`'s (default: `home`'s)."""
    scores, score_rule = _scores(home, model_id, candidates, t_iou, base, data)
    acc, afp = f"val_acc@{t_iou}", f"val_afp@{t_iou}"
    table = scores.groupby("thresholds", sort=False).agg(**{acc: ("acc", "mean"), afp: ("afp", "mean")})
    table = table.reindex([tuple(c) for c in candidates]).reset_index()
    table = table.sort_values([acc, afp], ascending=[False, True], kind="stable").reset_index(drop=True)
    best = table.iloc[0]["thresholds"]
    own = {}
    for finding, rows in scores.groupby("finding", sort=False):
        rows = rows.sort_values(["acc", "afp"], ascending=[False, True], kind="stable")
        at_best = rows[rows["thresholds"] == best].iloc[0]
        top = rows.iloc[0]
        if top["n_gt"] >= min_instances and top["acc"] > at_best["acc"]:
            own[finding] = top["thresholds"]
    one, per = score_rule(best, {}), score_rule(best, own)
    compare = pd.DataFrame([(f, n, a, b[1]) for (f, a, _, n), b in zip(one, per)],
                           columns=["finding", "n_gt", "one_rule", "per_finding"])
    return best, table, own, compare
