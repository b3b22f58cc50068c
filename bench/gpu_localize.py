"""The localization procedure of issue #11, as steps of at most 10 minutes each on one GPU, resumable from the
home folder, chaining the library directly (the GPU host has no Prefect or Dask; see ../shared/device/).

    python bench/gpu_localize.py data  --home H --n 6000 --seed 0 --difficulty 0.5 --size 512
    python bench/gpu_localize.py train --home H --config configs/ablation-gpu.yaml --minutes 9 [--settings am3-kp]
    python bench/gpu_localize.py score --home H --config configs/ablation-gpu.yaml --out DIR [--settings all]
    python bench/gpu_localize.py all --quick        # the whole chain, tiny, on the CPU (< 1 min): the test of it

- `data`: a phantom (exact truth boxes) in the NIH layout, ingested into a cache at the model's input size.
- `train`: the settings' training configs (the paper's ablation: `pipeline.evaluation.ablation`), stage by stage; finished
  stages are reused, an unfinished one resumes from its last checkpoint (`runtime.save_every_steps`). It stops
  by itself at `--minutes` and exits 3 (`resume`); run it again.
- `score`: box thresholds chosen by `harvest tune`'s search on the headline model's **validation** truth; each
  setting's model mined on the test split (T as the setting says) and scored (`evaluate_run`: every protocol,
  MaxBoxAccV2); `all/iou@truth` Acc with 95 % bootstrap intervals over images; the localization diagnosis on
  validation images. Writes `acc.csv` (columns of docs/results/gpu-phantom-acc.csv), `eval_results.csv`,
  `diagnosis.csv`, `summary.md`. No evaluation box is looked at to choose anything.
Last line: `localize am3-kp mean acc@0.3: X`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.base.home import Home  # noqa: E402
from pipeline.base.vocab import BOXED_FINDINGS  # noqa: E402
from pipeline.evaluation.ablation import stage_model_id, training_config, variants  # noqa: E402
from pipeline.evaluation.bootstrap import acc_intervals  # noqa: E402
from pipeline.evaluation.references import cai_table3  # noqa: E402

# The settings of docs/results/gpu-phantom-acc.csv -> (group, setting) of pipeline.evaluation.ablation.variants()
SETTINGS = {"am3-kp": ("KP", "KP"), "am1": ("AM", "t=1"), "am2": ("AM", "t=2"), "am3-none": ("KP", "w/o KP"),
            "am3-vanilla": ("KP", "KP-Vanilla"), "neck-baseline": ("MSA", "baseline"),
            "neck-bilinear": ("MSA", "bilinear"), "neck-deconv": ("MSA", "deconv")}
HEADLINE = "am3-kp"
RESUME = 3   # exit code of a `train` step that ran out of time
QUICK_CONFIG = {   # ResNet-18 at 64 px, one short epoch per stage: the plumbing, not a result
    "name": "localize-quick", "seed": 0,
    "model": {"arch": "resnet18", "neck": "bilinear", "imagenet": False},
    "data": {"input_size": 64, "val_fraction": 0.25, "train_splits": ["train"], "am_splits": ["train"]},
    "runtime": {"device": "auto", "amp": "auto", "batch_size": 32, "eval_batch_size": 64, "workers": 0},
    "stages": {"base": {"epochs": 1, "lr": 0.01}, "msa_init": {"epochs": 1, "lr": 0.01, "freeze_backbone": True},
               "end_to_end": {"epochs": 1, "lr": 0.01}},
    "am": {"steps": 3, "mode": "kp", "stage": {"epochs": 1, "lr": 0.001}},
}


class TimeUp(Exception):
    pass


def chosen(settings: str) -> list[str]:
    names = list(SETTINGS) if settings == "all" else settings.split(",")
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)} or all")
    return names


def variant(setting: str):
    group, name = SETTINGS[setting]
    return next(v for v in variants() if (v.group, v.setting) == (group, name))


# ---- data ----------------------------------------------------------------------------------------------

def data(home: Home, n: int, seed: int, difficulty: float, size: int, workers: int | None) -> None:
    from pipeline.ingest.nih import ingest_nih
    from pipeline.phantom import generate
    source = home.root / "phantom"
    manifest = source / "phantom_manifest.json"
    if not manifest.exists():   # written last: a killed generation is redone
        t0 = time.perf_counter()
        generate(source, n=n, seed=seed, difficulty=difficulty, workers=workers, progress=False)
        print(f"phantom: {n} images, seed {seed}, difficulty {difficulty}: {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    summary = ingest_nih(home, source, sizes=(size,), workers=workers)   # incremental: a rerun adds nothing
    print(f"ingest at {size}: {summary.get('images')} images in {time.perf_counter() - t0:.0f} s")


# ---- train ---------------------------------------------------------------------------------------------

def config_file(home: Home, config, setting: str) -> Path:
    """The setting's training config, written under the home (what `score` and a rerun read back)."""
    cfg = training_config(config, variant(setting))
    path = home.reports / "localize" / "configs" / f"{setting}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(home: Home, config, settings: list[str], minutes: float) -> int:
    from pipeline.training.stages import train as train_stages
    deadline = time.monotonic() + 60 * minutes

    def on_step(model_id, epoch, step):
        if time.monotonic() > deadline:
            raise TimeUp(f"{model_id} epoch {epoch} step {step}")

    for setting in settings:
        t0 = time.perf_counter()
        try:
            model_id = train_stages(home, config_file(home, config, setting), on_step=on_step)
        except TimeUp as stop:
            print(f"train {setting}: out of time at {stop}; run the same command again to resume")
            return RESUME
        print(f"train {setting}: {model_id} ({time.perf_counter() - t0:.0f} s)")
    return 0


# ---- score ---------------------------------------------------------------------------------------------

def mine(home: Home, model_id: str, split: str, mining: dict, device: str) -> str:
    """Mine `split` with `model_id` into a recorded run (the parts of `harvest mine`, without Prefect)."""
    from pipeline.config.mining import MiningConfig
    from pipeline.mining import mine_shard
    from pipeline.runs.parts import finished_parts, list_images, mining_run_id, plan_shards, run_dir, write_part
    from pipeline.runs.record import finish_run, start_run
    from pipeline.training.checkpoint import load_model
    cfg = MiningConfig.from_dict({**mining, "device": device}).resolved(device)
    run_id = mining_run_id(model_id, cfg.config_hash(), split)
    ids = list_images(home, split)
    jobs = plan_shards(ids, 4096, finished_parts(run_dir(home, run_id)))
    start_run(home, "mine", {"model": model_id, "split": split, "config": cfg.to_dict(),
                             "config_hash": cfg.config_hash(), "by": "bench/gpu_localize.py"}, model_id, run_id)
    model = load_model(home, model_id, device=device)[0] if jobs else None
    for shard, shard_ids in jobs:
        write_part(home, run_id, shard, mine_shard(home, model_id, shard_ids, cfg, run_id, model=model), shard_ids)
    finish_run(home, run_id, "completed")
    return run_id


def thresholds(home: Home, model_id: str, candidates: int | None) -> tuple[float, ...]:
    """Box thresholds chosen on the model's validation truth (`harvest tune`'s search)."""
    from pipeline.evaluation.tune import CANDIDATES, tune_thresholds
    pool = CANDIDATES if not candidates else CANDIDATES[:: max(1, len(CANDIDATES) // candidates)]
    best, table = tune_thresholds(home, model_id, candidates=pool)
    print(f"thresholds on validation truth: {tuple(best)} (of {len(pool)} candidates; "
          f"val acc@0.3 {table.iloc[0, 1]:.3f})")
    return tuple(best)


def test_truth(home: Home) -> tuple[pd.DataFrame, list[str]]:
    """The exact truth of the test split (the evaluation images) and their ids."""
    from warehouse import db
    con = db.connect(home, read_only=True)
    try:
        gt = con.execute("SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE source = 'truth' AND image_id IN "
                         "(SELECT image_id FROM images WHERE split = 'test') ORDER BY ALL").df()
    finally:
        con.close()
    return gt, sorted(set(gt["image_id"]))


def run_boxes(home: Home, run_id: str) -> pd.DataFrame:
    from warehouse import db
    con = db.connect(home, read_only=True)
    try:
        return con.execute("SELECT image_id, finding, rank, x, y, w, h, score FROM mined_boxes WHERE run_id = ?",
                           [run_id]).df()
    finally:
        con.close()


def score(home: Home, config, settings: list[str], out: Path, recipe: str, device: str, n_boot: int,
          candidates: int | None) -> pd.DataFrame:
    from pipeline.config.harvest import load_sections
    from pipeline.evaluation.diagnose import diagnose
    from pipeline.evaluation.run import evaluate_run
    out.mkdir(parents=True, exist_ok=True)
    spec = load_sections(config)
    phantom = json.loads((home.root / "phantom" / "phantom_manifest.json").read_text())
    mining = {k: v for k, v in spec["mining"].items() if k not in ("split", "shard_size", "device")}
    ids = {s: stage_model_id(yaml.safe_load(config_file(home, config, s).read_text()), variant(s).stage, home)
           for s in settings}
    head = ids.get(HEADLINE, next(iter(ids.values())))
    mining["thresholds"] = list(thresholds(home, head, candidates))
    gt, image_ids = test_truth(home)
    rows, results = [], []
    for s in settings:
        t0 = time.perf_counter()
        run_id = mine(home, ids[s], "test", {**mining, "steps": variant(s).steps}, device)
        results.append(evaluate_run(home, run_id, report=(s == HEADLINE), device=device)["results"].assign(setting=s))
        ci = acc_intervals(run_boxes(home, run_id), gt, image_ids, BOXED_FINDINGS, n_boot=n_boot)
        rows.append(ci.assign(recipe=recipe, setting=s, phantom_seed=phantom.get("seed"),
                              difficulty=phantom.get("difficulty"), protocol="all/iou@truth"))
        print(f"score {s}: model {ids[s]}, run {run_id} ({time.perf_counter() - t0:.0f} s)")
    acc = pd.concat(rows, ignore_index=True)[["recipe", "setting", "phantom_seed", "difficulty", "protocol",
                                              "finding", "t", "acc", "lo", "hi", "n_gt"]]
    acc.to_csv(out / "acc.csv", index=False)
    pd.concat(results, ignore_index=True).to_csv(out / "eval_results.csv", index=False)
    diagnose(home, head, split="val", device=device).to_csv(out / "diagnosis.csv", index=False)
    (out / "summary.md").write_text(summary(acc, head, mining["thresholds"]))
    print((out / "summary.md").read_text())
    return acc


def summary(acc: pd.DataFrame, model_id: str, thresholds) -> str:
    """The #11 target: Acc at T(IoU)=0.3 (`all/iou@truth`) against Cai's Table 3 (KP, t=3), per finding."""
    cai = cai_table3()
    cai = cai[(cai["setting"] == "KP") & (cai["t_iou"].round(2) == 0.3)].set_index("finding")["acc"]
    lines = [f"# Localization, model {model_id}, thresholds {tuple(thresholds)}", "",
             "| setting | " + " | ".join(BOXED_FINDINGS) + " | mean | >= Cai |", "|---|" + "---:|" * 10]
    cai = cai.reindex(BOXED_FINDINGS)
    for s, g in acc[acc["t"].round(2) == 0.3].groupby("setting", sort=False):
        g = g.set_index("finding").reindex(BOXED_FINDINGS)
        cells = [f"{a:.2f} [{lo:.2f}, {hi:.2f}]" for a, lo, hi in zip(g["acc"], g["lo"], g["hi"])]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {np.nanmean(g['acc']):.3f} | "
                     f"{int((g['acc'] >= cai).sum())}/8 |")
    lines += ["", "| Cai 2018 (NIH, KP, t=3) | " + " | ".join(f"{cai[f]:.2f}" for f in BOXED_FINDINGS)
              + f" | {cai.mean():.3f} | |", "",
              "Target (#11): at or above Cai on 6 of 8 findings and a mean of at least 0.43.", ""]
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["data", "train", "score", "all"])
    p.add_argument("--home", default=None)
    p.add_argument("--config", default=str(ROOT / "configs" / "ablation-gpu.yaml"))
    p.add_argument("--settings", default="all", help=f"comma-separated of {list(SETTINGS)}, or all")
    p.add_argument("--n", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=float, default=0.5)
    p.add_argument("--size", type=int, default=None, help="cache size (default: the config's input size)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--minutes", type=float, default=9.0, help="train: stop after this long (exit 3: resume)")
    p.add_argument("--out", default=None)
    p.add_argument("--recipe", default=None, help="recipe name in acc.csv (default: the config's name)")
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--candidates", type=int, default=None, help="threshold candidates to try (default all 84)")
    p.add_argument("--quick", action="store_true", help="all steps, tiny, on the CPU: a phantom of 120 images")
    args = p.parse_args(argv)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="localize-quick-"))
        config = tmp / "quick.yaml"
        base = yaml.safe_load(Path(args.config).read_text())
        mining = {k: v for k, v in base.get("mining", {}).items() if k != "input_size"}   # the quick cache's size
        config.write_text(yaml.safe_dump({**QUICK_CONFIG, "mining": {**mining, "batch_size": 32}}))
        args.home, args.n, args.size, args.n_boot, args.candidates = args.home or tmp / "home", 120, 64, 100, 4
        args.settings, args.out, args.step = "am3-kp,am1", args.out or tmp / "out", "all"
    else:
        config = Path(args.config)
    from pipeline.config.harvest import input_size
    home = Home.resolve(args.home).make()
    settings = chosen(args.settings)
    t0 = time.perf_counter()
    if args.step in ("data", "all"):
        data(home, args.n, args.seed, args.difficulty, args.size or input_size(config), args.workers)
    if args.step in ("train", "all"):
        code = train(home, config, settings, args.minutes)
        if code:
            return code
    if args.step in ("score", "all"):
        recipe = args.recipe or yaml.safe_load(config.read_text()).get("name", config.stem)
        acc = score(home, config, settings, Path(args.out or home.reports / "localize"), recipe, device,
                    args.n_boot, args.candidates)
        head = acc[(acc["setting"] == (HEADLINE if HEADLINE in settings else settings[0]))
                   & (acc["t"].round(2) == 0.3)]
        print(f"{args.step} took {time.perf_counter() - t0:.0f} s")
        print(f"localize {head['setting'].iloc[0]} mean acc@0.3: {head['acc'].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
