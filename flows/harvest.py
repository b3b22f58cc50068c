"""The whole chain, `ingest -> train -> mine -> evaluate -> export`, as one flow; and `harvest demo`.

The scheduled deployment (prefect.yaml) runs this flow with `incremental=True`: it ingests what was added to
the source folder since the last run and mines only those images, with the current model. `harvest_flow` is a
deployment's entrypoint, so it is a Prefect flow from import on; torch loads only when a verb runs.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows._runtime import add_dask_address, prefect_api
from flows.evaluate import evaluate_flow, headline
from flows.export import export_flow
from flows.ingest import ingest_flow
from flows.mine import mine_flow
from flows.train import train_flow
from pipeline.base import amp
from pipeline.base.home import Home
from pipeline.config.harvest import cache_sizes, check, load_sections, trusted_by_default
from pipeline.config.train import load_config

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def resolve_config(path) -> Path:
    """A config path as given, else relative to the repository (so `configs/demo.yaml` works anywhere)."""
    p = Path(path)
    return p if p.exists() else REPO / p


def current_model(home: Home) -> str | None:
    from warehouse import db
    if not home.warehouse.exists():
        return None
    con = db.connect(home, read_only=True)
    try:
        row = con.execute("SELECT model_id FROM models ORDER BY created_at DESC LIMIT 1").fetchone()
    finally:
        con.close()
    return row[0] if row else None


def evaluated(home: Home, run_id: str) -> bool:
    """The run has `eval_results` rows: an evaluation of it finished."""
    from warehouse import db
    con = db.connect(home, read_only=True)
    try:
        return con.execute("SELECT count(*) FROM eval_results WHERE run_id = ?", [run_id]).fetchone()[0] > 0
    finally:
        con.close()


def current_export(folder: Path, min_score, ranks, trust_floor) -> bool:
    """An export of the run already sits in `folder` with these filters (its `manifest.json` says so)."""
    import json

    from pipeline.export.write import MANIFEST, export_filters
    manifest = folder / MANIFEST
    return manifest.is_file() and \
        json.loads(manifest.read_text()).get("filters") == export_filters(min_score, ranks, trust_floor=trust_floor)


@task(name="has-ground-truth")
def has_ground_truth(home: str) -> bool:
    from warehouse import db
    con = db.connect(Home.resolve(home), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM gt_boxes").fetchone()[0] > 0
    finally:
        con.close()


@flow(name="harvest", log_prints=True)
def harvest_flow(home: str | None = None, source: str | None = None, config: str = "configs/demo.yaml",
                 incremental: bool = False, dask_address: str | None = None) -> dict:
    """Ingest `source` (NIH layout), train (or reuse) a model, mine, evaluate where truth exists, export."""
    t0 = time.perf_counter()
    home_ = Home.resolve(home).make()
    home = str(home_.root)
    config = str(resolve_config(config))
    sections = load_sections(config)
    timings = {}
    if source:
        ingest = ingest_flow(home, "nih", str(source), sizes=cache_sizes(config))
        timings["ingest"] = time.perf_counter() - t0
    else:
        ingest = None
    # an incremental run mines new images with the current model, unless the config's `incremental.retrain` asks
    # to train on the new data first (train reuses every stage whose data and config are unchanged)
    model_id = current_model(home_) if incremental and not sections["incremental"]["retrain"] else None
    if model_id is None:
        model_id = train_flow(home, config)
    timings["train"] = time.perf_counter() - t0 - sum(timings.values())
    mining = sections["mining"]
    mine_cfg = {k: v for k, v in mining.items() if k not in ("split", "shard_size")}
    mined = mine_flow(home, model=model_id, split=mining["split"], shard_size=int(mining["shard_size"]),
                      dask_address=dask_address, config=mine_cfg or None)
    timings["mine"] = time.perf_counter() - t0 - sum(timings.values())
    run_id = mined["run_id"]
    nothing_new = mined.get("images_mined") == 0 and evaluated(home_, run_id)
    exp = sections["export"]
    ranks = tuple(exp.get("ranks") or []) or None

    def floor(fmt: str):
        return exp.get("trust_floor") if trusted_by_default(fmt) else None
    # exports first, so that the report names them; a run with nothing new keeps its current ones
    exports = {fmt: str(home_.exports / run_id / fmt) if nothing_new and current_export(
                   home_.exports / run_id / fmt, exp.get("min_score"), ranks, floor(fmt))
               else export_flow(home, run_id, fmt, None, exp.get("min_score"), ranks, trust_floor=floor(fmt))
               for fmt in exp["formats"]}
    timings["export"] = time.perf_counter() - t0 - sum(timings.values())
    if nothing_new:
        print(f"nothing new: run {run_id} mined no image this time and was evaluated before; its report and "
              "exports stay as they are")
        evaluation = {"report": str(p) if (p := home_.reports / run_id / "report.html").exists() else None}
    else:
        evaluation = evaluate_flow(home, run_id) if has_ground_truth(home) else None
    timings["evaluate"] = time.perf_counter() - t0 - sum(timings.values())
    summary = {"home": home, "model_id": model_id, "run_id": run_id, "ingest": ingest, "mine": mined,
               "nothing_new": nothing_new, "report": evaluation and evaluation.get("report"),
               "exports": {k: v.get("path") if isinstance(v, dict) else str(v) for k, v in exports.items()},
               "seconds": {k: round(v, 1) for k, v in timings.items()}}
    create_markdown_artifact(key="harvest-summary", markdown="\n".join(
        ["# Harvest", f"- model: `{model_id}`", f"- mining run: `{run_id}` ({mined['images_mined']} images mined "
         f"this run, {mined['rows']} boxes in all)", f"- report: {summary['report']}"]
        + [f"- export {k}: {v}" for k, v in summary["exports"].items()]))
    return summary


def trusted_line(folders) -> str | None:
    """What the first trust-gated export kept, per its manifest: the findings and their estimated Acc."""
    import json

    from pipeline.export.write import MANIFEST
    for folder in folders:
        manifest = Path(folder) / MANIFEST
        trust = json.loads(manifest.read_text()).get("trust", {}) if manifest.is_file() else {}
        if trust.get("applied"):
            kept = [f"{f} {e['acc']:.2f} [{e['lo']:.2f}, {e['hi']:.2f}]" for f, e in trust["findings"].items()
                    if e["kept"]]
            return (f"{', '.join(kept) or 'no finding'} (estimated Acc@{trust['t_iou']:g} on {trust['source']}, "
                    f"floor {trust['floor']:g}; the other findings are left out: `harvest export --all` keeps them)")
    return None


def phantom_matches(out: Path, spec: dict) -> bool:
    """True when `out` holds the complete phantom `spec` asks for: same n, seed, size and difficulty."""
    import json

    from pipeline.config.harvest import parse_difficulty
    manifest = out / "phantom_manifest.json"
    if not (manifest.is_file() and (out / "truth.csv").is_file() and (out / "Data_Entry_2017_v2020.csv").is_file()):
        return False
    have = json.loads(manifest.read_text())
    want = {"n": int(spec["n"]), "seed": int(spec["seed"]), "size": int(spec.get("size", 1024)),
            "difficulty": parse_difficulty(spec.get("difficulty", 0.0))}
    return all(have.get(k) == v for k, v in want.items())


def ensure_phantom(home: Home, config) -> Path:
    """Generate the demo's phantom dataset under the home folder once; reuse it afterwards."""
    from pipeline.phantom import generate
    spec = load_sections(config)["phantom"]
    out = home.root / "phantom"
    if phantom_matches(out, spec):
        return out
    generate(out, **spec)
    return out


def _demo(args) -> int:
    t0 = time.perf_counter()
    config = resolve_config(args.config)
    check(config)   # a bad config fails here, in one line, before the phantom data or a Prefect server
    home = Home.resolve(args.home).make()
    print(f"hardware: {amp.describe(amp.device_of(load_config(config).runtime.device))}")
    source = ensure_phantom(home, config)
    print(f"phantom data: {source} ({time.perf_counter() - t0:.0f} s)")
    with prefect_api(home.root):
        summary = harvest_flow(str(home.root), str(source), str(config))
    print("\nAcc per finding (protocol all/iou: every mined box counts; @truth: every instance on every mined "
          "image):")
    print(headline(home.root, summary["run_id"]).to_string(index=False))
    print(f"\nwarehouse: {home.warehouse}   (try: harvest sql \"SELECT finding, count(*) FROM mined_boxes "
          f"GROUP BY 1\")")
    print(f"report:    {summary['report']}")
    for fmt, path in summary["exports"].items():
        print(f"export:    {fmt:8s} {path}")
    trusted = trusted_line(summary["exports"].values())
    if trusted:
        print(f"trusted:   {trusted}")
    print(f"done in {time.perf_counter() - t0:.0f} s; stage seconds: {summary['seconds']}")
    return 0


def _harvest(args) -> int:
    check(resolve_config(args.config))
    home = str(Home.resolve(args.home).make().root)
    with prefect_api(home):
        summary = harvest_flow(home, args.source, args.config,
                               args.incremental, args.dask_address)
    for k in ("model_id", "run_id", "report"):
        print(f"{k}: {summary[k]}")
    return 0


def register(sub) -> None:
    d = sub.add_parser("demo", help="the whole pipeline on the embedded phantom data (about 8 min on 2 cores, 15 at most on AVX2)",
                       description="Generate the phantom ChestX-ray14 (size from the config), ingest, train, "
                                   "mine, evaluate, export and report. A second run reuses what is done.")
    d.add_argument("--config", default=str(DEMO_CONFIG), help="config (default configs/demo.yaml)")
    d.set_defaults(func=_demo)
    h = sub.add_parser("run", help="the harvest flow: ingest a folder, train, mine, evaluate, export",
                       description="Run the chained harvest flow on an NIH-layout folder.")
    h.add_argument("--source", required=True, help="NIH-layout folder to ingest")
    h.add_argument("--config", default=str(DEMO_CONFIG), help="training/mining/export config")
    h.add_argument("--incremental", action="store_true", help="reuse the current model; mine only new images")
    add_dask_address(h)
    h.set_defaults(func=_harvest)
