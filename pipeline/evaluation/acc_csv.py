"""The phantom Acc table (docs/results/phantom-acc.csv): one row per recipe, setting, phantom, protocol, finding
and T, each Acc with its 95 % bootstrap interval over images and its number of truth boxes.

- `all/iou@truth` and `all/iobb@truth`: the mode `all` Acc of every truth instance on every mined image, with
  intervals from `pipeline.evaluation.bootstrap` (images resampled with replacement, seeded).
- `bounded/iou@truth` (Wang's AFP budget ranks boxes across images, so an image resample is not a reweighting)
  and `maxboxacc/val` come from `eval_results` as points: `lo` and `hi` stay empty.
Rows of the same (recipe, setting, phantom_seed, difficulty) replace the old ones when a run is written again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from pipeline.base.vocab import BOXED_FINDINGS
from pipeline.evaluation.bootstrap import acc_intervals
from pipeline.evaluation.protocol import THRESHOLDS

COLUMNS = ["recipe", "setting", "phantom_seed", "difficulty", "protocol", "finding", "t", "acc", "lo", "hi",
           "n_gt", "hardware"]
KEY = ["recipe", "setting", "phantom_seed", "difficulty"]
NUMERIC = ["difficulty", "t", "acc", "lo", "hi"]
INTERVALS = {"all/iou@truth": "iou", "all/iobb@truth": "iobb"}
POINTS = {"bounded/iou@truth": "acc", "maxboxacc/val": "maxboxacc"}


def phantom_of(con, home) -> tuple[int, float]:
    """(seed, difficulty) of the one phantom a home ingested; ValueError when it ingested none or several."""
    from pipeline.runs.record import ingest_roots
    specs = {(int(m["seed"]), float(m.get("difficulty", 0.0)))
             for m in (json.loads((r / "phantom_manifest.json").read_text()) for r in ingest_roots(con, home)
                       if (r / "phantom_manifest.json").is_file())}
    if len(specs) != 1:
        raise ValueError(f"the home ingested {len(specs)} phantoms {sorted(specs)}; the table needs exactly one")
    return specs.pop()


def run_rows(con, run_id: str, *, protocols=tuple(INTERVALS), findings=BOXED_FINDINGS, n_boot: int = 1000,
             seed: int = 0) -> pd.DataFrame:
    """`protocol, finding, t, acc, lo, hi, n_gt` of one mining run against the phantom truth on its images."""
    boxes = con.execute("SELECT image_id, finding, rank, x, y, w, h, score FROM mined_boxes WHERE run_id = ?",
                        [run_id]).df()
    images = sorted(boxes["image_id"].unique())
    gt = con.execute("""SELECT image_id, finding, x, y, w, h FROM gt_boxes WHERE source = 'truth'
                        AND image_id IN (SELECT DISTINCT image_id FROM mined_boxes WHERE run_id = ?)""",
                     [run_id]).df()
    if gt.empty:
        raise ValueError(f"run {run_id}: no phantom truth on its images; the table scores phantom runs only")
    out = []
    for protocol in protocols:
        if protocol in INTERVALS:
            family = INTERVALS[protocol]
            rows = acc_intervals(boxes, gt, images, findings, n_boot=n_boot, seed=seed,
                                 thresholds=THRESHOLDS[family], family=family)
        else:
            rows = con.execute("""SELECT finding, t, acc, NULL AS lo, NULL AS hi, n_gt FROM eval_results
                                  WHERE run_id = ? AND protocol = ? AND metric = ? ORDER BY finding, t""",
                               [run_id, protocol, POINTS[protocol]]).df()
            rows = rows[rows["finding"].isin(findings)]
        out.append(rows.assign(protocol=protocol))
    return pd.concat(out, ignore_index=True)


def hardware() -> str:
    """This machine in a few words: CPU model and cores, ISA, native bf16 or not (`amp: auto` picks by it)."""
    import torch
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "CPU") if Path("/proc/cpuinfo").is_file() else "CPU"
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (f"{model}; {os.cpu_count()} cores; {torch.backends.cpu.get_cpu_capability()}; "
            f"{'native bf16' if bf16 else 'fp32 (no native bf16)'}")


def write_rows(path, rows: pd.DataFrame, *, recipe: str, setting: str, phantom_seed: int, difficulty: float,
               hardware_label: str | None = None) -> pd.DataFrame:
    """Merge `rows` (from :func:`run_rows`) into the CSV at `path`, replacing the rows of the same key."""
    path = Path(path)
    new = rows.assign(recipe=recipe, setting=setting, phantom_seed=int(phantom_seed), difficulty=float(difficulty),
                      hardware=hardware_label or hardware())[COLUMNS]
    table = new
    if path.is_file() and path.stat().st_size:
        old = pd.read_csv(path)
        same = (old[KEY].astype(str) == pd.Series([recipe, setting, str(int(phantom_seed)), str(float(difficulty))],
                                                   index=KEY)).all(axis=1)
        table = pd.concat([old[~same], new], ignore_index=True)
    table = table.sort_values(KEY + ["protocol", "finding", "t"], kind="stable")
    # interval-less rows bring NULLs: an object column would escape float_format and rewrite every old row
    table[NUMERIC] = table[NUMERIC].apply(pd.to_numeric)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    table.to_csv(tmp, index=False, float_format="%.4f")
    os.replace(tmp, path)
    return table


def write_home_rows(home, path, recipe: str, settings: dict[str, str], n_boot: int = 1000) -> None:
    """Merge the rows of each {setting: mining run} of a phantom home into the CSV at `path`. The headline
    setting `am3-kp` gets every protocol of the table; the ablation's other settings `all/iou@truth`."""
    from pipeline.base.home import Home
    from warehouse import db
    home = Home.resolve(home)
    con = db.connect(home, read_only=True)
    try:
        seed, difficulty = phantom_of(con, home)
        label = hardware()
        for setting, run_id in settings.items():
            protocols = (*INTERVALS, *POINTS) if setting == "am3-kp" else ("all/iou@truth",)
            rows = run_rows(con, run_id, protocols=protocols, n_boot=n_boot)
            write_rows(path, rows, recipe=recipe, setting=setting, phantom_seed=seed, difficulty=difficulty,
                       hardware_label=label)
            print(f"{path}: {setting} <- {run_id} ({len(rows)} rows)")
    finally:
        con.close()
