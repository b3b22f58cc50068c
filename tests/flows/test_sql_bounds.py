"""`harvest sql` is bounded (issue #21, item 5): a statement timeout that also bounds how long it holds the
warehouse lock, a memory limit and a temp-space limit; a writer it blocks names it in one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from flows.cli import main
from flows.query import check_sources
from tests.flows.test_reliability import holds_warehouse
from tests.pipeline.export.test_export import make_home
from warehouse import db

REPO = Path(__file__).resolve().parents[2]
SLOW = "SELECT count(*) FROM range(1000000000000) a"            # ~hours: only the timeout ends it
CROSS = "SELECT count(*) FROM mined_boxes a, mined_boxes b, mined_boxes c, mined_boxes d, range(1000000000) e"


@pytest.fixture(scope="module")
def base_home(tmp_path_factory):
    return make_home(tmp_path_factory.mktemp("bounds") / "home").root


@pytest.fixture
def home(base_home, tmp_path):
    """A copy per test: the writers below change the file."""
    return shutil.copytree(base_home, tmp_path / "home")


@pytest.mark.parametrize("query", [SLOW, CROSS])
def test_a_long_query_stops_at_its_timeout_in_one_line(home, capsys, query):
    t0 = time.monotonic()
    rc = main(["--home", str(home), "sql", "--timeout", "1.5", query])
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert (rc, out, err) == (1, "", "harvest sql: error: query stopped after 1.5 s (--timeout)\n")
    assert took < 1.5 + 5, took                 # interrupt() stops DuckDB within a fraction of a second
    db.connect(home).close()                    # the lock is free at once: a writer opens without waiting


def test_memory_and_temp_space_are_limited(home, capsys):
    query = "SELECT current_setting('memory_limit') AS m, current_setting('max_temp_directory_size') AS t"
    assert main(["--home", str(home), "sql", query]) == 0
    cells = capsys.readouterr().out.splitlines()[2].split()     # 5.8 GiB  4.0 GiB
    memory, temp = " ".join(cells[:2]), " ".join(cells[2:])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert abs(duck_bytes(memory) - ram / 4) < 0.01 * ram             # a quarter of RAM (DuckDB's default: 80 %)
    assert 0 < duck_bytes(temp) <= min(4 << 30, shutil.disk_usage(home).free / 10) * 1.01
    assert main(["--home", str(home), "sql", "--memory-limit", "1GiB", query]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["1.0", "GiB"]
    assert main(["--home", str(home), "sql", "--memory-limit", "lots", "SELECT 1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("harvest sql: error: ") and err.count("\n") == 1, err


def duck_bytes(text: str) -> float:
    """'5.8 GiB' (DuckDB's current_setting form) -> bytes."""
    number, unit = text.split()
    return float(number) * 1024 ** (["KiB", "MiB", "GiB", "TiB"].index(unit) + 1)


def test_a_blocked_writer_names_the_reader_and_gets_the_lock_by_its_timeout(home, monkeypatch):
    """A `harvest sql` in another process holds the warehouse: a writer that gives up names its PID and command
    line in one line; one that waits gets the lock once the query's timeout stopped it."""
    timeout = 6
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), "sql", "--timeout",
                             str(timeout), SLOW], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120        # imports on a loaded machine
        while not holds_warehouse(proc.pid, home):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        held = time.monotonic()
        monkeypatch.setenv(db.LOCK_TIMEOUT_ENV, "0.5")
        with pytest.raises(db.WarehouseBusy) as busy:
            db.connect(home)
        message = str(busy.value)
        assert "\n" not in message
        assert message.startswith(f"warehouse {home / 'warehouse.duckdb'} locked by PID {proc.pid} "
                                  f"({sys.executable} -m flows.cli --home {home} sql --timeout {timeout} "), message
        monkeypatch.setenv(db.LOCK_TIMEOUT_ENV, "120")
        db.connect(home).close()
        waited = time.monotonic() - held
        assert waited < timeout + 5, waited
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, out, err) == (1, "", f"harvest sql: error: query stopped after {timeout} s (--timeout)\n")


@pytest.mark.parametrize("query, refused", [
    ("SELECT * FROM read_blob('/h/warehouse.duckdb')", "table function read_blob() is not allowed"),
    ("SELECT * FROM main.READ_TEXT('/h/warehouse.duckdb.wal')", "table function read_text() is not allowed"),
    ("WITH t AS (SELECT * FROM read_json('x')) SELECT * FROM t", "table function read_json() is not allowed"),
    ("SELECT * FROM json_execute_serialized_sql('{}')", "json_execute_serialized_sql() is not allowed"),
    ("SELECT * FROM '/h/warehouse.duckdb'", "reads a file"),
    ('SELECT * FROM "warehouse.duckdb.wal"', "reads a file"),
])
def test_the_statement_check_refuses_file_readers(query, refused):
    with pytest.raises(ValueError, match=refused.replace("(", r"\(").replace(")", r"\)")):
        check_sources(query)


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_parquet('/h/data/mined_boxes/**/*.parquet')", "SELECT * FROM range(3)",
    "SELECT * FROM duckdb_tables()", "SUMMARIZE images", "DESCRIBE mined_boxes", "SHOW TABLES",
    "SELECT * FROM main.images", "SELECT * FROM unnest([1, 2])", "VALUES (1)"])
def test_the_statement_check_lets_queries_by(query):
    assert check_sources(query) == query


def test_a_timeout_must_be_positive(home, capsys):
    with pytest.raises(SystemExit):
        main(["--home", str(home), "sql", "--timeout", "0", "SELECT 1"])
    assert "--timeout" in capsys.readouterr().err


def test_duckdb_still_allows_its_own_file(home):
    """Why the statement check exists: should DuckDB stop allowing a connection its own file, it can go."""
    con = db.connect(home, read_only=True, sandbox=True)
    try:
        assert con.execute(f"SELECT size FROM read_blob('{home}/warehouse.duckdb')").fetchone()[0] > 0
    except duckdb.PermissionException:
        pytest.skip("this DuckDB refuses its own database file in the sandbox")
    finally:
        con.close()
