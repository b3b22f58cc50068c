"""`harvest sql` only reads: every write, attach, extension and outside file is refused, and the home is left
byte-identical (flows/query.py, warehouse/db.py)."""
from __future__ import annotations

import duckdb
import pytest

from flows.cli import main
from pipeline.base.files import sha256_file
from tests.pipeline.export.test_export import BOXES, make_home
from warehouse import db


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = make_home(tmp_path_factory.mktemp("sql") / "home").root
    (root / "reports" / "secret.txt").write_text("not for sql\n")
    return root


@pytest.fixture
def outside(tmp_path):
    (tmp_path / "secret.csv").write_text("a,b\n1,2\n")
    return tmp_path


def fingerprint(root) -> dict:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def sql(home, query: str, capsys) -> tuple[int, str, str]:
    rc = main(["--home", str(home), "sql", query])
    out, err = capsys.readouterr()
    return rc, out, err


# DuckDB always lets a connection read its own database file and WAL: only the statement check refuses these
DATABASE_FILE = {
    "read_blob of the database": "SELECT * FROM read_blob('{root}/warehouse.duckdb')",
    "read_text of the database": "SELECT * FROM read_text('{root}/warehouse.duckdb')",
    "read_text of the wal": "SELECT * FROM read_text('{root}/warehouse.duckdb.wal')",
    "read_blob of the wal, built": "SELECT * FROM read_blob('{root}/warehouse.' || 'duckdb.wal')",
    "read_csv of the database": "SELECT * FROM read_csv('{root}/warehouse.duckdb', delim='|', header=false)",
    "read_duckdb": "SELECT * FROM read_duckdb('{root}/warehouse.duckdb', table_name='images')",
    "a read in a subquery": "SELECT (SELECT size FROM read_blob('{root}/warehouse.duckdb')) AS n",
    "a read in DESCRIBE": "DESCRIBE SELECT * FROM read_text('{root}/warehouse.duckdb')",
    "a read by query()": "SELECT * FROM query('SELECT * FROM read_blob(''{root}/warehouse.duckdb'')')",
    "the database as a table": "SELECT * FROM '{root}/warehouse.duckdb'",
    "the wal by a relative path": "SELECT * FROM 'warehouse.duckdb.wal'",
}

ATTACKS = {
    "copy over a part": "COPY (SELECT * FROM mined_boxes) TO '{data}/mined_boxes/run_id=x/part-00000.parquet'",
    "copy to a new part": "COPY images TO '{data}/mined_boxes/part-99999.parquet'",
    "copy outside": "COPY images TO '{outside}/images.csv'",
    "attach": "ATTACH '{outside}/other.duckdb' AS other",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "read outside": "SELECT * FROM read_csv('{outside}/secret.csv')",
    "read the home outside data": "SELECT * FROM read_text('{root}/reports/secret.txt')",
    "read by traversal": "SELECT * FROM read_text('{data}/../reports/secret.txt')",
    "glob outside": "SELECT * FROM glob('{outside}/*')",
    "create table": "CREATE TABLE t AS SELECT 1 AS a",
    "drop table": "DROP TABLE images",
    "insert": "INSERT INTO runs (run_id, flow, status) VALUES ('x', 'x', 'x')",
    "update": "UPDATE images SET split = 'val'",
    "set": "SET enable_external_access = true",
    "unlock": "RESET lock_configuration",
    "explain analyze": "EXPLAIN ANALYZE COPY images TO '{outside}/images.csv'",
    "a second statement": "SELECT 1; DROP TABLE images",
    "parser error": "SELEC 1",
    "catalog error": "SELECT * FROM no_such_table",
    "binder error": "SELECT no_such_column FROM images",
    **DATABASE_FILE,
}


@pytest.mark.parametrize("name", ATTACKS)
def test_refused_with_one_line_and_the_home_unchanged(home, outside, capsys, name):
    before = fingerprint(home)
    rc, out, err = sql(home, ATTACKS[name].format(root=home, data=home / "data", outside=outside), capsys)
    assert rc == 1 and out == ""
    assert err.startswith("harvest sql: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fingerprint(home) == before
    assert sorted(p.name for p in outside.iterdir()) == ["secret.csv"]


# what the statement check lets by (not the database's own files: DATABASE_FILE)
@pytest.mark.parametrize("name", [n for n in ATTACKS if "part" not in n and n not in DATABASE_FILE])
def test_the_sandboxed_connection_alone_refuses(home, outside, name):
    """Inside <home>/data DuckDB could write: there only the statement check of `harvest sql` stops a COPY."""
    before = fingerprint(home)
    con = db.connect(home, read_only=True, sandbox=True)
    try:
        with pytest.raises(duckdb.Error):
            con.execute(ATTACKS[name].format(root=home, data=home / "data", outside=outside))
    finally:
        con.close()
    assert fingerprint(home) == before
    assert sorted(p.name for p in outside.iterdir()) == ["secret.csv"]


@pytest.mark.parametrize("query, expected", [
    ("SELECT count(*) AS n FROM mined_boxes JOIN images USING (image_id)", len(BOXES)),
    ("WITH b AS (SELECT * FROM mined_boxes WHERE rank = 1) SELECT count(*) AS n FROM b",
     sum(b[2] == 1 for b in BOXES)),
    ("FROM runs SELECT count(*) AS n WHERE flow = 'mine'", 1),   # make_home: ingest runs and one mining run
    ("SELECT count(*) AS n FROM read_parquet('{data}/mined_boxes/**/*.parquet')", len(BOXES)),
])
def test_queries_still_work(home, capsys, query, expected):
    before = fingerprint(home)
    rc, out, err = sql(home, query.format(data=home / "data"), capsys)
    assert (rc, err) == (0, "")
    assert out.splitlines()[2].strip() == str(expected)
    assert fingerprint(home) == before


@pytest.mark.parametrize("query", ["DESCRIBE mined_boxes", "SHOW TABLES", "SUMMARIZE images", "VALUES (1, 'a')"])
def test_listing_statements_are_queries(home, capsys, query):
    rc, out, err = sql(home, query, capsys)
    assert (rc, err) == (0, "") and out
