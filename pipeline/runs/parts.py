"""Mining runs on disk, without Prefect (docs/design.md#flows): run ids, part paths, what parts cover, the
shard plan and the atomic part write. `flows.mine` runs them as Prefect tasks on Dask; `flows.detector` writes
detector runs the same way; a bare script (the GPU procedure) can call them directly.

A run's parts live at `data/mined_boxes/run_id=<run_id>/part-<shard:05d>.parquet`; each carries the image ids
it covers in its Parquet metadata (`IMAGE_IDS_KEY`), boxed or not, so a rerun mines only what is missing and
exports list the run's negatives, and has its sha256 beside it (`<part>.sha256`, `harvest check` verifies it).
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.base.files import record_sha256
from pipeline.base.home import Home
from pipeline.base.vocab import SPLITS as IMAGE_SPLITS
from pipeline.runs.record import recorded_run
from warehouse import db

SPLITS = (*IMAGE_SPLITS, "all")
IMAGE_IDS_KEY = b"cxr_harvest.image_ids"   # Parquet key-value metadata: the images a part covers


def mining_run_id(model_id: str, config_hash: str, split: str) -> str:
    """Deterministic in (model, mining config, split): a rerun of the same mining resumes the same run."""
    digest = hashlib.sha256(f"{model_id}\0{config_hash}\0{split}".encode()).hexdigest()[:12]
    return f"mine-{split}-{digest}"


def run_dir(home: Home, run_id: str) -> Path:
    return home.data / "mined_boxes" / f"run_id={run_id}"


def part_path(home: Home, run_id: str, shard: int) -> Path:
    return run_dir(home, run_id) / f"part-{shard:05d}.parquet"


def finished_parts(folder: Path) -> dict[int, list[str]]:
    """Shard index -> image ids covered, from the parts already on disk (temp files are not `*.parquet`)."""
    done = {}
    for path in sorted(folder.glob("part-*.parquet")):
        try:
            meta = pq.read_schema(path).metadata or {}
        except (pa.ArrowException, OSError) as exc:   # a damaged footer: one line naming the part
            raise ValueError(f"Parquet part {path} is damaged ({exc}); run `harvest check --repair`") from None
        done[int(path.stem.split("-")[1])] = json.loads(meta.get(IMAGE_IDS_KEY, b"[]"))
    return done


def plan_shards(image_ids: list[str], shard_size: int, done: dict[int, list[str]]) -> list[tuple[int, list[str]]]:
    """Shards still to mine, as (index, image ids).

    Shard i is images[i*size:(i+1)*size] of the sorted ids; it is skipped when its images are covered by
    existing parts. Images whose shard index is taken by a part covering other images (the image list or the
    shard size changed since that part was written) go to new indices after the last one, so a rerun never
    duplicates or drops an image whatever changed.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    ids = sorted(set(image_ids))
    covered = {i for part in done.values() for i in part}
    jobs, moved = [], []
    for index in range(0, (len(ids) + shard_size - 1) // shard_size):
        todo = [i for i in ids[index * shard_size:(index + 1) * shard_size] if i not in covered]
        if todo and index in done:
            moved.extend(todo)
        elif todo:
            jobs.append((index, todo))
    start = max([*done, *(j for j, _ in jobs), -1]) + 1
    jobs += [(start + k, moved[k * shard_size:(k + 1) * shard_size])
             for k in range((len(moved) + shard_size - 1) // shard_size)]
    return jobs


def list_images(home: Home, split: str, con=None) -> list[str]:
    """The ids of the images of `split` ("all": every image), sorted; read on `con`, else a connection of its own."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with db.reading(home, con) as con:
        sql = "SELECT image_id FROM images" + ("" if split == "all" else " WHERE split = ?")
        return sorted(r[0] for r in con.execute(sql, [] if split == "all" else [split]).fetchall())


def write_part(home: Home, run_id: str, shard: int, table: pa.Table, image_ids: list[str]) -> Path:
    """Write shard `shard` of `run_id` atomically, recording the images it covers, and its sha256 beside it
    (`part-<shard>.parquet.sha256`, written before the part is renamed into place: `record_sha256`)."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), IMAGE_IDS_KEY: json.dumps(image_ids)})
    path = part_path(home, run_id, shard)
    return db.write_parquet_atomic(table, path, before_commit=lambda tmp: record_sha256(tmp, path))


def mined_image_ids(home: Home, run_id: str) -> list[str]:
    """Every image the run's parts cover, boxed or not."""
    return [i for ids in finished_parts(run_dir(home, run_id)).values() for i in ids]


@contextmanager
def recorded_parts_run(home: Home, flow: str, params: dict, model_id: str, run_id: str):
    """`pipeline.runs.record.recorded_run` under the run's own id (its parts' folder); once every part is written, the
    temporary files of writers killed mid-write are removed before the run is marked completed."""
    with recorded_run(home, flow, params, model_id, run_id):
        yield run_id
        for tmp in run_dir(home, run_id).glob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)


_MODEL: dict = {}   # per process: one model, by key


def process_model(key: tuple, load: Callable[[], object]) -> tuple[object, bool]:
    """-> (the model of `key`, loaded now). Loaded once per process (a Dask worker mines many shards), and one
    kept at a time: bounded memory across runs on a long-lived cluster."""
    if key in _MODEL:
        return _MODEL[key], False
    _MODEL.clear()
    _MODEL[key] = load()
    return _MODEL[key], True
