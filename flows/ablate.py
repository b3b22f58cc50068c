"""`harvest ablate`: train, mine and evaluate the variants of Cai's Table 1 and Table 3; write the comparison."""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from flows._runtime import prefect_api
from flows._verbs import create_markdown_artifact, flow
from flows.harvest import resolve_config
from flows.ingest import ingest_flow
from flows.mine import mine_flow
from flows.train import train_flow
from pipeline.base.home import Home
from pipeline.config.check import read_yaml
from pipeline.config.harvest import cache_sizes, load_sections
from pipeline.evaluation.ablation import csv_setting, stage_model_id, training_config, variants
from pipeline.evaluation.acc_csv import write_home_rows
from warehouse import db

PROTOCOLS = ("all/iou", "all/iou@truth", "bounded/iou")


@flow(name="ablate", log_prints=True)
def ablate_flow(home: str, source: str | None, config: str, csv: str | None = None) -> dict:
    import pandas as pd

    from pipeline.evaluation.compare import comparison_table, to_markdown
    from pipeline.evaluation.run import evaluate_run
    t0 = time.perf_counter()
    config = str(resolve_config(config))
    mining = load_sections(config)["mining"]
    mine_cfg = {k: v for k, v in mining.items() if k not in ("split", "shard_size")}
    if source:
        ingest_flow(home, "nih", source, sizes=cache_sizes(config))
    rows = []
    variant_dir = Home.resolve(home).reports / "ablation" / "configs"
    variant_dir.mkdir(parents=True, exist_ok=True)
    for v in variants(read_yaml(config)):
        cfg = training_config(config, v)
        path = variant_dir / f"{v.group}-{v.setting}.yaml".replace("/", "-").replace(" ", "_").replace("=", "")
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        train_flow(home, str(path))
        model_id = stage_model_id(cfg, v.stage, Home.resolve(home))
        mined = mine_flow(home, model=model_id, split=mining["split"], shard_size=int(mining["shard_size"]),
                          config={**mine_cfg, "steps": v.steps})
        evaluate_run(home, mined["run_id"], report=False)
        rows.append((mined["run_id"], v.group, v.setting, model_id))
        print(f"{v.group} {v.setting}: model {model_id}, run {mined['run_id']} ({time.perf_counter() - t0:.0f} s)")
    runs = pd.DataFrame(rows, columns=["run_id", "group", "setting", "model_id"])
    if csv:
        write_home_rows(home, csv, read_yaml(config).get("name", "recipe"),
                  {csv_setting(v): run_id for v, (run_id, *_) in zip(variants(read_yaml(config)), rows)})
    con = db.connect(Home.resolve(home), read_only=True)
    try:
        results = con.execute("SELECT * FROM eval_results WHERE run_id IN (SELECT unnest(?))",
                              [list(runs["run_id"].unique())]).df()
    finally:
        con.close()
    sections = []
    for protocol in PROTOCOLS:
        if (results["protocol"] == protocol).any():
            table = comparison_table(results, runs, protocol=protocol)
            sections.append(f"### Protocol `{protocol}`\n\n{to_markdown(table)}")
    markdown = "\n\n".join(sections)
    out = Home.resolve(home).reports / "ablation" / "results.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs_md = to_markdown(runs.set_index("run_id"))
    out.write_text(f"## Runs\n\n{runs_md}\n\n{markdown}\n")
    create_markdown_artifact(key="ablation", markdown=out.read_text())
    return {"report": str(out), "runs": rows, "seconds": round(time.perf_counter() - t0)}


def _run(args) -> int:
    from pipeline.config.harvest import check
    check(resolve_config(args.config))   # a bad config fails here, in one line, before the phantom or a server
    home = Home.resolve(args.home).make()
    source = args.source
    if source is None:
        from flows.harvest import ensure_phantom
        source = str(ensure_phantom(home, resolve_config(args.config)))
    with prefect_api(home.root):
        out = ablate_flow(str(home.root), source, args.config, args.csv)
    print(Path(out["report"]).read_text())
    print(f"written: {out['report']} in {out['seconds']} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("ablate", help="the paper's ablations (MSA necks, AM steps, KP variants) on phantom data",
                       description="Train, mine and evaluate the variants of Cai et al.'s Table 1 (necks) and "
                                   "Table 3 (AM steps t=1..3; w/o KP, KP-Vanilla, KP) and write one comparison "
                                   "table beside the paper's and Wang's rows.")
    p.add_argument("--config", default="configs/demo-scratch.yaml",
                   help="base config (training + phantom + mining sections). The default, configs/demo-scratch.yaml, is "
                        "CPU-sized and shares its stages with `harvest demo` in the same home; "
                        "configs/ablation-gpu.yaml is the GPU-sized one")
    p.add_argument("--source", default=None, help="NIH-layout folder (default: the config's phantom, generated)")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="also merge every setting's Acc with 95 %% bootstrap intervals into this CSV "
                        "(docs/results/phantom-acc.csv; phantom runs only)")
    p.set_defaults(func=_run)
