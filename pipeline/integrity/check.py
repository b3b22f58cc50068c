"""Find what in a home does not match what the warehouse says (`pipeline.integrity`): one `Problem` each."""
from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq

from pipeline.base.files import matches_record, sha256_file
from pipeline.base.home import Home
from pipeline.images import cache
from pipeline.runs.record import dead_runs
from warehouse import db, wal

MANIFEST = "manifest.json"   # pipeline.export.write.MANIFEST: an export's files and their sha256


@dataclass
class Problem:
    kind: str                  # wal | part | cache | checkpoint | run | export
    path: Path | None          # the file (or folder) at fault
    what: str                  # why, in a few words
    data: dict = field(default_factory=dict)   # what repair needs (run id, shard, cache keys, model id ...)

    def line(self) -> str:
        return f"{self.kind}: {self.path}: {self.what}" if self.path else f"{self.kind}: {self.what}"


def check_home(home) -> list[Problem]:
    """Every problem of the home, in the order repair takes them (WAL, cache, checkpoints, parts, runs, exports)."""
    home = Home.resolve(home)
    with checked_warehouse(home) as (con, wal):
        entries = con.execute("""SELECT c.source_sha256, c.size, c.shard, c.row, k.crc32 FROM cache_entries c
            LEFT JOIN cache_checksums k USING (source_sha256, size) ORDER BY c.size, c.shard, c.row""").fetchall()
        models = con.execute("SELECT model_id, stage, checkpoint, checkpoint_sha256 FROM models ORDER BY 1").fetchall()
        dead = dead_runs(con)
    return [*wal, *cache_problems(home, entries), *checkpoint_problems(home, models), *part_problems(home),
            *(Problem("run", None, f"run {r} is marked running but its process is gone", {"run_id": r}) for r in dead),
            *export_problems(home)]


def wal_problems(home) -> list[Problem]:
    """The WAL's problem, if it has one (`checked_warehouse`)."""
    with checked_warehouse(Home.resolve(home)) as (_, wal):
        return wal


@contextmanager
def checked_warehouse(home: Home):
    """(a read-only connection, [the WAL's problem]). DuckDB refuses a WAL whose entry does not match its checksum
    (`db.DamagedWAL`) and silently skips one whose frames are broken (`warehouse.wal.damage`, read while the
    connection's lock keeps writers out). With a WAL DuckDB refuses, the connection reads a copy of the warehouse
    with the WAL cut where repair cuts it, so the rest of the home is checked against what repair leaves."""
    try:
        con = db.connect(home, read_only=True)
    except db.DamagedWAL as exc:
        with tempfile.TemporaryDirectory(prefix="harvest-check-") as tmp:
            copy = Path(tmp) / home.warehouse.name
            shutil.copyfile(home.warehouse, copy)
            found = wal.damage(exc.path)
            at = min(exc.at, found.at) if found else exc.at
            wal.wal_path(copy).write_bytes(exc.path.read_bytes()[:at])
            con = duckdb.connect(str(copy), read_only=True)
            try:
                yield con, [Problem("wal", exc.path, exc.reason, {"at": at})]
            finally:
                con.close()
        return
    try:
        found = wal.damage(wal.wal_path(home.warehouse))
        yield con, [Problem("wal", found.path, found.reason, {"at": found.at})] if found else []
    finally:
        con.close()


def cache_problems(home: Home, entries: list[tuple]) -> list[Problem]:
    """One problem per shard file with rows missing, past its end or not matching their crc32."""
    by_shard = defaultdict(list)
    for sha, size, shard, row, crc in entries:
        by_shard[(size, shard)].append((sha, row, crc))
    out = []
    for (size, shard), rows in by_shard.items():
        path = cache.shard_path(home.cache, size, shard)
        bad, why = [], ""
        if not path.exists():
            bad, why = rows, "missing"
        else:
            image = size * size
            length = path.stat().st_size
            short = [r for r in rows if (r[1] + 1) * image > length]
            data = np.fromfile(path, dtype=np.uint8, count=length // image * image).reshape(-1, size, size)
            flipped = [r for r in rows if r not in short and r[2] is not None and cache.checksum(data[r[1]]) != r[2]]
            bad = short + flipped
            why = "; ".join(w for w in (f"{len(short)} row(s) past its end ({length} bytes)" if short else "",
                                        f"row(s) {', '.join(str(r[1]) for r in flipped[:8])}"
                                        f"{' ...' if len(flipped) > 8 else ''} do not match their crc32"
                                        if flipped else "") if w)
        if bad:
            out.append(Problem("cache", path, why, {"size": size, "shard": shard, "sources": [r[0] for r in bad]}))
    return out


def checkpoint_problems(home: Home, models: list[tuple]) -> list[Problem]:
    """Registered checkpoints against `models`; every other checkpoint file against the sha256 beside it."""
    out, registered = [], set()
    for model_id, stage, rel, sha in models:
        path = home.root / rel
        registered.add(path)
        why = "missing" if not path.exists() else \
            None if sha256_file(path) == sha else "does not match the sha256 recorded in models"
        if why:
            out.append(Problem("checkpoint", path, f"{why} (model {model_id})", {"model_id": model_id, "stage": stage}))
        elif matches_record(path) is False:   # the file is the registered one: only the record beside it is bad
            out.append(Problem("checkpoint", path, "matches models but not the sha256 recorded beside it",
                               {"model_id": model_id, "record_only": True}))
    for path in sorted(home.checkpoints.glob("*/*.pt")):
        if path not in registered and matches_record(path) is False:
            out.append(Problem("checkpoint", path, "does not match its recorded sha256", {"model_id": None}))
    return out


def part_problems(home: Home) -> list[Problem]:
    """Parts against their recorded sha256; a part without one (written before records) must read whole."""
    out = []
    for path in sorted((home.data / "mined_boxes").rglob("*.parquet")):
        ok = matches_record(path)
        why = "does not match its recorded sha256" if ok is False else None
        if ok is None:
            try:
                pq.read_table(path)
            except Exception as exc:   # any reader failure: the part cannot be used
                why = f"cannot be read ({' '.join(str(exc).split())[:200]})"
        if why:
            run = path.parent.name.partition("=")[2]
            out.append(Problem("part", path, why, {"run_id": run, "shard": int(path.stem.split("-")[-1])}))
    return out


def export_problems(home: Home) -> list[Problem]:
    """Each export's files against the sha256 its manifest lists (the images it links are the sources'), with the
    command that writes it again."""
    out = []
    for manifest in sorted(home.exports.rglob(MANIFEST)):
        folder = manifest.parent
        try:
            recorded = json.loads(manifest.read_text())
            files = recorded["files"]
        except (ValueError, KeyError, TypeError) as exc:
            out.append(Problem("export", folder, f"{MANIFEST} cannot be read ({exc}); write it again with "
                                                 f"`harvest export --run RUN --format FORMAT --out {folder}`"))
            continue
        bad = [rel for rel, sha in files.items()
               if not (folder / rel).is_file() or sha256_file(folder / rel) != sha]
        if bad:
            command = export_command(home, folder, recorded)
            out.append(Problem("export", folder, f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                                                 f"missing or not matching {MANIFEST}; `{command}` writes it again",
                               {"command": command}))
    return out


def export_command(home: Home, folder: Path, manifest: dict) -> str:
    """The `harvest export` that wrote `folder`, from what its manifest records (run, format, filters, images)."""
    if not manifest.get("run_id") or not manifest.get("format"):
        return f"harvest export --run RUN --format FORMAT --out {shlex.quote(str(folder))}"
    filters = manifest.get("filters") or {}
    args = ["harvest", "export", "--run", manifest["run_id"], "--format", manifest["format"]]
    if filters.get("min_score") is not None:
        args += ["--min-score", str(filters["min_score"])]
    ranks = filters.get("ranks", [1])
    if ranks != [1]:
        args += ["--ranks", *(["all"] if ranks is None else map(str, ranks))]
    if filters.get("findings"):
        args += ["--findings", *filters["findings"]]
    mode = (manifest.get("images") or {}).get("mode", "link")
    if mode != "link":
        args += ["--images", mode]
    if folder != home.exports / manifest["run_id"] / manifest["format"]:
        args += ["--out", str(folder)]
    return " ".join(shlex.quote(a) for a in args)
