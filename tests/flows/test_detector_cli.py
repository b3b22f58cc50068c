"""`harvest detector train|predict|evaluate` on a real Prefect server, then the detector run through the verbs
that take any run: `harvest evaluate`, `harvest export`, `harvest sql` (#13)."""
from __future__ import annotations

import json
import re

import yaml

from flows.cli import main
from tests.pipeline.detector.test_detector import CLASSIFIER, RUN, TINY, build_home


def value(out: str, key: str) -> str:
    return re.search(rf"^{key}\s+(\S+)$", out, re.MULTILINE).group(1)


def test_train_predict_evaluate_then_evaluate_export_sql(tmp_path, prefect_api, capsys):
    home = build_home(tmp_path)
    h = ["--home", str(home)]
    config = tmp_path / "detector.yaml"
    config.write_text(yaml.safe_dump({**TINY, "runtime": {**TINY["runtime"], "save_every_steps": 0}}))

    assert main([*h, "detector", "train", "--run", RUN, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    model_id = value(out, "model_id")
    assert model_id.startswith("detector-") and value(out, "classifier") == CLASSIFIER

    assert main([*h, "detector", "predict", "--model", model_id, "--split", "all", "--shard-size", "20"]) == 0
    run = value(capsys.readouterr().out, "run_id")
    assert run.startswith("detect-all-")
    assert main([*h, "detector", "predict", "--model", model_id, "--split", "all", "--shard-size", "20"]) == 0
    assert value(capsys.readouterr().out, "shards_predicted") == "0"      # a rerun finds every part written

    assert main([*h, "detector", "evaluate", "--run", run, "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "| mean |" in out and "**acc@0.3**" in out and "detector - targets" in out
    report = json.loads((home / "reports" / run / "detector-eval.json").read_text())
    assert report["baseline_run"] == RUN and report["excluded_training_images"] > 0   # never its training images
    assert report["images"] + report["excluded_training_images"] == 48

    # the detector run is a run like any other
    assert main([*h, "evaluate", "--run", run, "--no-report"]) == 0
    assert "all/iou@truth" in capsys.readouterr().out
    from warehouse import db
    con = db.connect(home, read_only=True)
    try:   # the run names its detector; a detector has no heatmaps, so no MaxBoxAccV2 rows
        assert con.execute("SELECT model_id FROM runs WHERE run_id = ?", [run]).fetchone()[0] == model_id
        assert con.execute("SELECT count(*) FROM eval_results WHERE run_id = ? AND metric = 'maxboxacc'",
                           [run]).fetchone()[0] == 0
    finally:
        con.close()
    assert main([*h, "export", "--run", run, "--format", "coco", "--images", "none", "--image-root",
                 str(tmp_path / "phantom"), "--out", str(tmp_path / "coco")]) == 0
    coco = json.loads(next((tmp_path / "coco" / "annotations").glob("instances_*.json")).read_text())
    assert coco["images"]
    capsys.readouterr()
    query = "SELECT method, count(DISTINCT run_id) AS runs FROM mined_boxes GROUP BY 1 ORDER BY 1"
    assert main([*h, "sql", query]) == 0
    out = capsys.readouterr().out
    assert re.search(r"am\s.*1", out) and re.search(r"detector\s.*1", out)

    # user errors are one line
    assert main([*h, "detector", "predict", "--model", CLASSIFIER]) == 1
    assert "not a detector" in capsys.readouterr().err
    assert main([*h, "detector", "train", "--run", "mine-nothing"]) == 1
    err = capsys.readouterr().err
    assert "no run 'mine-nothing'" in err and len(err.strip().splitlines()) == 1
