"""`harvest import-review` (flows/review.py): counts on stdout, rejects named, user errors in one line."""
from __future__ import annotations

import json

import pytest

from flows.cli import main
from pipeline.export import write as ex
from tests.pipeline.export.test_export import BOXES, RUN, add_mining_run, make_home
from warehouse.db import connect


@pytest.fixture
def home_and_tasks(tmp_path):
    home = make_home(tmp_path / "home")
    out = ex.export(home, RUN, "labelstudio", tmp_path / "ls")
    tasks = json.loads((out / "tasks_train.json").read_text())
    for t in tasks:   # the reviewer accepts the predictions of every train image but deletes the boxes of one
        keep = t["data"]["image_id"] != "00000001_000.png"
        t["annotations"] = [{"id": 1, "result": t["predictions"][0]["result"] if keep else [], "was_cancelled": False}]
    return home, tasks


def harvest(home, *args) -> int:
    return main(["--home", str(home.root), "import-review", *map(str, args)])


def test_import_review_prints_what_it_stored(home_and_tasks, tmp_path, capsys):
    home, tasks = home_and_tasks
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    assert harvest(home, path, "--format", "labelstudio") == 0
    out = capsys.readouterr().out
    assert "import-review (labelstudio): 3 image(s) reviewed, 1 box(es), 2 reviewed negative(s)" in out
    assert f"(mining run {RUN})" in out and "reject" not in out
    tasks[2]["annotations"][0]["result"][0]["value"]["rectanglelabels"] = ["Tumour"]
    path.write_text(json.dumps(tasks))
    assert harvest(home, path, "--run", RUN) == 0
    out = capsys.readouterr().out
    assert "1 reject(s), 1 image(s) not imported" in out and "stage = 'review'" in out
    con = connect(home, read_only=True)
    assert con.execute("SELECT count(*) FROM reviews").fetchone()[0] == 3
    assert con.execute("SELECT reason FROM rejects WHERE stage = 'review'").fetchall() == [("unknown_finding",)]
    con.close()


@pytest.mark.parametrize("args, message", [
    (["notes.txt"], "is neither JSON nor XML"),
    (["missing.json"], "no review file"),
    (["export.json", "--run", "no-such-run"], "no run 'no-such-run'"),
    (["odd.json"], "neither a Label Studio export")])
def test_user_errors_are_one_line(home_and_tasks, tmp_path, monkeypatch, capsys, args, message):
    home, tasks = home_and_tasks
    (tmp_path / "notes.txt").write_text("reviewed by hand, see the binder")
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    (tmp_path / "odd.json").write_text(json.dumps({"images": "none"}))
    monkeypatch.chdir(tmp_path)
    assert harvest(home, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("harvest import-review: error: ") and message in err and err.count("\n") == 1, err


def test_a_review_naming_no_run_on_a_home_of_several_asks_for_one(home_and_tasks, tmp_path, capsys):
    home, tasks = home_and_tasks
    add_mining_run(home, "mine-other", BOXES[:1], [BOXES[0][0]])
    path = tmp_path / "export.json"
    path.write_text(json.dumps([{k: v for k, v in t.items() if k != "predictions"} for t in tasks]))
    assert harvest(home, path) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names no mining run and this home has 2" in err and "pass --run RUN_ID" in err
    assert harvest(home, path, "--run", "mine-other") == 0
    assert "(mining run mine-other)" in capsys.readouterr().out
