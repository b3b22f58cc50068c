"""Flow 5: score a mining run against ground truth (docs/design.md#evaluation) and write the report.

Prefect and the evaluation code (torch) are imported on first use (`flows._verbs`), so that `harvest evaluate
--run RUN` checks the run id in well under two seconds, before any server starts.
"""
from __future__ import annotations

import re

from flows._runtime import flow_api
from flows._verbs import (create_link_artifact, create_markdown_artifact, create_table_artifact, flow, recorded_run,
                          require_run, task)
from flows.query import print_table
from pipeline.base.home import Home
from warehouse import db


def artifact_key(run_id: str) -> str:
    """The Prefect artifact key of a run's report: lowercase letters, digits and dashes only."""
    return "evaluation-report-" + (re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-") or "run")


@task(name="evaluate-run")
def evaluate_task(home: str, run_id: str, report: bool) -> dict:
    from pipeline.evaluation.run import evaluate_run   # torch
    from pipeline.evaluation.summary import formatted, harvest_lines
    out = evaluate_run(home, run_id, report=report)
    summary, harvest = out["summary"], out["harvest"]
    text = (f"harvest: {harvest.attrs['images']} images mined, {int(harvest['boxes'].sum())} boxes\n"
            + "".join(f"{line}\n" for line in harvest_lines(harvest))
            + f"Acc per finding, {summary.attrs['protocol']} (n truth boxes; 95 % bootstrap interval over images):\n"
            + formatted(summary).to_string(index=False))
    return {"model_id": out["model_id"], "rows": len(out["results"]),
            "report": str(out["report"]) if out["report"] else None, "markdown": out["markdown"], "summary": text}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(home: str, run_id: str, report: bool = True) -> dict:
    with recorded_run(home, "evaluate", {"mining_run": run_id, "report": report}) as eval_id:
        out = evaluate_task(home, run_id, report)
    summary = headline(home, run_id)
    create_table_artifact(key="evaluation-summary", table=summary.to_dict("records"),
                          description=f"Acc per finding for mining run {run_id} (evaluation {eval_id})")
    create_markdown_artifact(key=artifact_key(run_id), markdown=out.pop("markdown"),
                             description=f"Evaluation report of mining run {run_id} (evaluation {eval_id})")
    if out["report"]:
        create_link_artifact(key="evaluation-report", link=f"file://{out['report']}",
                             description=f"HTML report of mining run {run_id}")
    return {"evaluation_id": eval_id, **out}


def headline(home, run_id: str, protocol: str = "all/iou", ts=(0.1, 0.3, 0.5)):
    """Acc per finding at a few T for the protocols starting with `protocol`: what the CLI and the demo print."""
    con = db.connect(Home.resolve(home), read_only=True)
    try:
        df = con.execute("""SELECT protocol, finding, t, acc FROM eval_results
                            WHERE run_id = ? AND metric = 'acc' AND protocol LIKE ?""",
                         [run_id, protocol + "%"]).df()
    finally:
        con.close()
    df = df[df["t"].round(3).isin(ts)].assign(t=lambda d: "Acc@T=" + d["t"].round(2).astype(str))
    return df.pivot_table(index=["protocol", "finding"], columns="t", values="acc").round(3).reset_index()


def print_results(home, run_id: str, protocol: str, family: str) -> None:
    con = db.connect(Home.resolve(home), read_only=True)
    try:
        like = f"{protocol}/{family}%"
        print_table(con, """
            SELECT protocol, finding, t, round(acc, 3) AS acc, round(afp, 3) AS afp, n_gt, n_images
            FROM eval_results WHERE run_id = ? AND metric = 'acc' AND protocol LIKE ?
            ORDER BY protocol, finding, t""", [run_id, like], max_rows=1000)
        print()
        print_table(con, """
            SELECT protocol, finding, t AS iou, round(acc, 3) AS maxboxacc FROM eval_results
            WHERE run_id = ? AND metric = 'maxboxacc' ORDER BY protocol, finding, t""", [run_id])
    finally:
        con.close()


def _run(args) -> int:
    home = Home.resolve(args.home)   # resolved once, handed down
    require_run(home, args.run, "evaluate")   # fails in one line, before Prefect is imported or a server starts
    with flow_api(home):   # no server unless $PREFECT_API_URL is set or the home's own already runs
        out = evaluate_flow(str(home.root), args.run, report=not args.no_report)
    if args.long:
        print_results(home, args.run, args.protocol, args.family)
    else:
        print(out["summary"])
    if out["report"]:
        print(f"\nreport: {out['report']}")
    if args.csv:
        from pipeline.evaluation.acc_csv import write_home_rows
        write_home_rows(home, args.csv, args.recipe, {args.setting: args.run})
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score a mining run against ground-truth boxes (Wang/Cai protocol)",
                       description="Score the mined boxes of one run: Acc and AFP per finding and T, bounded by "
                                   "Wang's AFP or with all boxes, IoU and IoBB families, MaxBoxAccV2; write "
                                   "eval_results and an HTML report.")
    p.add_argument("--run", required=True, help="mining run id (see `harvest status`)")
    p.add_argument("--long", action="store_true",
                   help="print every protocol row (Acc and AFP per finding and T) instead of the per-finding summary")
    p.add_argument("--protocol", choices=["bounded", "all"], default="all", help="with --long: which table")
    p.add_argument("--family", choices=["iou", "iobb"], default="iou", help="with --long: which overlap family")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="also merge the run's Acc with 95 %% bootstrap intervals into this CSV, as --setting of "
                        "--recipe (docs/results/phantom-acc.csv; phantom runs only)")
    p.add_argument("--setting", default="am3-kp", help="the run's setting in --csv (default am3-kp)")
    p.add_argument("--recipe", default="localize", help="the recipe's name in --csv (default localize)")
    p.set_defaults(func=_run)
