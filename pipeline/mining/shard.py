"""Mining a batch and a shard: cache in, `mined_boxes` rows out (eq. 7-8, sec. 3.2; docs/design.md#flows).

One backbone forward per image (bf16 autocast and channels_last when the config says so, under
`torch.inference_mode`) gives X and the sigmoid probabilities; the step-1 CAMs X·w^c are made only for the
(image, finding) pairs to mine: the image's positive labels, or, for unlabeled images, the findings whose
probability reaches `prob_threshold`. The T erasure steps, the fused heatmap and the boxes are batched torch on
the model's device (`heatmap_fusion`, `boxes`); `config.fast=False` runs the numpy reference instead.
`prob` is always the model's sigmoid probability of the finding.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.base.amp import autocast
from pipeline.base.home import Home
from pipeline.base.vocab import FINDINGS
from pipeline.config.mining import MiningConfig
from pipeline.images.dataset import CacheDataset, CacheIndex, normalize
from pipeline.mining.boxes import Boxes, boxes_from_heatmaps
from pipeline.mining.heatmap_fusion import fused_heatmap
from pipeline.mining.reference import fused_heatmap_reference, boxes_reference
from warehouse.db import PARQUET_TABLES

SCHEMA = PARQUET_TABLES["mined_boxes"]
_BOX_COLUMNS = ("rank", "x", "y", "w", "h", "score", "prob", "threshold")


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Run in eval mode (BatchNorm on running statistics) and give the caller's mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def one_thread_on_cpu(device: torch.device):
    """Run the post-processing's many small ops on one thread. torch splits any op over 32k elements across
    its threads; for these ops the fork/join costs more than it saves, and on a busy machine every join waits
    for a descheduled thread (measured on 2 shared cores: median 28 ms vs 400+ ms per 128 maps)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reference_boxes(cams: torch.Tensor, frames: np.ndarray, thresholds: np.ndarray,
                     config: MiningConfig) -> tuple[Boxes, np.ndarray]:
    """The numpy/skimage path, one map at a time (its thresholds `[M, K]`), packed like the fast path's output."""
    K = len(config.thresholds)
    xywh, score, thr = np.zeros((len(cams), K, 4)), np.zeros((len(cams), K)), np.zeros((len(cams), K))
    valid = np.zeros((len(cams), K), dtype=bool)
    fused = []
    for m, cam in enumerate(cams.cpu().numpy()):
        fused.append(fused_heatmap_reference(cam, config.steps, config.erase_threshold))
        for k, box in enumerate(boxes_reference(fused[-1], frames[m], thresholds[m])):
            xywh[m, k] = [box[c] for c in "xywh"]
            score[m, k], thr[m, k], valid[m, k] = box["score"], box["threshold"], True
    shape = (0, *cams.shape[1:])
    return (Boxes(*(torch.from_numpy(a) for a in (xywh, score, thr, valid))),
            np.stack(fused) if fused else np.zeros(shape))


def _pair_cams(X: torch.Tensor, weight: torch.Tensor, chosen: torch.Tensor):
    """Step-1 CAMs X·w^c (eq. 7, M_0 = 1) of the chosen (image, finding) pairs only, in float32.

    One batched matmul over images, each against the weight vectors of its own findings (padded to the
    batch's largest count), so X is neither gathered per pair nor contracted with every class.
    Returns cams `[M,h,w]` and the pairs' image and finding indices `[M]`.
    """
    b, c = chosen.nonzero(as_tuple=True)                       # row-major: each image's findings in order
    k = (chosen.cumsum(1) - 1)[b, c]                           # slot of the pair among its image's findings
    slots = torch.zeros(len(chosen), int(k.max()) + 1 if len(k) else 0, weight.shape[1], device=X.device)
    slots[b, k] = weight[c].float()
    cams = torch.einsum("bdhw,bkd->bkhw", X.float(), slots)
    return cams[b, k], b, c


def _forward(model, images_uint8: torch.Tensor, config: MiningConfig, features=None):
    """The one backbone forward of a batch: (X, sigmoid probabilities). Queues device work, never waits on it."""
    device = next(model.parameters()).device
    x = normalize(images_uint8, device)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _eval_mode(model), autocast(device, config.amp):
        X = (features or model.forward_features)(x)
        logits = model.forward_head(X)
    return X, torch.sigmoid(logits.float())


def _mine_features(model, X: torch.Tensor, prob: torch.Tensor, labels, frames, config: MiningConfig) -> dict:
    """Everything after the forward: pairs, CAMs, eq. 7-8, sec. 3.2 boxes, numpy columns (see `mine_batch`)."""
    with one_thread_on_cpu(X.device):
        return _mine_pairs(model, X, prob, labels, frames, config)


def chosen_pairs(model, X: torch.Tensor, prob: torch.Tensor, labels, frames, config: MiningConfig):
    """The (image, finding) pairs a batch mines (its labels, or its predictions when unlabeled): their step-1
    CAMs `[M,h,w]`, image and finding indices `[M]`, and frames `[M,2]` (CPU)."""
    if config.unlabeled or labels is None:
        chosen = prob >= config.prob_threshold
    else:
        chosen = torch.as_tensor(labels, device=X.device) > 0
    cams, b, c = _pair_cams(X, model.head.weight, chosen)
    frames = torch.as_tensor(frames, dtype=torch.float32).reshape(-1, 2)
    return cams, b, c, frames[b.cpu()]


@torch.inference_mode()
def fused_pairs(model, images_uint8: torch.Tensor, labels, frames, config: MiningConfig):
    """One batch's fused heatmaps H_f (eq. 7-8, fast path) of the pairs it mines, without boxes: for cutting
    boxes with many rules from one forward (`harvest tune`). Returns fused `[M,h,w]`, image and finding
    indices `[M]`, frames `[M,2]` and the pairs' probabilities `[M]`, all on the CPU."""
    X, prob = _forward(model, images_uint8, config)
    with one_thread_on_cpu(X.device):
        cams, b, c, pair_frames = chosen_pairs(model, X, prob, labels, frames, config)
        fused = fused_heatmap(cams, config.steps, config.erase_threshold)
    return fused.cpu(), b.cpu(), c.cpu(), pair_frames, prob[b, c].cpu()


def _mine_pairs(model, X: torch.Tensor, prob: torch.Tensor, labels, frames, config: MiningConfig) -> dict:
    device = X.device
    cams, b, c, pair_frames = chosen_pairs(model, X, prob, labels, frames, config)
    thresholds = torch.tensor(config.threshold_table(), dtype=torch.float32)[c.cpu()]   # each pair's finding's
    if config.fast:
        fused = fused_heatmap(cams, config.steps, config.erase_threshold)
        boxes = boxes_from_heatmaps(fused, pair_frames.to(device), thresholds.to(device))
    else:
        boxes, fused = _reference_boxes(cams, pair_frames.numpy(), thresholds.numpy(), config)
        fused = torch.from_numpy(fused)

    valid = boxes.valid.cpu().numpy()
    m, k = np.nonzero(valid)                # valid boxes come first in rank order, so k + 1 is the rank
    b_np, c_np = b.cpu().numpy(), c.cpu().numpy()
    xywh = boxes.xywh.cpu().numpy()[m, k]
    out = {
        "index": b_np[m], "finding": np.array(FINDINGS, dtype=object)[c_np[m]],
        "rank": (k + 1).astype(np.int8),
        "x": xywh[:, 0], "y": xywh[:, 1], "w": xywh[:, 2], "h": xywh[:, 3],
        "score": boxes.score.cpu().numpy()[m, k], "prob": prob.cpu().numpy()[b_np[m], c_np[m]],
        "threshold": boxes.threshold.cpu().numpy()[m, k],
    }
    if config.save_heatmaps:
        out["heatmaps"] = {"index": b_np, "finding": np.array(FINDINGS, dtype=object)[c_np],
                           "heatmap": (fused.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()}
    return out


@torch.inference_mode()
def mine_batch(model, images_uint8: torch.Tensor, labels, frames, config: MiningConfig,
               features=None) -> dict:
    """Mine one batch: uint8 `[B,1,S,S]`, labels `[B,14]` (None: unlabeled), frames `[B,2]` (width, height).

    Returns numpy columns, one entry per box: `index` (position in the batch), `finding`, `rank` (1 = best),
    `x, y, w, h` (original image frame), `score` (mean H_f in the box), `prob`, `threshold`; with
    `config.save_heatmaps`, also `heatmaps`: `{"index", "finding", "heatmap"}` (uint8 `[M,h,w]`, CAM grid).
    `features` overrides `model.forward_features` (e.g. a torch.compile'd one).
    """
    X, prob = _forward(model, images_uint8, config, features)
    return _mine_features(model, X, prob, labels, frames, config)


_INPUT_SIZES: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


def _trained_input_size(home: Home, row: dict, model: torch.nn.Module) -> int:
    """The input size the model of `row` (its `models` row) was trained at. Remembered per model object: a flow's
    worker mines many shards with one model."""
    if model not in _INPUT_SIZES:
        from pipeline.training.checkpoint import trained_input_size

        _INPUT_SIZES[model] = trained_input_size(home, row)
    return _INPUT_SIZES[model]


def _table(columns: dict, image_ids: list[str], run_id: str, model_id: str) -> pa.Table:
    n = len(columns["index"])
    data = {"run_id": [run_id] * n, "model_id": [model_id] * n,
            "image_id": [image_ids[i] for i in columns["index"]], "finding": list(columns["finding"])}
    data.update({name: columns[name] for name in _BOX_COLUMNS})
    data["method"] = ["am"] * n    # attention mining (detector runs write 'detector': pipeline/detector)
    return pa.Table.from_pydict(data, schema=SCHEMA)


def heatmaps_path_for(home: Home, run_id: str, image_ids) -> Path:
    """Default home of a shard's fused heatmaps: `data/mined_heatmaps/run_id=<run>/<digest of the ids>.npz`."""
    digest = hashlib.sha256("\0".join(image_ids).encode()).hexdigest()[:16]
    return home.data / "mined_heatmaps" / f"run_id={run_id}" / f"heatmaps-{digest}.npz"


def _save_heatmaps(path: Path, parts: list[dict]) -> None:
    """One `.npz` (image_id, finding, heatmap uint8 `[M,h,w]`), written atomically like the parts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_PINNED: dict[tuple, list[torch.Tensor]] = {}


def _take_pinned(shape: tuple) -> list[torch.Tensor]:
    """Three page-locked buffers of `shape`: the ones a finished shard of this process gave back, else new ones
    (page-locking ~100 MB takes tens of ms; a worker mines many shards). A shard holds them until it ends, so
    shards mined at once in one process never share them."""
    ring = _PINNED.pop(torch.Size(shape), None)
    return ring if ring is not None else [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(3)]


def mine_shard(home, model_id: str, image_ids, config: MiningConfig | dict | None, run_id: str,
               model=None, heatmaps_path: str | os.PathLike | None = None, index: CacheIndex | None = None,
               row: dict | None = None) -> pa.Table:
    """Mine `image_ids` with model `model_id` -> a `mined_boxes` table (`warehouse.db.PARQUET_TABLES`).

    Reads the cache in batches of `config.batch_size` (memory stays flat in the shard's size); rows come out
    in the cache's image order, batch by batch, whatever the overlap. `model`: an
    already loaded model (a flow loads it once per worker); else it is loaded on `config.device`. With
    `config.save_heatmaps`, the fused heatmaps go to `heatmaps_path` (default `heatmaps_path_for(...)`).
    What the warehouse holds may come read once by the caller, so that no connection is opened here: `index`, the
    images' `CacheIndex` at the size to mine at, and `row`, the model's `models` row.
    """
    home = home if isinstance(home, Home) else Home.resolve(home)
    if not isinstance(config, MiningConfig):
        config = MiningConfig.from_dict(config)
    from pipeline.training.checkpoint import load_model, model_row

    trained = None
    if model is None:
        model, meta = load_model(home, model_id, device=config.device, row=row)
        trained = int(meta["input_size"])
    size = index.size if index is not None else (
        config.input_size or trained or _trained_input_size(home, row or model_row(home, model_id), model))
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)   # a layout change only: same weights, same outputs
    features = torch.compile(model.forward_features) if config.compile else None

    dataset = CacheDataset(home, size=size, image_ids=list(image_ids), index=index)
    device = next(model.parameters()).device
    starts = range(0, len(dataset), config.batch_size)
    # On a GPU: three page-locked buffers, reused (batch i+1 is read while batch i is copied and batch i-1 still
    # post-processed), so the copy to the device overlaps and memory stays flat; boxes are made on a side stream
    # while the next batch's forward runs.
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True    # one input size: pick the fastest convolutions once
    pinned = _take_pinned((config.batch_size, 1, size, size)) if cuda else None
    # High priority: the boxes' many small kernels get SMs as soon as they are queued, instead of waiting behind
    # the next forward's convolutions (the host waits on them, and the host queues that next forward).
    side = torch.cuda.Stream(device, priority=-1) if cuda else None

    def fetch(i: int) -> dict:
        rows = np.arange(starts[i], min(starts[i] + config.batch_size, len(dataset)))
        return dataset.get_batch(rows, out=pinned[i % 3][:len(rows)] if cuda else None, verify=True)

    tables, heatmaps = [], []

    def finish(batch: dict, X: torch.Tensor, prob: torch.Tensor, ready) -> None:
        with torch.cuda.stream(side) if cuda else nullcontext():
            if cuda:
                side.wait_event(ready)
            mined = _mine_features(model, X, prob, None if config.unlabeled else batch["labels"],
                                   batch["frame"], config)
        tables.append(_table(mined, batch["image_id"], run_id, model_id))
        if config.save_heatmaps:
            hm = mined["heatmaps"]
            heatmaps.append({"image_id": np.array(batch["image_id"], dtype=object)[hm["index"]].astype(str),
                             "finding": hm["finding"].astype(str), "heatmap": hm["heatmap"]})

    # One batch read ahead in a thread (the device never waits for the cache; memory holds a few batches
    # whatever the shard's size), and batch i's forward queued before batch i-1's boxes are made.
    with ThreadPoolExecutor(max_workers=1) as reader, torch.inference_mode():
        pending = reader.submit(fetch, 0) if len(starts) else None
        previous = None
        for i in range(len(starts)):
            batch = pending.result()
            pending = reader.submit(fetch, i + 1) if i + 1 < len(starts) else None
            X, prob = _forward(model, batch["image"], config, features)
            ready = torch.cuda.current_stream(device).record_event() if cuda else None
            if previous is not None:
                finish(*previous)
            previous = (batch, X, prob, ready)
        if previous is not None:
            finish(*previous)
        if cuda:
            torch.cuda.current_stream(device).synchronize()
            _PINNED.setdefault(pinned[0].shape, pinned)   # back to the pool once the last copy is done
    if config.save_heatmaps and heatmaps:
        _save_heatmaps(Path(heatmaps_path or heatmaps_path_for(home, run_id, dataset.image_ids)), heatmaps)
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
