"""`harvest detector train|predict|evaluate`: a torchvision detector trained on one mining run's boxes
(pipeline/detector, issue #13), as Prefect flows like the other verbs.

- `train --run RUN`: the detector of a mining run (resumes after a kill; registered in `models`, stage
  'detector', parent = the run's classifier, the run in its config).
- `predict --model ID --split S`: its boxes on a split, as a run of `mined_boxes` with `method = 'detector'`
  (run id `detect-<split>-<digest>`, one Parquet part per shard, resumable like `harvest mine`); `harvest
  evaluate`, `harvest export` and `harvest sql` take it like any run.
- `evaluate --run DETECT_RUN`: detector vs the mining run's own boxes on held-out images with phantom truth:
  COCO AP30/AP50/mAP and the Wang/Cai Acc, per finding, with 95 % bootstrap intervals;
  `reports/<run>/detector-eval.{md,csv,json}`.

Prefect, torch and the pipeline are imported on first use (`flows._verbs`), so `harvest detector --help` is fast.
"""
from __future__ import annotations

import hashlib
import json
import re
import time

from flows._runtime import prefect_api
from flows._verbs import (create_markdown_artifact, create_table_artifact, flow, name_flow_run, recorded_run,
                          require_run, task)
from pipeline.base.home import Home
from pipeline.base.vocab import SPLITS

DEFAULT_SHARD_SIZE = 512


def detect_run_id(model_id: str, predict: dict, split: str) -> str:
    """Deterministic in (detector, predict settings, split): a rerun resumes the same run."""
    key = json.dumps([model_id, predict, split], sort_keys=True)
    return f"detect-{split}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# ---- train ---------------------------------------------------------------------------------------------

@task(name="detector-train")
def train_task(home: str, run_id: str, config: dict, resume: bool) -> str:
    from flows.train import forward_logs
    from prefect import get_run_logger
    from pipeline.detector.train import train_detector

    with forward_logs("pipeline.detector", get_run_logger()):
        return train_detector(home, run_id, config, resume=resume)


@flow(name="detector-train", log_prints=True)
def train_flow(home: str, run_id: str, config: dict | None = None, resume: bool = True) -> dict:
    from pipeline.detector.train import plan

    p = plan(home, run_id, config)
    params = {"mining_run": run_id, "config": p.config.to_dict(), "resume": resume}
    with recorded_run(home, "detector-train", params, model_id=p.model_id) as train_run:
        model_id = train_task(home, run_id, p.config.to_dict(), resume)
    summary = {"train_run": train_run, "model_id": model_id, "mining_run": run_id, "classifier": p.source.model_id,
               "images": len(p.targets.image_ids), "boxes": len(p.targets.boxes),
               "reviewed_images": len(p.targets.reviewed_images), "input_size": p.size, "amp": p.config.runtime.amp}
    create_table_artifact(key="detector-train-summary", table=[summary],
                          description=f"detector {model_id} trained on the boxes of {run_id}")
    return summary


# ---- predict -------------------------------------------------------------------------------------------

@task(name="detector-predict-shard", task_run_name="detector-predict-{shard:05d}")
def predict_shard(home: str, run_id: str, shard: int, image_ids: list[str], model_id: str, predict: dict,
                  amp: str, device: str) -> dict:
    from pipeline.config.detector import PredictSection
    from pipeline.detector.predict import load_detector, predict_table
    from pipeline.runs.parts import part_path, process_model, write_part

    home = Home.resolve(home)
    path = part_path(home, run_id, shard)
    if path.exists():
        return {"shard": shard, "images": len(image_ids), "rows": 0, "skipped": True}
    (model, meta), _ = process_model((str(home.root), model_id, device),
                                     lambda: load_detector(home, model_id, device))
    table = predict_table(home, model, meta, image_ids, run_id, PredictSection(**predict), amp)
    write_part(home, run_id, shard, table, image_ids)
    return {"shard": shard, "images": len(image_ids), "rows": table.num_rows, "skipped": False}


def predict_settings(home, model_id: str, config=None) -> tuple[dict, dict, dict]:
    """(the detector's models row, its stored config, predict settings: the stored `predict`, updated by
    `config`'s)."""
    from pipeline.config.detector import DetectorConfig, PredictSection
    from pipeline.training.checkpoint import model_row

    row = model_row(home, model_id)
    if row["stage"] != "detector":
        raise ValueError(f"model {model_id!r} is a {row['stage']} classifier, not a detector; train one with "
                         "`harvest detector train --run RUN`")
    stored = json.loads(row["config"]) if isinstance(row["config"], str) else row["config"]
    predict = dict(stored.get("predict") or {})
    if config is not None:
        predict.update(DetectorConfig.load(config).to_dict()["predict"] if not isinstance(config, dict)
                       else config.get("predict", {}))
    return row, stored, PredictSection(**predict).__dict__


@flow(name="detector-predict", log_prints=True)
def predict_flow(home: str, model: str, split: str = "test", shard_size: int = DEFAULT_SHARD_SIZE,
                 config=None, device: str = "auto") -> dict:
    from pipeline.base.amp import device_of, resolve_amp
    from pipeline.runs.parts import finished_parts, list_images, plan_shards, recorded_parts_run, run_dir

    t0 = time.perf_counter()
    home_ = Home.resolve(home)
    row, stored, predict = predict_settings(home_, model, config)
    dev = device_of(device)
    amp = resolve_amp(stored["runtime"]["amp"], dev)
    model_id = row["model_id"]
    run_id = detect_run_id(model_id, predict, split)
    images = list_images(home_, split)
    done = finished_parts(run_dir(home_, run_id))
    jobs = plan_shards(images, shard_size, done)
    params = {"detector": model_id, "mining_run": stored["mining_run"], "split": split, "predict": predict,
              "amp": amp, "shard_size": shard_size, "method": "detector"}
    # flow 'detect': evaluation draws no heatmaps for a detector run
    with recorded_parts_run(home_, "detect", params, model_id, run_id):
        name_flow_run(run_id)
        results = [predict_shard(str(home_.root), run_id, index, ids, model_id, predict, amp, str(dev))
                   for index, ids in jobs]
    summary = {"run_id": run_id, "detector": model_id, "split": split, "images": len(images),
               "shards_done_before": len(done), "shards_predicted": sum(not r["skipped"] for r in results),
               "rows": sum(r["rows"] for r in results), "amp": amp, "seconds": round(time.perf_counter() - t0, 1)}
    create_table_artifact(key=f"{run_id}-summary", table=[summary],
                          description=f"harvest detector predict {split} with {model_id}")
    return summary


# ---- evaluate ------------------------------------------------------------------------------------------

@flow(name="detector-evaluate", log_prints=True)
def evaluate_flow(home: str, run_id: str, baseline: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    from pipeline.detector.evaluate import evaluate_detector, markdown

    home_ = Home.resolve(home)
    params = {"detector_run": run_id, "baseline_run": baseline, "n_boot": n_boot, "seed": seed}
    with recorded_run(home_, "detector-evaluate", params) as eval_id:
        out = evaluate_detector(home_, run_id, baseline, n_boot=n_boot, seed=seed)
        folder = home_.reports / run_id
        folder.mkdir(parents=True, exist_ok=True)
        table = out.pop("table")
        md = (f"Detector run `{run_id}` (detector `{out['detector']}`) vs mining run `{out['baseline_run']}` on "
              f"{out['images']} held-out images with phantom truth ({out['excluded_training_images']} training "
              f"images excluded); 95 % bootstrap intervals over images ({n_boot} resamples, seed {seed}). "
              "Acc: Wang/Cai protocol `all/iou@truth`; AP: pycocotools.\n\n" + markdown(table))
        table.to_csv(folder / "detector-eval.csv", index=False)
        (folder / "detector-eval.md").write_text(md + "\n")
        (folder / "detector-eval.json").write_text(json.dumps({**out, "evaluation_id": eval_id}, indent=1) + "\n")
    create_markdown_artifact(key=re.sub(r"[^a-z0-9-]+", "-", f"detector-eval-{run_id}".lower()), markdown=md,
                             description=f"detector vs mined boxes, {run_id}")
    return {**out, "evaluation_id": eval_id, "markdown": md, "table": table, "report": str(folder)}


# ---- CLI -----------------------------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("detector", help="train a detector on a mining run's boxes, predict, compare on truth",
                       description="A torchvision Faster R-CNN trained on one mining run's boxes (pseudo-labels), "
                                   "its boxes written as a run of mined_boxes, and scored against the boxes it "
                                   "learned from on held-out phantom truth.")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = acts.add_parser("train", help="train the detector of a mining run (resumes after a kill)",
                        description="Train on the run's boxes (filters: boxes.ranks, min_score, findings) of its "
                                    "classifier's training images; register it in `models` (stage 'detector').")
    t.add_argument("--run", required=True, help="mining run id (see `harvest status`)")
    t.add_argument("--config", metavar="YAML", help="detector config (default: configs/detector.yaml's defaults, "
                                                   "pipeline/config/detector.py)")
    t.add_argument("--no-resume", dest="resume", action="store_false", help="retrain from scratch")
    t.set_defaults(func=_train)
    q = acts.add_parser("predict", help="write a detector's boxes on a split as a run of mined_boxes",
                        description="Detect on every image of a split; the boxes become a mined_boxes run "
                                    "(method 'detector') that evaluate, export and sql take like any run.")
    q.add_argument("--model", required=True, help="detector model id (`harvest detector train` prints it)")
    q.add_argument("--split", default="test", choices=(*SPLITS, "all"),
                   help="images to detect on (default test)")
    q.add_argument("--config", metavar="YAML", help="a detector config whose `predict` section overrides the "
                                                   "detector's own")
    q.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help=f"images per Parquet part (default {DEFAULT_SHARD_SIZE})")
    q.set_defaults(func=_predict)
    e = acts.add_parser("evaluate", help="detector vs mined boxes on held-out phantom truth (COCO AP, Acc, CIs)",
                        description="Score a detector run and its mining run on the same held-out images "
                                    "(never the detector's training images) against gt_boxes source 'truth'.")
    e.add_argument("--run", required=True, help="detector run id (`harvest detector predict` prints it)")
    e.add_argument("--baseline", help="run to compare with (default: the detector's mining run)")
    e.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.set_defaults(func=_evaluate)


def _print(summary: dict) -> None:
    width = max(map(len, summary))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in summary.items()))


def _train(args) -> int:
    from pipeline.config.detector import DetectorConfig

    config = DetectorConfig.load(args.config).to_dict()   # a bad config fails in one line, before Prefect
    home = str(Home.resolve(args.home).root)
    require_run(home, args.run, "detector train")
    with prefect_api(home):
        _print(train_flow(home, args.run, config, resume=args.resume))
    return 0


def _predict(args) -> int:
    home = str(Home.resolve(args.home).root)
    config = None
    if args.config:
        from pipeline.config.detector import DetectorConfig
        config = DetectorConfig.load(args.config).to_dict()
    predict_settings(home, args.model, config)   # no such detector: one line, before Prefect
    with prefect_api(home):
        _print(predict_flow(home, args.model, args.split, args.shard_size, config))
    return 0


def _evaluate(args) -> int:
    home = str(Home.resolve(args.home).root)
    require_run(home, args.run, "detector evaluate")
    with prefect_api(home):
        out = evaluate_flow(home, args.run, args.baseline, n_boot=args.bootstrap, seed=args.seed)
    print(out["markdown"])
    print(f"\nreport: {out['report']}/detector-eval.md")
    return 0
