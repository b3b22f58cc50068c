"""`harvest pretrain`: make starting weights (`model.init`) from a phantom of a seed reserved for pretraining.

phantom (under the home, once) -> ingest -> train (the config's stages; resumes after a kill) -> export the
final stage as a float16 weights file, with `<out>.json` beside it: what its model card states (data, seeds,
config, commit, hardware, wall time, validation AUROC per finding). Every step reuses what is done, so the
same command run again after a kill goes on where it stopped.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from flows._runtime import prefect_api
from pipeline.base.home import Home
from pipeline.config.harvest import check, input_size, load_sections

REPO = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The repository's commit, `+dirty` when the working tree differs; `unknown` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def card(home: Home, model_id: str, config: Path, source: Path, sha256: str, seconds: float) -> dict:
    """The facts of the weights' model card, from the warehouse's `models` rows and the phantom manifest."""
    from pipeline.base import amp
    from pipeline.config.train import load_config
    from pipeline.training.checkpoint import lineage

    stages = lineage(home, model_id)
    final = stages[-1]
    metrics = final["metrics"] if isinstance(final["metrics"], dict) else json.loads(final["metrics"] or "{}")
    manifest = json.loads((source / "phantom_manifest.json").read_text())
    return {"model_id": model_id, "sha256": sha256, "config": str(config.relative_to(REPO))
            if config.is_relative_to(REPO) else str(config), "commit": commit(),
            "hardware": amp.describe(amp.device_of(load_config(config).runtime.device)),
            "train_seconds": round(seconds, 1),
            "phantom": {k: manifest[k] for k in ("n", "seed", "size", "difficulty", "patients", "code_version")},
            "stages": [{"stage": r["stage"], "model_id": r["model_id"]} for r in stages],
            "validation": {k: metrics.get(k) for k in ("auroc", "auroc_mean", "auroc_boxed_mean", "loss")
                           if k in metrics}}


def _run(args) -> int:
    from flows.harvest import ensure_phantom, resolve_config
    from pipeline.phantom.seeds import require_pretrain_seed

    config = resolve_config(args.config)
    check(config)   # a bad config fails in one line, before any data or server
    require_pretrain_seed(load_sections(config)["phantom"]["seed"])
    home = Home.resolve(args.home).make()
    t0 = time.perf_counter()
    source = ensure_phantom(home, config)
    print(f"phantom data: {source} ({time.perf_counter() - t0:.0f} s)")
    from flows.ingest import ingest_flow
    from flows.train import train_flow
    from pipeline.ingest.common import ingest_lock
    with prefect_api(home.root):
        with ingest_lock(home):
            ingest_flow(str(home.root), "nih", str(source), sizes=[input_size(config)])
        t1 = time.perf_counter()
        model_id = train_flow(str(home.root), str(config))
    from pipeline.training.weights import export_weights
    out = Path(args.out)
    sha = export_weights(home, model_id, out)
    facts = card(home, model_id, config, source, sha, time.perf_counter() - t1)
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(facts, indent=2) + "\n")
    print(f"weights: {out} (sha256 {sha}); model card facts: {out}.json")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="make starting weights from a phantom of a seed reserved for pretraining",
                       description="Generate the config's phantom (its seed must be one reserved for "
                                   "pretraining), ingest it, train the config's stages and export the final "
                                   "stage as float16 weights for `model.init`, with the model card's facts "
                                   "in <out>.json. Run again after a kill: every step resumes.")
    p.add_argument("--config", default="configs/localize-pretrain.yaml", help="training config with a phantom section")
    p.add_argument("--out", default="models/weights/localize-resnet18-bilinear-256.pt", help="weights file to write")
    p.set_defaults(func=_run)
