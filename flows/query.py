"""`harvest sql` and `harvest status`: read-only views of the warehouse (no flow: nothing is written).

`harvest sql` runs exactly one SELECT-like statement (SELECT, WITH ... SELECT, VALUES, FROM ..., DESCRIBE,
SHOW, SUMMARIZE), as DuckDB's own parser classifies it, on a read-only sandboxed connection: no file outside
<home>/data can be read, none written, no setting changed. DuckDB always lets a connection read its own database
file and WAL, so table functions are limited to SAFE_TABLE_FUNCTIONS (Parquet readers, series, catalog listings)
and `FROM 'a/path'` is refused: the statement's parse tree is checked before it runs. Bounded: a statement
timeout (the lock is held no longer), a memory limit and a temp-space limit. Imports neither Prefect nor torch.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading

import duckdb

from pipeline.base.home import Home
from pipeline.training.data import newest_model_outdated
from warehouse import db


def print_table(con, sql: str, params=None, max_rows: int = 200) -> None:
    render(*fetch(con, sql, params, max_rows), max_rows)


def fetch(con, sql: str, params=None, max_rows: int = 200) -> tuple[list[str], list[tuple]]:
    """Column names and the first `max_rows` + 1 rows (one more tells that there were more)."""
    rel = con.execute(sql, params or [])
    return [d[0] for d in rel.description], rel.fetchmany(max_rows + 1)


def render(cols: list[str], rows: list[tuple], max_rows: int) -> None:
    cells = [[_fmt(v) for v in r] for r in rows[:max_rows]]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    if len(rows) > max_rows:
        print(f"... (first {max_rows} rows shown)")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def check_select(sql: str) -> str:
    """`sql` if DuckDB parses it as exactly one SELECT statement, else ValueError."""
    statements = duckdb.extract_statements(sql)
    if len(statements) != 1:
        raise ValueError(f"give exactly one SQL statement, not {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise ValueError(f"only queries are allowed (SELECT, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE), "
                         f"not {statements[0].type.name}")
    return sql


# Table functions `harvest sql` may call: none reads a file but the Parquet readers, which fail on anything that is
# not Parquet (the database file, its WAL) without showing its bytes; the sandbox keeps them inside <home>/data.
SAFE_TABLE_FUNCTIONS = frozenset({
    "read_parquet", "parquet_scan", "parquet_metadata", "parquet_schema", "parquet_file_metadata",
    "parquet_kv_metadata", "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "summary", "pragma_table_info", "pragma_show", "pragma_version", "pragma_database_size"})
SAFE_PREFIX = "duckdb_"   # catalog listings: duckdb_tables(), duckdb_columns(), ...


def check_sources(sql: str, con=None) -> str:
    """`sql` if every table function it calls is in SAFE_TABLE_FUNCTIONS (or a duckdb_* listing) and no FROM
    names a file, else ValueError. DuckDB allows a connection to read its own database file and WAL whatever
    `allowed_paths` says (read_blob, read_text, read_csv, read_duckdb ...): those are refused here, on the parse
    tree, wherever they sit (subqueries, CTEs, DESCRIBE, LATERAL). `con` parses (default: a new in-memory
    database, which costs 0.4 s or more on a loaded machine)."""
    if con is None:
        with duckdb.connect() as parser:
            return check_sources(sql, parser)
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    if tree.get("error"):
        raise ValueError(tree.get("error_message") or "the statement cannot be checked")
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack += node
        elif isinstance(node, dict):
            stack += node.values()
            kind = node.get("type")
            if kind == "TABLE_FUNCTION":
                name = node["function"]["function_name"].lower()
                if name not in SAFE_TABLE_FUNCTIONS and not name.startswith(SAFE_PREFIX):
                    raise ValueError(f"table function {name}() is not allowed in harvest sql: files are read "
                                     f"with read_parquet over the home's data/ folder (the others allowed: "
                                     f"series, unnest, json_each and the duckdb_* listings)")
            elif kind == "BASE_TABLE" and any(c in node.get("table_name", "") for c in "/\\.:"):
                raise ValueError(f"FROM {node['table_name']!r} reads a file: use read_parquet('...') over the "
                                 f"home's data/ folder")
    return sql


DEFAULT_TIMEOUT_S = 60.0
GRACE_S = 10.0   # after interrupt(): a statement that does not stop by then ends with its process


def limits(root, memory_limit: str | None = None) -> dict[str, str]:
    """DuckDB settings bounding one `harvest sql`: memory (a quarter of RAM unless given) and temp spill
    (4 GiB or a tenth of the home's free disk, whichever is smaller; DuckDB's default is 90 % of the disk)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    temp = min(4 << 30, shutil.disk_usage(root).free // 10)
    return {"memory_limit": memory_limit or f"{ram // 4 >> 20}MiB", "max_temp_directory_size": f"{temp >> 20}MiB"}


def bounded(con, work, timeout: float):
    """`work()` (which uses `con`) in a thread, interrupted after `timeout` seconds (DuckDB has no statement
    timeout of its own): its result, or ValueError `query stopped after N s (--timeout)`. The caller then closes
    `con`, so the warehouse lock is held no longer than the timeout."""
    out: dict = {}

    def run():
        try:
            out["result"] = work()
        except BaseException as exc:   # re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run, name="harvest-sql", daemon=True)
    thread.start()
    try:
        thread.join(timeout)
    finally:   # the timeout, or Ctrl-C in the caller
        if thread.is_alive():
            con.interrupt()
            thread.join(GRACE_S)
            if thread.is_alive():   # not interruptible: end the process, which releases the lock
                print(f"harvest sql: error: query stopped after {timeout:g} s (--timeout)", file=sys.stderr,
                      flush=True)
                os._exit(1)
    if "error" in out:
        if isinstance(out["error"], duckdb.InterruptException):
            raise ValueError(f"query stopped after {timeout:g} s (--timeout)")
        raise out["error"]
    return out["result"]


def _sql(args) -> int:
    try:
        query = check_select(args.query)
        home = Home.resolve(args.home)
        con = db.connect(home, read_only=True, sandbox=True, settings=limits(home.root, args.memory_limit))
        try:
            check_sources(query, con)
            cols, rows = bounded(con, lambda: fetch(con, query, max_rows=args.max_rows), args.timeout)
        finally:
            con.close()
    except duckdb.Error as exc:   # parser, binder, catalog, permission, damaged part ...: one line, no traceback
        raise ValueError(db.damaged_part_error(exc) or str(exc).split("\n\n")[0].replace("\n", " ")) from None
    render(cols, rows, args.max_rows)
    return 0


def _status(args) -> int:
    home = Home.resolve(args.home)
    con = db.connect(home, read_only=True)
    try:
        print(f"home: {home.root}\n")
        tables = [r[0] for r in con.execute(   # DISTINCT: a TEMP view shadows its stored view of the same name
            "SELECT DISTINCT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1"
        ).fetchall()]
        render(["table", "rows"], [(t, count_rows(con, t)) for t in tables], len(tables))
        outdated = newest_model_outdated(home, con)
        if outdated:
            print(f"\nmodels: {outdated}")
        print("\nlast runs:")
        print_table(con, "SELECT run_id, flow, status, started_at, finished_at, model_id FROM runs "
                         "ORDER BY started_at DESC LIMIT 10")
        print("\nrejects by reason:")
        print_table(con, "SELECT stage, reason, count(*) AS n, any_value(detail) AS example FROM rejects "
                         "GROUP BY ALL ORDER BY n DESC")
    finally:
        con.close()
    return 0


def count_rows(con, table: str) -> int | str:
    """Rows of `table`, or why it cannot be read (a damaged Parquet part): one table's damage hides no other."""
    try:
        return con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    except duckdb.Error as exc:
        return f"unreadable: {db.damaged_part_error(exc) or db.first_line(exc)}"


def seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"--timeout {text}: must be a positive number of seconds")
    return value


def register(sub) -> None:
    p = sub.add_parser("sql", help="run a read-only SQL query over the warehouse and print a table",
                       description="Run one read-only DuckDB query (SELECT, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE), "
                                   "e.g. harvest sql \"SELECT finding, count(*) FROM mined_boxes GROUP BY 1\". "
                                   "Files outside the home's data/ folder cannot be read.")
    p.add_argument("query", help="the SQL text")
    p.add_argument("--max-rows", type=int, default=200, help="rows to print (default 200)")
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"stop the query after this many seconds (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--memory-limit", metavar="SIZE", help="DuckDB memory limit, e.g. 4GB (default: a quarter of RAM)")
    p.set_defaults(func=_sql)
    s = sub.add_parser("status", help="counts per table, last runs, rejects by reason",
                       description="Summarise the warehouse: row counts, the last runs and rejects by reason.")
    s.set_defaults(func=_status)
