"""The whole review loop on a real mining run: ingest, mine with a tiny model, export for Label Studio, review,
import, and `evaluate_run` scores the run against the reviewed boxes (@review protocols, MaxBoxAccV2 on them)."""
from __future__ import annotations

import json

import pytest

from pipeline.base.home import Home
from pipeline.evaluation.run import evaluate_run
from pipeline.export.labelstudio import to_percent
from pipeline.export.review import import_review, reviewed
from pipeline.export.write import export
from pipeline.runs.parts import write_part
from pipeline.runs.record import recorded_run
from tests.conftest import register_tiny_model
from warehouse.db import connect

FRAME, SIZE, RUN = 256, 64, "mine-review-loop"
ROWS = [("a.png", "Effusion", 1), ("b.png", "Mass|Nodule", 2), ("c.png", "Cardiomegaly", 3), ("d.png", "No Finding", 4)]


@pytest.fixture
def mined(make_nih, tmp_path):
    """Four 256 px images ingested at 64 px, a tiny ResNet-18 registered, and its mining run written as a part."""
    from pipeline.config.mining import MiningConfig
    from pipeline.ingest.nih import ingest_nih
    from pipeline.mining import mine_shard

    home = tmp_path / "home"
    ingest_nih(home, make_nih(ROWS, size=FRAME), sizes=(SIZE,), workers=1)
    register_tiny_model(home, "tiny", neck="bilinear", input_size=SIZE)
    ids = [r[0] for r in ROWS]
    config = MiningConfig()
    with recorded_run(home, "mine", {"config": config.__dict__}, model_id="tiny", run_id=RUN):
        write_part(Home.resolve(home), RUN, 0, mine_shard(home, "tiny", ids, config, RUN), ids)
    return home


def test_reviewed_boxes_are_what_evaluation_and_training_read(mined, tmp_path):
    out = export(mined, RUN, "labelstudio", tmp_path / "ls", image_roots=[tmp_path / "nih"])
    tasks = json.loads((out / "tasks_train.json").read_text())
    by_id = {t["data"]["image_id"]: t for t in tasks}
    assert set(by_id) == {r[0] for r in ROWS} and by_id["a.png"]["predictions"][0]["result"]
    drawn = {"id": "r1", "type": "rectanglelabels", "from_name": "finding", "to_name": "image",
             "original_width": FRAME, "original_height": FRAME,
             "value": {"x": to_percent(60, FRAME), "y": to_percent(80, FRAME), "width": to_percent(100, FRAME),
                       "height": to_percent(90, FRAME), "rotation": 0, "rectanglelabels": ["Effusion"]}}
    for name, result in (("a.png", by_id["a.png"]["predictions"][0]["result"]), ("c.png", [drawn]), ("d.png", [])):
        by_id[name]["annotations"] = [{"id": 1, "result": result, "was_cancelled": False}]
    path = tmp_path / "reviewed.json"
    path.write_text(json.dumps(tasks))
    summary = import_review(mined, path)
    assert (summary["images"], summary["negatives"], summary["rejects"], summary["run_id"]) == (3, 1, 0, RUN)

    result = evaluate_run(mined, RUN, report=False)
    table = result["results"]
    review = table[table["protocol"].str.endswith("@review")]
    assert {"all/iou@review", "bounded/iou@review", "all/iobb@review"} <= set(review["protocol"])
    accepted = {b["value"]["rectanglelabels"][0] for b in by_id["a.png"]["predictions"][0]["result"]}
    for finding in accepted & set(review["finding"]):   # boxes accepted as mined are found at every T
        rows = review[(review["protocol"] == "all/iou@review") & (review["finding"] == finding)]
        assert rows["acc"].notna().all() and (rows["acc"] > 0).all()
    effusion = review[(review["protocol"] == "all/iou@review") & (review["finding"] == "Effusion")]
    assert (effusion["n_images"] == 2).all()             # a.png's accepted box and c.png's drawn one
    assert (table["metric"] == "maxboxacc").any()        # MaxBoxAccV2 on the reviewed boxes: no other truth here
    con = connect(mined, read_only=True)
    stored = con.execute("SELECT DISTINCT protocol FROM eval_results WHERE protocol LIKE '%@review'").fetchall()
    boxes, ids = reviewed(con)
    con.close()
    assert len(stored) == 3 and ids == {"a.png", "c.png", "d.png"} and set(boxes["image_id"]) == {"a.png", "c.png"}
