"""Connection and write helpers for the DuckDB/Parquet warehouse (docs/design.md#data-contracts).

Small tables live inside `warehouse.duckdb` (transactional). Large, append-mostly tables live as Parquet
parts under `data/<table>/...` and are exposed as views, so plain `duckdb warehouse.duckdb` sees them.
The views store a glob relative to the home ('data/<table>/**/*.parquet'), so a home can be copied or moved:
`connect` points DuckDB's `file_search_path` at the home it opens, and a plain `duckdb warehouse.duckdb` run
from inside the home resolves the glob against its working folder.
Parquet parts are written atomically (temp file, then rename): a killed writer leaves no half part.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Callable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from warehouse.wal import DamagedWAL, replay_damage  # noqa: F401 (DamagedWAL: db.DamagedWAL for callers)

SCHEMA_VERSION = 1

# Parquet-backed tables: name -> arrow schema. Parts live under <home>/data/<name>/**/*.parquet.
PARQUET_TABLES: dict[str, pa.Schema] = {
    "mined_boxes": pa.schema([
        ("run_id", pa.string()), ("model_id", pa.string()), ("image_id", pa.string()),
        ("finding", pa.string()), ("rank", pa.int8()),
        ("x", pa.float32()), ("y", pa.float32()), ("w", pa.float32()), ("h", pa.float32()),
        ("score", pa.float32()), ("prob", pa.float32()), ("threshold", pa.float32()),
        ("method", pa.string()),   # 'am' (attention mining, `harvest mine`) | 'detector' (`harvest detector predict`)
    ]),
}
# Columns added after parts were written without them: the view reads a part that lacks one as this value.
PARQUET_DEFAULTS: dict[str, dict[str, str]] = {"mined_boxes": {"method": "am"}}

_DUCK_TYPES = {pa.string(): "VARCHAR", pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INTEGER",
               pa.int64(): "BIGINT", pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}


def schema_sql() -> str:
    return resources.files("warehouse").joinpath("schema.sql").read_text()


def _parquet_view_sql(name: str, root: Path, temp: bool = False, damaged: dict[str, str] | None = None) -> str:
    """A view over the Parquet parts of `name`: stored in the file with a glob relative to the home, or a TEMP
    view of this connection only, with the absolute glob of `root` (what a read-only connection can create).
    `damaged` (partition folder -> one-line message): the view reads each other folder of parts on its own,
    and a damaged one is a branch that raises its message when a query reaches it, so a query filtering on
    another folder's key (`WHERE run_id = ?`) still runs."""
    part_dir = root / "data" / name
    view = f"CREATE OR REPLACE {'TEMP ' if temp else ''}VIEW {name}"
    cols = ", ".join(f"CAST(NULL AS {_DUCK_TYPES[f.type]}) AS {f.name}" for f in PARQUET_TABLES[name])
    if not any(part_dir.rglob("*.parquet")):
        return f"{view} AS SELECT {cols} WHERE false"
    folders = [""] if damaged is None else _partitions(part_dir)
    branches = []
    for folder in folders:
        if damaged and folder in damaged:
            key, _, value = folder.partition("=")
            branches.append(f"SELECT * REPLACE ({_quote(value)} AS {key}) FROM (SELECT {cols}) "
                            f"WHERE error({_quote(damaged[folder])})" if value else
                            f"SELECT {cols} WHERE error({_quote(damaged[folder])})")
        else:
            glob = _quote(_glob(name, root, temp, folder))
            branches.append(f"SELECT * FROM read_parquet({glob}, union_by_name=true)")
    # the empty typed relation first: every column of the schema, in its order, whatever the parts hold
    parts = " UNION ALL BY NAME ".join([f"SELECT {cols} WHERE false", *branches])
    defaults = PARQUET_DEFAULTS.get(name)
    if not defaults:
        return f"{view} AS {parts}"
    fill = ", ".join(f"coalesce({col}, '{value}') AS {col}" for col, value in defaults.items())
    return f"{view} AS SELECT * REPLACE ({fill}) FROM ({parts})"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _glob(name: str, root: Path, temp: bool, folder: str = "") -> str:
    """The parts of `name` under `folder` ('' all, '.' those directly in data/<name>), as the view reads them."""
    base = (root / "data" / name) if temp else Path("data", name)
    return (base / "*.parquet" if folder == "." else base / folder / "**" / "*.parquet").as_posix()


def _partitions(part_dir: Path) -> list[str]:
    """The folders directly under `part_dir` holding parts (e.g. run_id=<run>), and '.' for loose parts."""
    out = sorted(p.name for p in part_dir.iterdir() if p.is_dir() and any(p.rglob("*.parquet")))
    return out + (["."] if any(part_dir.glob("*.parquet")) else [])


def refresh_views(con: duckdb.DuckDBPyConnection, data_dir: Path, temp: bool = False) -> None:
    """(Re)point the Parquet views at the parts under `data_dir` (<home>/data); called after a writer adds parts.
    Parts DuckDB cannot read (a damaged footer) never stop the connection: only queries that reach them fail,
    with one line naming the file (`damaged_partitions`)."""
    root = Path(data_dir).absolute().parent
    for name in PARQUET_TABLES:
        try:
            con.execute(_parquet_view_sql(name, root, temp))
        except duckdb.Error:
            damaged = damaged_partitions(con, name, root)
            try:
                con.execute(_parquet_view_sql(name, root, temp, damaged))
            except duckdb.Error as exc:   # the folders disagree with each other: the whole table is unreadable
                message = f"{name} cannot be read ({first_line(exc)}); run `harvest check` to find the bad part"
                every = {folder: message for folder in _partitions(root / "data" / name)}
                con.execute(_parquet_view_sql(name, root, temp, every))


def damaged_partitions(con: duckdb.DuckDBPyConnection, name: str, root: Path) -> dict[str, str]:
    """Partition folder of `name` -> one line naming its unreadable part, for each folder DuckDB cannot bind."""
    out = {}
    for folder in _partitions(root / "data" / name):
        try:
            con.execute(f"DESCRIBE SELECT * FROM read_parquet({_quote(_glob(name, root, True, folder))}, "
                        "union_by_name=true)")
        except duckdb.Error as exc:
            out[folder] = part_damage(exc, root / "data" / name / folder)
    return out


def part_damage(exc: Exception, where: Path | None = None) -> str:
    """One line: the part (named by DuckDB, else the first under `where` whose footer pyarrow cannot read, else
    the folder) and the cure."""
    reason = first_line(exc)
    named = re.search(r"""["']([^"']+\.parquet)["']""", reason)
    if not named and where is None:
        return f"{reason}; run `harvest check --repair`"
    path = named.group(1) if named else next((str(p) for p in sorted(where.rglob("*.parquet")) if not _footer_ok(p)),
                                             str(where))
    reason = reason.replace(f"'{path}'", "").replace(f'"{path}"', "")
    return f"Parquet part {path} is damaged ({reason.strip(' :')}); run `harvest check --repair`"


def _footer_ok(path: Path) -> bool:
    try:
        pq.read_metadata(path)
        return True
    except Exception:   # any reader failure is damage here
        return False


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, without DuckDB's `Invalid Input Error: `-style prefix."""
    return re.sub(r"^[A-Z][A-Za-z ]* Error: ", "", str(exc).strip().split("\n")[0])


_READ_FAILURE = re.compile(r"Failed to read file|magic bytes|TProtocolException|Decompression|Corrupt", re.I)


def damaged_part_error(exc: BaseException) -> str | None:
    """The one-line message for a query that failed reading a damaged Parquet part (DuckDB names the file when
    a data page is bad, e.g. `Failed to read file "...": ZSTD Decompression failure`), else None."""
    if not isinstance(exc, duckdb.Error):
        return None
    text = first_line(exc)
    if "harvest check" in text:   # a damaged part's branch of the view (refresh_views)
        return text
    return part_damage(exc) if _READ_FAILURE.search(text) and ".parquet" in text else None


def connect(home, read_only: bool = False, sandbox: bool = False,
            settings: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """Open the warehouse of a :class:`pipeline.base.home.Home` (or its root path).

    Writable connections apply the schema and refresh the Parquet views stored in the file. Read-only ones
    shadow them with TEMP views of the parts on disk now. Either way the views read the home opened here.
    `sandbox` (read-only only): no file outside <home>/data can be read or written and no setting changed for
    the rest of the connection. Inside <home>/data DuckDB could still write (COPY): run only SELECTs on it.
    DuckDB settings are per database, so this also holds for other connections to the same file in this process.
    `settings` (e.g. memory_limit) are SET before the sandbox locks the configuration.
    """
    if sandbox and not read_only:
        raise ValueError("a sandboxed connection must be read-only")
    root = Path(home.root if hasattr(home, "warehouse") else home).absolute()  # a Home, or its root path
    _trace("ro" if read_only else "rw")
    db = root / "warehouse.duckdb"
    if read_only:
        if not db.exists():
            raise FileNotFoundError(f"no warehouse at {db}; run `harvest ingest ...` or `harvest demo` first")
        con = _connect_retry(db, read_only=True)
    else:
        root.mkdir(parents=True, exist_ok=True)
        con = _connect_retry(db)
    con.execute("SET file_search_path = ?", [str(root)])
    if read_only:
        shadow_missing_tables(con)
        refresh_views(con, root / "data", temp=True)
    else:
        con.execute(schema_sql())
        if not con.execute("SELECT count(*) FROM schema_version").fetchone()[0]:
            con.execute("INSERT INTO schema_version VALUES (?, now())", [SCHEMA_VERSION])
        refresh_views(con, root / "data")
    for name, value in (settings or {}).items():
        con.execute(f"SET {name} = ?", [value])
    if sandbox:
        con.execute("SET allowed_directories = ?", [[f"{root / 'data'}/"]])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


@contextmanager
def reading(home, con: duckdb.DuckDBPyConnection | None = None):
    """`con` when given (a caller reading several things on one connection), else a read-only connection of its
    own, closed afterwards."""
    if con is not None:
        yield con
        return
    con = connect(home, read_only=True)
    try:
        yield con
    finally:
        con.close()


def _trace(mode: str) -> None:
    """With $HARVEST_TRACE_CONNECT set to a file, append one line per open: pid, mode and the openers (the first
    three frames outside this module and contextlib, innermost first), so a verb's connections can be counted across its
    processes (tests/flows/test_connections.py)."""
    path = os.environ.get("HARVEST_TRACE_CONNECT")
    if not path:
        return
    frame, where = sys._getframe(1), []
    while frame and len(where) < 3:
        if frame.f_code.co_filename not in (__file__, contextlib.__file__):
            where.append(f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}")
        frame = frame.f_back
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\t{mode}\t{' < '.join(where)}\n")


def shadow_missing_tables(con: duckdb.DuckDBPyConnection) -> None:
    """An empty TEMP table of this connection for each table of the schema the file lacks: a read-only
    connection to a home written before that table existed reads it as empty (a writer's open adds it)."""
    have = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT temporary").fetchall()}
    for statement in con.extract_statements(schema_sql()):
        table = re.search(r"CREATE TABLE IF NOT EXISTS (\w+)", statement.query)
        if table and table.group(1) not in have:
            con.execute(statement.query.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))


LOCK_TIMEOUT_ENV = "HARVEST_LOCK_TIMEOUT"
WRITE_WAIT_S, READ_WAIT_S = 300.0, 10.0   # defaults; $HARVEST_LOCK_TIMEOUT (seconds) sets both
WAIT_MESSAGE = "waiting for another harvest process to release the warehouse..."


class WarehouseBusy(RuntimeError):
    """Another process held the warehouse for longer than we wait; the message is one line."""


def lock_timeout(read_only: bool) -> float:
    env = os.environ.get(LOCK_TIMEOUT_ENV)
    if env:
        return float(env)
    return READ_WAIT_S if read_only else WRITE_WAIT_S


def wait_unlocked(attempt, timeout: float, busy):
    """Call `attempt()` until it returns something other than None (None: the lock is held elsewhere), saying
    WAIT_MESSAGE once on stderr after a second of waiting; after `timeout` seconds raise `WarehouseBusy` with
    the one line `busy()` (who holds what) and how long we waited."""
    t0, said, delay = time.monotonic(), False, 0.02
    while True:
        got = attempt()
        if got is not None:
            return got
        waited = time.monotonic() - t0
        if waited >= timeout:
            raise WarehouseBusy(f"{busy()}; gave up after {waited:.0f} s (set {LOCK_TIMEOUT_ENV} to wait longer)")
        if waited >= 1.0 and not said:
            print(WAIT_MESSAGE, file=sys.stderr, flush=True)
            said = True
        time.sleep(min(delay, max(0.0, timeout - waited)))
        delay = min(delay * 1.5, 0.25)


def _connect_retry(db: Path, read_only: bool = False, timeout: float | None = None) -> duckdb.DuckDBPyConnection:
    """DuckDB allows one writing process, and no reader beside it: writers hold it only around short
    transactions, so wait for the lock (`wait_unlocked`), at most `timeout` seconds (default `lock_timeout`).
    A WAL DuckDB cannot replay raises `DamagedWAL` (a ValueError: the CLI prints its one line)."""
    last = [""]

    def attempt():
        try:
            return duckdb.connect(str(db), read_only=read_only)
        except duckdb.Error as exc:
            damaged = replay_damage(exc, db)   # a WAL DuckDB cannot replay: one line naming it, and the cure
            if damaged is not None:
                raise damaged from None
            if not isinstance(exc, duckdb.IOException) or "lock" not in str(exc).lower():
                raise
            last[0] = str(exc)
            return None

    def busy() -> str:
        return f"warehouse {db} locked by {lock_holder(last[0])}"

    return wait_unlocked(attempt, lock_timeout(read_only) if timeout is None else timeout, busy)


def lock_holder(message: str) -> str:
    """`PID 4242 (harvest sql ...)`: the process DuckDB's lock error names, with its command line where /proc
    shows it (cut at 200 characters), else `another process`."""
    pid = re.search(r"\(PID (\d+)\)", message)
    if not pid:
        return "another process"
    try:
        argv = Path(f"/proc/{pid.group(1)}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"PID {pid.group(1)}"
    command = " ".join(" ".join(argv).split())
    return f"PID {pid.group(1)}" + (f" ({command[:200]}{'...' if len(command) > 200 else ''})" if command else "")


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection):
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    else:
        con.execute("COMMIT")


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike,
                         before_commit: Callable[[Path], object] | None = None) -> Path:
    """Write `table` to `path` so that readers see either no file or the whole file. `before_commit(tmp)` runs
    on the written temp file before it is renamed to `path` (e.g. to record its checksum)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # not *.parquet: views skip it
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        if before_commit is not None:
            before_commit(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def add_reject(con: duckdb.DuckDBPyConnection, stage: str, source: str, path: str | None,
               reason: str, detail: str) -> None:
    con.execute("INSERT INTO rejects VALUES (?, ?, ?, ?, ?, now())", [stage, source, path, reason, detail])
