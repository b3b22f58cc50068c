"""`harvest tune`: choose the mining box thresholds on the validation split (never on evaluation boxes)."""
from __future__ import annotations

from flows._runtime import flow_api
from flows._verbs import create_table_artifact, flow, recorded_run
from pipeline.base.home import Home


@flow(name="tune-mining", log_prints=True)
def tune_flow(home: str, model: str = "latest", t_iou: float = 0.3) -> dict:
    from pipeline.evaluation.tune import tune
    with recorded_run(home, "tune-mining", {"model": model, "t_iou": t_iou}):
        best, table, own, compare = tune(home, model, t_iou=t_iou)
    table["thresholds"] = table["thresholds"].map(list)
    create_table_artifact(key="mining-thresholds", table=table.head(10).to_dict("records"),
                          description=f"box thresholds scored on the validation split, model {model}")
    return {"thresholds": list(best), "table": table, "finding_thresholds": {f: list(t) for f, t in own.items()},
            "compare": compare}


def _run(args) -> int:
    home = Home.resolve(args.home)
    with flow_api(home):   # no server unless $PREFECT_API_URL is set or the home's own already runs
        out = tune_flow(str(home.root), args.model, args.t_iou)
    print(out["table"].head(10).to_string(index=False))
    print(f"\nbest on the validation split: thresholds {out['thresholds']}")
    print("\nvalidation Acc per finding, one rule for all vs a rule per finding:")
    print(out["compare"].round(3).to_string(index=False))
    own = ", ".join(f"{f}: {t}" for f, t in out["finding_thresholds"].items())
    print(f"\nuse them with\n  mining: {{thresholds: {out['thresholds']}"
          + (f", finding_thresholds: {{{own}}}" if own else "") + "}   in the config's mining section")
    return 0


def register(sub) -> None:
    p = sub.add_parser("tune", help="choose mining box thresholds on the validation split",
                       description="Run the validation images (held out by training, by patient) through the "
                                   "model once, cut boxes from their fused heatmaps with each candidate "
                                   "threshold triple and score them against their truth boxes (phantom data): "
                                   "the best triple for all findings, and a triple of its own for each finding "
                                   "that scores higher with one. Evaluation boxes are never used.")
    p.add_argument("--model", default="latest", help="model id or 'latest'")
    p.add_argument("--t-iou", type=float, default=0.3, help="T(IoU) of the objective (default 0.3)")
    p.set_defaults(func=_run)
