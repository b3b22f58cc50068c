"""`harvest tune`: choose the mining box thresholds on the validation split (never on evaluation boxes)."""
from __future__ import annotations

from flows._runtime import flow_api
from flows._verbs import create_table_artifact, flow, recorded_run
from pipeline.base.home import Home


@flow(name="tune-mining", log_prints=True)
def tune_flow(home: str, model: str = "latest", t_iou: float = 0.3, data: str | None = None) -> dict:
    from pipeline.evaluation.tune import tune
    with recorded_run(home, "tune-mining", {"model": model, "t_iou": t_iou, "data": data}):
        best, table, own, compare = tune(home, model, t_iou=t_iou, data=data)
    table["thresholds"] = table["thresholds"].map(list)
    create_table_artifact(key="mining-thresholds", table=table.head(10).to_dict("records"),
                          description=f"box thresholds scored on the validation split, model {model}")
    return {"thresholds": list(best), "table": table, "finding_thresholds": {f: list(t) for f, t in own.items()},
            "compare": compare}


@flow(name="tune-trust", log_prints=True)
def trust_flow(home: str, run_id: str, floor: float | None = None) -> dict:
    """Measure the trust in run `run_id`'s boxes on its tuning set and store it (pipeline.evaluation.trust)."""
    from pipeline.evaluation import trust
    from pipeline.runs.record import writer
    floor = trust.FLOOR if floor is None else floor
    with recorded_run(home, "tune-trust", {"run_id": run_id, "floor": floor}):
        con = writer(Home.resolve(home))
        try:
            rows = trust.trust_run(con, run_id, floor)
            trust.store(con, rows)
        finally:
            con.close()
    create_table_artifact(key="trust", table=rows.drop(columns=["basis"]).to_dict("records"),
                          description=f"estimated trust in the boxes of run {run_id}")
    return {"rows": rows}


def trust_table(rows) -> str:
    """The trust rows as a compact table: Acc@T with its interval and n, precision, the score cut, kept."""
    import pandas as pd
    fmt = lambda v: "–" if pd.isna(v) else f"{v:.2f}"   # noqa: E731
    out = pd.DataFrame({"finding": rows["finding"], "n_gt": rows["n_gt"],
                        f"est. Acc@{rows['t'].iloc[0]:g}": [f"{fmt(a)} [{fmt(lo)}, {fmt(hi)}]" for a, lo, hi
                                                           in zip(rows["acc"], rows["lo"], rows["hi"])],
                        "precision": rows["precision"].map(fmt), "rank": rows["rank"].map(
                            lambda r: "–" if pd.isna(r) else int(r)), "min score": rows["min_score"].map(fmt),
                        "exported": rows["kept"].map({True: "yes", False: "no"})})
    return out.to_string(index=False)


def _run(args) -> int:
    home = Home.resolve(args.home)
    if args.run_id:
        from flows._verbs import require_run
        from pipeline.evaluation.trust import MIN_GT
        require_run(home, args.run_id, "tune")
        with flow_api(home):   # no server unless $PREFECT_API_URL is set or the home's own already runs
            rows = trust_flow(str(home.root), args.run_id, args.floor)["rows"]
        print(trust_table(rows))
        print(f"\ntuning set: {rows['source'].iloc[0]}; exports keep the findings whose estimated Acc reaches "
              f"{rows['floor'].iloc[0]:g} on at least {MIN_GT} truth boxes, and of each its boxes of that rank "
              "from the min score up (`harvest export --all` keeps every finding)")
        return 0
    with flow_api(home):   # no server unless $PREFECT_API_URL is set or the home's own already runs
        data = str(Home.resolve(args.data_home).root) if args.data_home else None
        out = tune_flow(str(home.root), args.model, args.t_iou, data)
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
    p.add_argument("--run", dest="run_id", default=None, metavar="RUN_ID",
                   help="instead: measure the trust in a mining run's boxes on its tuning set (phantom truth of "
                        "the validation images, else reviewed boxes; never evaluation boxes): per finding a score "
                        "cut and the estimated Acc@0.3 with its 95 %% interval, stored for `harvest export`")
    p.add_argument("--floor", type=float, default=None, metavar="ACC",
                   help="with --run: the estimated Acc a finding needs to be exported (default: export.trust_floor)")
    p.add_argument("--t-iou", type=float, default=0.3, help="T(IoU) of the objective (default 0.3)")
    p.add_argument("--data-home", default=None, metavar="HOME",
                   help="take the validation images from this home (a larger phantom of a seed no evaluation "
                        "uses, e.g. the pretraining home), the model from --home (default: --home's images)")
    p.set_defaults(func=_run)
