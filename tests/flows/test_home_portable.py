"""A home folder can be moved or copied: its views read the Parquet parts of the home they are opened from
(warehouse/db.py), through the CLI, the library and a plain DuckDB session."""
from __future__ import annotations

import json
import shutil

import duckdb

from flows.cli import main
from pipeline.home import Home
from pipeline.evaluation.run import protocol_results
from pipeline.export import export
from tests.pipeline.test_export import BOXES, RUN, make_home
from warehouse import db

COUNT = "SELECT count(*) FROM mined_boxes"


def answers(root, capsys) -> tuple[str, str]:
    """What `harvest status` (without its `home:` line) and `harvest sql` print for the home at `root`."""
    assert main(["--home", str(root), "status"]) == 0
    status = capsys.readouterr().out.split("\n", 1)[1]
    assert main(["--home", str(root), "sql", COUNT]) == 0
    return status, capsys.readouterr().out


def scored_and_exported(root, out) -> tuple[list, list]:
    """The run's protocol rows (evaluation without the model) and its COCO export's annotations."""
    con = db.connect(root)
    results, _ = protocol_results(con, RUN)
    con.close()
    rows = sorted(map(tuple, concat_rows(results)))
    coco = export(root, RUN, "coco", out, ranks=None)
    anns = sorted(json.loads(p.read_text())["annotations"].__len__() for p in (coco / "annotations").glob("instances_*"))
    return rows, anns


def concat_rows(frames) -> list:
    return [r for f in frames for r in f.round(9).astype(str).itertuples(index=False)]


def counts(root) -> list[int]:
    """mined_boxes rows through a writable and a read-only library connection."""
    found = []
    for read_only in (False, True):
        con = db.connect(root, read_only=read_only)
        found.append(con.execute(COUNT).fetchone()[0])
        con.close()
    return found


def test_moved_and_copied_homes_read_their_own_parts(tmp_path, capsys, monkeypatch):
    root = make_home(tmp_path / "original").root
    con = db.connect(root)     # the stored view now points at the part written after make_home's connection
    con.execute("INSERT INTO gt_boxes VALUES ('00000001_000.png', 'Atelectasis', 230, 540, 90, 80, 'truth'), "
                "('00000002_001.png', 'Mass', 900, 900, 100, 100, 'truth')")   # something to score
    con.close()
    expected = answers(root, capsys)
    assert f"\n{len(BOXES)}" in expected[1]
    work = scored_and_exported(root, tmp_path / "out-original")
    assert work[0] and sum(work[1]) > 0

    moved = shutil.move(root, tmp_path / "moved")
    assert answers(moved, capsys) == expected
    assert counts(moved) == [len(BOXES)] * 2
    assert scored_and_exported(moved, tmp_path / "out-moved") == work   # evaluation and export read the move

    copy = shutil.copytree(moved, tmp_path / "copy")
    shutil.rmtree(moved)   # the copy must not read the original's parts
    assert answers(copy, capsys) == expected
    assert counts(copy) == [len(BOXES)] * 2

    monkeypatch.chdir(copy)   # plain DuckDB, no project code: run from inside the home
    con = duckdb.connect("warehouse.duckdb", read_only=True)
    assert con.execute(COUNT).fetchone()[0] == len(BOXES)
    con.close()


def test_empty_mined_boxes_has_its_columns(tmp_path):
    home = Home(tmp_path / "home").make()
    db.connect(home).close()
    expected = [(f.name, f.type) for f in db.PARQUET_TABLES["mined_boxes"]]
    for read_only in (False, True):
        con = db.connect(home, read_only=read_only)
        rel = con.sql("SELECT * FROM mined_boxes")
        assert rel.fetchall() == [] and rel.columns == [name for name, _ in expected]
        con.close()
