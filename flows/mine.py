"""`harvest mine`: mine boxes for a split, one Prefect task per shard on Dask (docs/design.md#flows).

Each shard is a task run on prefect-dask's DaskTaskRunner: a LocalCluster sized to the devices, or the
scheduler at `--dask-address`. The flow reads the warehouse once (the model's row, the images, their cache
index) and hands each task its part, so workers never open it. A task loads the model once per worker process, calls
`pipeline.mining.mine_shard` and writes one Parquet part atomically to
`data/mined_boxes/run_id=<run_id>/part-<shard:05d>.parquet`. The run id is a function of (model, mining
config, split), so a rerun finds the parts of the killed run and mines only what they do not cover: no
duplicate, no hole. A worker lost mid-shard costs a retry: Dask reschedules the task on another worker, and
the task skips its part if the lost attempt had already written it.
"""
from __future__ import annotations

import os
import re
import time

import duckdb
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.settings import PREFECT_API_URL
from tqdm.auto import tqdm

from flows._runtime import add_dask_address, dask_task_runner, prefect_api, worker_device
from flows._verbs import name_flow_run
from pipeline.base.home import Home
from pipeline.runs.parts import (SPLITS, finished_parts, list_images, mining_run_id, part_path, plan_shards,
                                 process_model, recorded_parts_run, run_dir, write_part)
from warehouse import db

DEFAULT_SHARD_SIZE = 2048


def mining_config(config=None):
    """None -> defaults; a dict (e.g. from YAML or a deployment parameter) or a MiningConfig.

    amp `auto` is decided here, for the device this machine's workers use (for a remote cluster of other
    hardware, set amp explicitly), so the run id, the config hash and the run record name the precision used.
    """
    from pipeline.config.mining import MiningConfig

    config = config if isinstance(config, MiningConfig) else MiningConfig.from_dict(config)
    return config.resolved(worker_device())


# ---- the task: thin, one pipeline call plus the atomic write -------------------------------------------

@task(name="mine-shard", task_run_name="mine-shard-{shard:05d}", retries=2, retry_delay_seconds=1,
      cache_policy=NO_CACHE, persist_result=False)
def mine_shard_task(home: str, run_id: str, shard: int, image_ids: list[str], row: dict, index, config) -> dict:
    """Mine one shard into its part. A part already present (written by an attempt on a lost worker, or by
    the killed run) is final: parts are written whole or not at all. The flow read the warehouse for it (`row`:
    the model's `models` row; `index`: the images' `CacheIndex`), so a worker opens no connection."""
    from pipeline.mining import mine_shard
    from pipeline.training.checkpoint import load_model

    home = Home.resolve(home)
    path = part_path(home, run_id, shard)
    out = {"shard": shard, "images": len(image_ids), "pid": os.getpid(), "loaded_model": False, "device": None}
    if path.exists():
        return {**out, "rows": pq.read_metadata(path).num_rows, "seconds": 0.0, "skipped": True}
    t0 = time.perf_counter()
    # keyed by checkpoint sha, so a retrained id never goes stale
    model_id = row["model_id"]
    model, out["loaded_model"] = process_model(
        (str(home.root), model_id, row["checkpoint_sha256"]),
        lambda: load_model(home, model_id, device=worker_device(), row=row)[0])
    out["device"] = str(next(model.parameters()).device)
    table = mine_shard(home, model_id, image_ids, config, run_id, model=model, index=index, row=row)
    write_part(home, run_id, shard, table, image_ids)
    return {**out, "rows": table.num_rows, "seconds": round(time.perf_counter() - t0, 3), "skipped": False}


# ---- the flow ------------------------------------------------------------------------------------------

@flow(name="mine")
def mine_flow(home: str | None = None, model: str = "latest", split: str = "train",
              shard_size: int = DEFAULT_SHARD_SIZE, dask_address: str | None = None, config=None,
              run_id: str | None = None, n_workers: int | None = None) -> dict:
    """Mine every image of `split` ("all": every image) with `model` (an id or "latest"); returns a summary.

    `dask_address`: an existing scheduler (tcp://host:8786); default a LocalCluster sized to the devices
    (`n_workers` overrides its size). Rerunning with the same model, config and split resumes.
    """
    from pipeline.images.dataset import CacheIndex
    from pipeline.training.checkpoint import model_row, trained_input_size

    t0 = time.perf_counter()
    home = Home.resolve(home)
    cfg = mining_config(config)
    with db.reading(home) as con:   # everything the shards need, read once: their workers open no connection
        row = model_row(home, model, con)
        model_id = row["model_id"]
        run_id = run_id or mining_run_id(model_id, cfg.config_hash(), split)
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", run_id):   # a folder name and a Prefect artifact key
            raise ValueError(f"run_id {run_id!r}: use lowercase letters, digits and dashes")
        image_ids = list_images(home, split, con)
        done = finished_parts(run_dir(home, run_id))
        jobs = plan_shards(image_ids, shard_size, done)
        index = CacheIndex.read(con, cfg.input_size or trained_input_size(home, row),
                                image_ids=[i for _, ids in jobs for i in ids]) if jobs else None
    params = {"model": model, "split": split, "shard_size": shard_size, "dask_address": dask_address,
              "config": cfg.to_dict(), "config_hash": cfg.config_hash()}
    with recorded_parts_run(home, "mine", params, model_id, run_id):   # a writable connect refreshes the views
        name_flow_run(run_id)
        if dask_address and not PREFECT_API_URL.value():
            get_run_logger().warning("no PREFECT_API_URL: each worker of %s starts a Prefect server of its own; "
                                     "use `harvest mine` or set PREFECT_API_URL", dask_address)
        progress = create_progress_artifact(0.0 if jobs else 100.0, key=f"{run_id}-progress",
                                            description=f"mining {len(image_ids)} {split} images with {model_id}")
        results, failures = [], []
        if jobs:
            with dask_task_runner(dask_address, n_workers, _api_url()) as runner:
                futures = [runner.submit(mine_shard_task, dict(
                    home=str(home.root), run_id=run_id, shard=shard, image_ids=ids, row=row,
                    index=index.subset(ids, strict=False), config=cfg)) for shard, ids in jobs]
                bar = tqdm(as_completed(futures), total=len(futures), unit="shard", desc=f"mine {run_id}")
                for fut in bar:
                    try:   # one failed shard must not stop the others: their parts make the rerun shorter
                        results.append(fut.result())
                    except Exception as exc:
                        failures.append(exc)
                    update_progress_artifact(progress, 100.0 * (len(results) + len(failures)) / len(futures))
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(jobs)} shard(s) of {run_id} failed (first: "
                               f"{failures[0]!r}); rerun the same command to mine only what is missing")
    summary = _summary(home, run_id, model_id, split, image_ids, done, results, time.perf_counter() - t0)
    create_table_artifact([summary], key=f"{run_id}-summary", description=f"harvest mine {split} with {model_id}")
    get_run_logger().info("mined %s", ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


def _api_url() -> str:
    """The API this flow run reports to (also an ephemeral server's), for the workers of a LocalCluster."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def _summary(home: Home, run_id, model_id, split, image_ids, done, results, seconds) -> dict:
    mined = [r for r in results if not r["skipped"]]
    parts = [str(p) for p in sorted(run_dir(home, run_id).glob("*.parquet"))]
    rows, images_with_boxes = 0, 0
    if parts:   # this run's parts only: another run's damaged part does not stop this one
        with duckdb.connect() as con:
            rows, images_with_boxes = con.execute(
                "SELECT count(*), count(DISTINCT image_id) FROM read_parquet(?)", [parts]).fetchone()
    return {"run_id": run_id, "model_id": model_id, "split": split, "images": len(image_ids),
            "shards_total": len(finished_parts(run_dir(home, run_id))),
            "shards_mined": len(mined), "shards_skipped": len(done) + len(results) - len(mined),
            "images_mined": sum(r["images"] for r in mined), "model_loads": sum(r["loaded_model"] for r in mined),
            "devices": ",".join(sorted({r["device"] for r in mined})) or None,
            "rows": rows, "images_with_boxes": images_with_boxes,
            "seconds": round(seconds, 2),
            "images_per_s": round(sum(r["images"] for r in mined) / seconds, 2) if seconds > 0 else None}


# ---- CLI -------------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mine", help="mine boxes with a trained model, sharded on Dask",
        description="Mine ranked boxes (eq. 7-8, sec. 3.2) for every image of a split into "
                    "data/mined_boxes/run_id=<run>/. Rerunning the same command resumes a killed run.")
    p.add_argument("--model", default="latest", help="model id from the `models` table, or 'latest' (default)")
    p.add_argument("--split", default="train", choices=SPLITS, help="images to mine ('all': every image)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help=f"images per shard, one Prefect task and one Parquet part each (default {DEFAULT_SHARD_SIZE})")
    add_dask_address(p)
    p.add_argument("--workers", type=int, metavar="N", help="LocalCluster size (default: sized to the devices)")
    p.add_argument("--config", metavar="YAML", help="MiningConfig file (steps, thresholds, batch_size, ...); "
                                                    "default: the built-in defaults")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run the flow against $PREFECT_API_URL, or a loopback Prefect server shared with the Dask workers."""
    from pipeline.config.mining import MiningConfig

    config = MiningConfig.from_yaml(args.config) if args.config else None   # checked before torch loads
    from pipeline.training.checkpoint import model_row
    home = str(Home.resolve(getattr(args, "home", None)).root)
    model_row(home, args.model)   # fail fast (bad config, no model, no warehouse) before a server starts
    with prefect_api(home):
        summary = mine_flow(home=home, model=args.model, split=args.split, shard_size=args.shard_size,
                            dask_address=args.dask_address, config=config, n_workers=args.workers)
    width = max(map(len, summary))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in summary.items()))
    return 0
