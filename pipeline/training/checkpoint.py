"""Checkpoints: atomic files that load with `torch.load(weights_only=True)`, registered in `models`.

A checkpoint is a dict of tensors and plain values only (no pickled classes):
    model, optimizer, scheduler      state dicts (optimizer/scheduler None in a stage's final file)
    epoch, step                      epochs completed; steps done inside the current epoch (mid-epoch saves)
    trainer                          early-stopping state and per-epoch history
    meta                             model_id, parent_id, stage, arch, neck, num_classes, input_size,
                                     normalization, vocabulary, config (resolved, plain dict), fingerprint,
                                     metrics
Each stage directory `checkpoints/<model_id>/` holds `last.pt` (resume state, rewritten as training goes)
and `final.pt` (the stage's result; its sha256 is recorded in the warehouse `models` table).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from models import create_model
from pipeline.base.files import checksum_path, matches_record, record_sha256, sha256_file
from pipeline.base.home import Home
from pipeline.base.vocab import FINDINGS
from pipeline.images.dataset import NORM_MEAN, NORM_STD
from pipeline.runs.record import writer
from warehouse import db

log = logging.getLogger("pipeline.training")
FORMAT = "cxr-harvest/checkpoint-v1"
LAST, FINAL = "last.pt", "final.pt"


def model_meta(**fields) -> dict:
    """The metadata every checkpoint carries (timm-style: weight metadata is data)."""
    return {"normalization": {"mean": NORM_MEAN, "std": NORM_STD, "scale": 255.0},
            "vocabulary": list(FINDINGS), **fields}


def save_checkpoint(state: dict, path: str | os.PathLike) -> str:
    """Write `state` atomically (temp file in the same folder, fsync, rename) with its sha256 recorded beside it
    (`<name>.sha256`, before the rename); returns the sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        sha256 = record_sha256(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256


def load_checkpoint(path: str | os.PathLike, device="cpu", verify: bool = True) -> dict:
    """Safe load (weights_only=True); raises with the cause when the file is not one of ours, or (`verify`)
    does not match the sha256 recorded beside it (files from before the records load unchecked)."""
    if verify and matches_record(path) is False:
        raise ValueError(f"checkpoint {path} does not match its recorded sha256 ({checksum_path(path).name}): "
                         "it was modified or truncated")
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cxr-harvest checkpoint (expected format {FORMAT!r})")
    return state


@dataclass
class Resumable:
    """The resume-or-reuse protocol of one trained model (a classifier stage, the detector) in its folder
    `checkpoints/<model_id>/`: a `final.pt` of the same fingerprint is reused, a `last.pt` of the same
    fingerprint is resumed, anything else starts over. Only the `main` process writes (DDP ranks share the
    folder); the caller synchronizes its ranks."""
    home: Home
    model_id: str
    fingerprint: str
    resume: bool = True
    main: bool = True

    @property
    def folder(self) -> Path:
        return self.home.checkpoints / self.model_id

    def _matching(self, name: str) -> dict | None:
        """The state in `name` when it has our fingerprint. A file that does not load, or a `final.pt` whose
        sha256 is not the one `models` records, counts as absent, with a one-line warning: the stage trains
        again (from a readable `last.pt` when there is one)."""
        path = self.folder / name
        if not (self.resume and path.exists()):
            return None
        try:
            state = load_checkpoint(path)
            if name == FINAL:
                check_recorded(self.home, self.model_id, path)
        except Exception as exc:   # truncated, bit-flipped, not ours: whatever torch.load raises
            log.warning("checkpoint %s is unreadable (%s): training stage %s again", path,
                        " ".join(str(exc).split())[:300], self.model_id)
            return None
        return state if state["meta"].get("fingerprint") == self.fingerprint else None

    def finished(self) -> dict | None:
        """The meta of a finished `final.pt`, registered again (idempotent: heals a kill between save and
        register); None when there is none to reuse."""
        state = self._matching(FINAL)
        if state is None:
            return None
        if self.main:
            register_model(self.home, state["meta"], self.folder / FINAL)
        return state["meta"]

    def restore(self, model, optimizer, scheduler) -> dict | None:
        """Load a matching `last.pt` into the model, optimizer and scheduler; its state (`epoch`, `step`,
        `trainer`, ...) or None when training starts over."""
        state = self._matching(LAST)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        return state

    def save_last(self, model, optimizer, scheduler, epoch: int, step: int, trainer: dict, meta: dict,
                  **extra) -> None:
        """The resume state after `epoch` epochs and `step` steps of the next."""
        if self.main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                             "trainer": trainer, **extra, "meta": meta}, self.folder / LAST)

    def save_final(self, model, epoch: int, trainer: dict, meta: dict) -> None:
        """Write `final.pt` and register it in `models`."""
        if self.main:
            path = self.folder / FINAL
            sha = save_checkpoint({"model": model.state_dict(), "optimizer": None, "scheduler": None,
                                   "epoch": epoch, "step": 0, "trainer": trainer, "meta": meta}, path)
            register_model(self.home, meta, path, sha)


def check_recorded(home: Home, model_id: str, path: Path) -> None:
    """ValueError unless `path` has the sha256 that `models` records for `model_id` (no row: nothing to check,
    e.g. a kill between the checkpoint's write and its registration)."""
    con = db.connect(home, read_only=True)
    try:
        row = con.execute("SELECT checkpoint_sha256 FROM models WHERE model_id = ?", [model_id]).fetchone()
    finally:
        con.close()
    if row and row[0] != sha256_file(path):
        raise ValueError(f"its sha256 is not the one recorded for model {model_id}")


def register_model(home, meta: dict, checkpoint: str | os.PathLike, sha256: str | None = None) -> str:
    """Insert (or replace) the `models` row for a stage's final checkpoint; returns model_id.

    A row already holding this checkpoint (same sha256) is left as is, so reruns keep `created_at`.
    """
    home = Home.resolve(home) if not isinstance(home, Home) else home
    checkpoint = Path(checkpoint)
    rel = checkpoint.resolve().relative_to(home.root).as_posix()
    sha256 = sha256 or sha256_file(checkpoint)
    con = writer(home)
    try:
        known = con.execute("SELECT checkpoint_sha256 FROM models WHERE model_id = ?", [meta["model_id"]]).fetchone()
        if known and known[0] == sha256:
            return meta["model_id"]
        with db.transaction(con):
            con.execute("DELETE FROM models WHERE model_id = ?", [meta["model_id"]])
            con.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                meta["model_id"], meta.get("parent_id"), meta["stage"], meta["arch"], meta["neck"],
                json.dumps(meta.get("config")), rel, sha256, json.dumps(json_safe(meta.get("metrics"))),
                datetime.now(timezone.utc).replace(tzinfo=None)])
    finally:
        con.close()
    return meta["model_id"]


def json_safe(obj):
    """NaN/inf -> None, recursively: the warehouse's JSON columns accept standard JSON only."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def model_row(home, model_id: str = "latest", con=None) -> dict:
    """The `models` row of `model_id` ("latest": the most recently created classifier, not a detector) as a dict,
    read on `con`, else on a read-only connection of its own."""
    home = Home.resolve(home)
    with db.reading(home, con) as con:
        query = "SELECT * FROM models " + ("WHERE stage <> 'detector' ORDER BY created_at DESC LIMIT 1"
                                           if model_id == "latest"
                                           else "WHERE model_id = ?")
        cur = con.execute(query, [] if model_id == "latest" else [model_id])
        row, cols = cur.fetchone(), [d[0] for d in cur.description]
    if row is None:
        raise KeyError(f"no model {model_id!r} in {home.warehouse}; run `harvest train --config ...` first")
    return dict(zip(cols, row))


def load_model(home, model_id: str = "latest", device="cpu", row: dict | None = None):
    """-> (model in eval mode on `device`, meta). Verifies the checkpoint's sha256 against the warehouse's, from
    `row` (its `models` row, read once by the caller) when given, else read now."""
    home = Home.resolve(home)
    row = row or model_row(home, model_id)
    path = home.root / row["checkpoint"]
    if sha256_file(path) != row["checkpoint_sha256"]:
        raise ValueError(f"checkpoint {path} does not match the sha256 recorded for model {row['model_id']}; "
                         "it was modified or truncated: retrain with `harvest train` (finished stages are reused)")
    state = load_checkpoint(path, device="cpu", verify=False)   # checked against `models` above
    meta = state["meta"]
    model = create_model(meta["arch"], meta["neck"], meta["num_classes"], pool_top=pool_top_of(meta))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta


def pool_top_of(meta: dict) -> float:
    """The head pooling a checkpoint was trained with (its config's `model.pool_top`; GAP before the option)."""
    return float(((meta.get("config") or {}).get("model") or {}).get("pool_top", 1.0))


def trained_input_size(home, row: dict) -> int:
    """The input size the model of `row` was trained at, from its checkpoint's meta (memory-mapped: the weights
    are not read)."""
    path = Home.resolve(home).root / row["checkpoint"]
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"]["input_size"])


def lineage(home, model_id: str, con=None) -> list[dict]:
    """The `models` rows from the first stage to `model_id`, following parent_id, read on one connection (`con`,
    else a read-only one of its own)."""
    rows = []
    with db.reading(Home.resolve(home), con) as con:
        while model_id:
            rows.append(model_row(home, model_id, con))
            model_id = rows[-1]["parent_id"]
    return rows[::-1]
