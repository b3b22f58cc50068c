"""Run a registered detector over images: `mined_boxes` rows with `method = 'detector'`.

Per image, the detections of each finding (the image's labeled findings only, with `predict.labels`, as
attention mining mines the labeled findings) are ranked by score, the best `predict.per_finding` kept as
ranks 1..n, and mapped from the input frame back to the original frame. `score` is the detector's class
score of the box, `prob` the finding's best score on the image, `threshold` the score threshold applied.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.base.amp import autocast
from pipeline.base.coords import input_to_image
from pipeline.base.files import sha256_file
from pipeline.base.home import Home
from pipeline.base.vocab import FINDINGS
from pipeline.config.detector import PredictSection
from pipeline.detector.model import build_detector
from pipeline.detector.train import STAGE, resize
from pipeline.images.dataset import CacheDataset
from pipeline.training.checkpoint import load_checkpoint, model_row
from warehouse.db import PARQUET_TABLES

SCHEMA = PARQUET_TABLES["mined_boxes"]
METHOD = "detector"


def load_detector(home, model_id: str, device="cpu") -> tuple[torch.nn.Module, dict]:
    """-> (detector in eval mode on `device`, its checkpoint meta); the sha256 is checked like `load_model`'s."""
    home = Home.resolve(home)
    row = model_row(home, model_id)
    if row["stage"] != STAGE:
        raise ValueError(f"model {model_id!r} is a {row['stage']} classifier, not a detector; list detectors with "
                         "`harvest sql \"SELECT model_id, created_at FROM models WHERE stage = 'detector'\"`")
    path = home.root / row["checkpoint"]
    if sha256_file(path) != row["checkpoint_sha256"]:
        raise ValueError(f"checkpoint {path} does not match the sha256 recorded for detector {model_id}; retrain "
                         "it with `harvest detector train`")
    state = load_checkpoint(path)
    meta = state["meta"]
    model = build_detector(meta["arch"], meta["input_size"], meta["anchors"],
                           representation=meta["config"]["model"]["representation"],
                           rpn_top_n=tuple(meta["config"]["model"]["rpn_top_n"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta


@torch.inference_mode()
def predict_table(home, model, meta: dict, image_ids, run_id: str, config: PredictSection, amp: str = "none"
                  ) -> pa.Table:
    """Detect on `image_ids` (read from the cache at the classifier's size) -> a `mined_boxes` table."""
    device = next(model.parameters()).device
    model.roi_heads.score_thresh = config.score_threshold
    model.roi_heads.detections_per_img = config.max_detections
    ds = CacheDataset(home, size=meta["cache_size"], image_ids=list(image_ids))
    size = int(meta["input_size"])
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for start in range(0, len(ds), config.batch_size):
        batch = ds.get_batch(np.arange(start, min(start + config.batch_size, len(ds))))
        with autocast(device, amp):
            outputs = model(list(resize(batch["image"], size, device)))
        for k, out in enumerate(outputs):
            labels = out["labels"].cpu().numpy() - 1
            scores = out["scores"].float().cpu().numpy()
            xyxy = out["boxes"].float().cpu().numpy().reshape(-1, 4)
            allowed = batch["labels"][k].numpy() > 0 if config.labels else np.ones(len(FINDINGS), bool)
            frame = batch["frame"][k].numpy()
            for c in np.unique(labels):
                if not allowed[c]:
                    continue
                sel = np.flatnonzero(labels == c)
                sel = sel[np.argsort(-scores[sel], kind="stable")][:config.per_finding]
                xywh = np.concatenate([xyxy[sel, :2], xyxy[sel, 2:] - xyxy[sel, :2]], axis=1)
                xywh = input_to_image(xywh, size, frame)
                n = len(sel)
                cols["image_id"] += [batch["image_id"][k]] * n
                cols["finding"] += [FINDINGS[c]] * n
                cols["rank"] += list(range(1, n + 1))
                for j, name in enumerate("xywh"):
                    cols[name] += xywh[:, j].tolist()
                cols["score"] += scores[sel].tolist()
                cols["prob"] += [float(scores[sel[0]])] * n
    n = len(cols["image_id"])
    cols.update(run_id=[run_id] * n, model_id=[meta["model_id"]] * n, threshold=[config.score_threshold] * n,
                method=[METHOD] * n)
    return pa.Table.from_pydict(cols, schema=SCHEMA)
