"""The downstream detector end to end on the CPU (issue #13, docs/results.md#downstream-detector).

Full run: on a demo home (`make demo` / `harvest demo`, whose mining run covers every image), train the detector
of configs/detector-cpu.yaml on the run's boxes, predict the test split, and compare the detector's boxes with
the run's own on the held-out test images against the phantom's exact truth (COCO AP30/AP50/mAP, Wang/Cai Acc,
95 % bootstrap intervals). Through the same Prefect flows as `harvest detector train|predict|evaluate`; a
rerun reuses the trained detector and the predicted parts (delete `checkpoints/detector-*` to time training).

    python bench/detector.py [--home harvest-data] [--run RUN] [--config configs/detector-cpu.yaml]
    python bench/detector.py --quick      # a 48-image phantom at 64 px, a tiny untrained classifier (< 1 min)

Last line: `detector/am acc@0.3 ratio: X` (mean Acc@0.3 over the boxed findings with truth on the held-out
images, detector / mined boxes of every rank); the line before gives the paired differences with the mined
boxes and with its training targets (the rank-1 boxes).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows._runtime import prefect_api  # noqa: E402
from pipeline.base.home import Home  # noqa: E402
from warehouse import db  # noqa: E402


def mining_run(home: Home) -> str:
    """The latest completed attention-mining run of the home."""
    con = db.connect(home, read_only=True)
    try:
        row = con.execute("SELECT run_id FROM runs WHERE flow = 'mine' AND status = 'completed' "
                          "ORDER BY finished_at DESC LIMIT 1").fetchone()
    finally:
        con.close()
    if row is None:
        raise SystemExit(f"no completed mining run in {home.warehouse}: run `harvest --home {home.root} demo` first")
    return row[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=str(REPO / "harvest-data"), help="a demo home (default ./harvest-data)")
    ap.add_argument("--run", help="mining run (default: the home's latest completed one)")
    ap.add_argument("--config", default=str(REPO / "configs" / "detector-cpu.yaml"))
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="a tiny phantom home in a temporary folder")
    args = ap.parse_args()

    import torch

    from pipeline.base.amp import describe
    from pipeline.config.detector import DetectorConfig

    t0 = time.perf_counter()
    tmp = None
    if args.quick:
        from tests.pipeline.detector.test_detector import RUN, TINY, build_home
        tmp = tempfile.TemporaryDirectory(prefix="bench-detector-")
        home, run, config = Home.resolve(build_home(Path(tmp.name))), RUN, DetectorConfig.load(TINY).to_dict()
        args.bootstrap = min(args.bootstrap, 100)
    else:
        home = Home.resolve(args.home)
        if not home.warehouse.exists():
            raise SystemExit(f"no warehouse at {home.warehouse}: run `harvest --home {home.root} demo` first")
        run, config = args.run or mining_run(home), DetectorConfig.load(args.config).to_dict()
    print(f"home {home.root}, mining run {run}, {torch.get_num_threads()} threads, {describe('cpu')}", flush=True)
    from flows.detector import evaluate_flow, predict_flow, train_flow

    times = {"setup": time.perf_counter() - t0}
    with prefect_api(str(home.root)):
        t = time.perf_counter()
        trained = train_flow(str(home.root), run, config)
        times["train"] = time.perf_counter() - t
        t = time.perf_counter()
        predicted = predict_flow(str(home.root), trained["model_id"], "test" if not args.quick else "all",
                                 config=config)
        times["predict"] = time.perf_counter() - t
        t = time.perf_counter()
        out = evaluate_flow(str(home.root), predicted["run_id"], n_boot=args.bootstrap)
        times["evaluate"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    print(json.dumps({"train": trained, "predict": predicted}, indent=1, default=str))
    print(out["markdown"])
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    t = out["table"]
    mean = t[(t["finding"] == "mean") & (t["metric"] == "acc@0.3")].set_index("method")
    for diff in ("detector - targets", "detector - am"):
        if diff in mean.index:
            d = mean.loc[diff]
            print(f"{diff} mean acc@0.3: {d.value:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]")
    ratio = mean.loc["detector", "value"] / mean.loc["am", "value"] if mean.loc["am", "value"] else float("nan")
    if tmp is not None:
        tmp.cleanup()
    print(f"detector/am acc@0.3 ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
