"""The report of a tiny evaluated run built in a real warehouse (no model: the protocol rows only): its header,
the curves it plots, its tables, and the markdown artifact (#14 item 6)."""
from __future__ import annotations

import json
import re
import subprocess

import pandas as pd
import pytest

from flows.evaluate import artifact_key
from pipeline.evaluation.protocol import write_results
from pipeline.evaluation.report import (CURVES, code_commit, curve_protocols, report_header, report_markdown,
                                        results_tables, write_report)
from pipeline.evaluation.run import protocol_results, run_info
from tests.pipeline.export.test_export import BOXES, MODEL, RUN, make_home
from warehouse.db import connect

THRESHOLDS = [0.9, 0.8, 0.7]


def evaluated_run(root, truth: bool = True) -> tuple[pd.DataFrame, dict]:
    """make_home's mining run with its mining config recorded, NIH boxes on two images and (`truth`) a phantom's
    exact boxes on every mined finding; scored and stored in `eval_results`. Returns (rows, run info)."""
    home = make_home(root)
    con = connect(home)
    try:
        con.execute("UPDATE runs SET params = ? WHERE run_id = ?",
                    [json.dumps({"config": {"thresholds": THRESHOLDS, "erase_threshold": 0.5, "steps": 3}}), RUN])
        con.execute("INSERT INTO gt_boxes VALUES ('00000001_000.png', 'Atelectasis', 230, 550, 80, 80, 'bbox_list'),"
                    " ('00000002_001.png', 'Mass', 900, 900, 100, 100, 'bbox_list')")
        if truth:
            for image_id, finding, rank, x, y, w, h, _ in BOXES:
                if rank == 1:
                    con.execute("INSERT INTO gt_boxes VALUES (?, ?, ?, ?, ?, ?, 'truth')",
                                [image_id, finding, x + 5, y + 5, w, h])
        results, _ = protocol_results(con, RUN)
        rows = pd.concat(results, ignore_index=True)
        write_results(con, rows)
        return rows, run_info(con, RUN)
    finally:
        con.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return evaluated_run(tmp_path_factory.mktemp("evaluated") / "home")


def test_the_header_names_run_model_thresholds_and_commit(run, tmp_path):
    rows, info = run
    header = report_header(RUN, info["model_id"], info["params"])
    assert header["run"] == RUN and header["model"] == MODEL
    assert header["box thresholds on H_f"] == "0.9, 0.8, 0.7" and header["AM steps T"] == "3"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert header["code commit"].startswith(head.stdout.strip())
    text = write_report(tmp_path / "report", RUN, rows, header=header).read_text()
    top = text[:text.index("<img")]
    for value in (RUN, MODEL, "0.9, 0.8, 0.7", header["code commit"]):
        assert value in top
    assert report_header(RUN)["box thresholds on H_f"] == "not recorded"   # an unrecorded config, no failure


def test_the_commit_never_fails_outside_a_checkout(monkeypatch, tmp_path):
    import pipeline.evaluation.report as report
    monkeypatch.setattr(report.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    monkeypatch.setattr(report, "__file__", str(tmp_path / "report.py"))
    assert code_commit()   # the package version, or "unknown"


def test_the_truth_curves_are_plotted_when_truth_exists(run, tmp_path):
    rows, _ = run
    picked = curve_protocols(rows)
    assert picked[:2] == ["all/iou@truth", "bounded/iou@truth"] and {"all/iou", "bounded/iou"} <= set(picked)
    assert all("@truth" in CURVES[p][0] for p in picked[:2])             # labelled in the legend
    subset_only, _ = evaluated_run(tmp_path / "home", truth=False)
    assert curve_protocols(subset_only) == ["all/iou", "bounded/iou"]
    # and the curve styles differ beyond colour
    styles = [CURVES[p][2:] for p in picked]
    assert len(set(styles)) == len(styles) and len({CURVES[p][1] for p in picked}) == len(picked)


def test_acc_and_afp_are_separate_columns(run, tmp_path):
    rows, _ = run
    tables = results_tables(rows)
    table = tables["all/iou@truth (acc)"]
    assert table.columns.nlevels == 2 and set(table.columns.get_level_values(1)) == {"Acc", "AFP"}
    assert ("Atelectasis", "Acc") in table.columns and ("Atelectasis", "AFP") in table.columns
    cells = [c for t in tables.values() for c in t.to_numpy().ravel()]
    assert all(c == "–" or re.fullmatch(r"\d+\.\d\d", c) for c in cells), cells   # no "0.00-3.00" ranges
    html = write_report(tmp_path / "r", RUN, rows).read_text()
    assert "<th>Acc</th>" in html and "<th>AFP</th>" in html


def test_the_markdown_artifact_has_header_and_headline(run):
    rows, info = run
    header = report_header(RUN, info["model_id"], info["params"])
    md = report_markdown(header, rows, "/x/report.html")
    assert md.startswith(f"# Evaluation of run `{RUN}`") and MODEL in md and "0.9, 0.8, 0.7" in md
    assert header["code commit"] in md and "/x/report.html" in md
    assert md.index("all/iou@truth") < md.index("boxed subset") and "| finding | Acc@T=0.1 |" in md
    key = artifact_key("Mine_2026-11-26 A/b")
    assert key == "evaluation-report-mine-2026-11-26-a-b" and re.fullmatch(r"[a-z0-9-]+", artifact_key(RUN))
    from prefect.types.names import raise_on_name_alphanumeric_dashes_only   # what Prefect checks keys with
    assert raise_on_name_alphanumeric_dashes_only(artifact_key("Run_7 (a)"), "key") == "evaluation-report-run-7-a"
