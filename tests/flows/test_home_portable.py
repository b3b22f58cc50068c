"""A home folder can be moved or copied: its views read the Parquet parts of the home they are opened from
(warehouse/db.py), through the CLI, the library and a plain DuckDB session."""
from __future__ import annotations

import json
import shutil

import duckdb

from flows.cli import main
from pipeline.base.home import Home
from pipeline.evaluation.run import protocol_results
from pipeline.export.write import export
from tests.pipeline.export.test_export import BOXES, DICOM_ID, RUN, make_home
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


def test_sources_inside_a_moved_home_are_found_where_the_home_is_now(tmp_path, capsys):
    """The demo's phantom lives in its home: ingest records it relative to the home too (`root_in_home`), so
    an export of the moved home links the images from their new place."""
    root = make_home(tmp_path / "original").root
    shutil.move(tmp_path / "original-src", root / "src")   # the sources, now inside the home
    assert main(["--home", str(root), "export", "--run", RUN, "--format", "coco", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err   # not yet recorded as inside: one line naming the fix, before any flow
    assert len(err.strip().splitlines()) == 1 and "source image(s) not found" in err and "--image-root" in err
    con = db.connect(root)
    for kind in ("nih", "dicom"):
        con.execute("UPDATE runs SET params = ? WHERE run_id = ?",
                    [json.dumps({"kind": kind, "root": str(root / "src" / kind), "root_in_home": f"src/{kind}",
                                 "sizes": [256]}), f"ingest-{kind}"])
    con.close()
    moved = shutil.move(root, tmp_path / "moved")
    out = export(moved, RUN, "coco", tmp_path / "coco", ranks=None)   # images linked (the default)
    nih = [p for p in (out / "images").rglob("*.png") if p.name != f"{DICOM_ID}.png"]   # DICOMs are decoded anew
    assert nih and all(p.stat().st_nlink == 2 for p in nih)   # hard links to the moved home's files


def test_ingest_records_a_source_inside_the_home_relative_to_it(make_nih, prefect_api, tmp_path):
    from flows.ingest import ingest_flow
    home = tmp_path / "home"
    home.mkdir()
    inside = shutil.move(make_nih([("00000001_000.png", "Mass", 1)], size=64), home / "phantom")
    ingest_flow(str(home), "nih", str(inside), sizes=[32])
    con = db.connect(home, read_only=True)
    params = json.loads(con.execute("SELECT params FROM runs WHERE flow = 'ingest'").fetchone()[0])
    con.close()
    assert params["root_in_home"] == "phantom" and params["root"] == str(inside)
