"""`harvest sql` and `harvest status`: read-only views of the warehouse (no flow: nothing is written).

`harvest sql` runs exactly one SELECT-like statement (SELECT, WITH ... SELECT, VALUES, FROM ..., DESCRIBE,
SHOW, SUMMARIZE), as DuckDB's own parser classifies it, on a read-only sandboxed connection: no file outside
<home>/data can be read, none written, no setting changed. Imports neither Prefect nor torch (a fast CLI).
"""
from __future__ import annotations

import duckdb

from pipeline.base.home import Home
from warehouse import db


def print_table(con, sql: str, params=None, max_rows: int = 200) -> None:
    rel = con.execute(sql, params or [])
    cols = [d[0] for d in rel.description]
    rows = rel.fetchmany(max_rows + 1)
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


def _sql(args) -> int:
    try:
        query = check_select(args.query)
        con = db.connect(Home.resolve(args.home), read_only=True, sandbox=True)
        try:
            print_table(con, query, max_rows=args.max_rows)
        finally:
            con.close()
    except duckdb.Error as exc:   # parser, binder, catalog, permission ...: one line, no traceback
        raise ValueError(str(exc).split("\n\n")[0].replace("\n", " ")) from None
    return 0


def _status(args) -> int:
    home = Home.resolve(args.home)
    con = db.connect(home, read_only=True)
    try:
        print(f"home: {home.root}\n")
        tables = [r[0] for r in con.execute(   # DISTINCT: a TEMP view shadows its stored view of the same name
            "SELECT DISTINCT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1"
        ).fetchall()]
        counts = " UNION ALL ".join(f"SELECT '{t}' AS \"table\", count(*) AS rows FROM {t}" for t in tables)
        print_table(con, counts)
        print("\nlast runs:")
        print_table(con, "SELECT run_id, flow, status, started_at, finished_at, model_id FROM runs "
                         "ORDER BY started_at DESC LIMIT 10")
        print("\nrejects by reason:")
        print_table(con, "SELECT stage, reason, count(*) AS n, any_value(detail) AS example FROM rejects "
                         "GROUP BY ALL ORDER BY n DESC")
    finally:
        con.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("sql", help="run a read-only SQL query over the warehouse and print a table",
                       description="Run one read-only DuckDB query (SELECT, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE), "
                                   "e.g. harvest sql \"SELECT finding, count(*) FROM mined_boxes GROUP BY 1\". "
                                   "Files outside the home's data/ folder cannot be read.")
    p.add_argument("query", help="the SQL text")
    p.add_argument("--max-rows", type=int, default=200, help="rows to print (default 200)")
    p.set_defaults(func=_sql)
    s = sub.add_parser("status", help="counts per table, last runs, rejects by reason",
                       description="Summarise the warehouse: row counts, the last runs and rejects by reason.")
    s.set_defaults(func=_status)
