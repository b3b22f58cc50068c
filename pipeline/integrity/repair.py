"""Repair what `pipeline.integrity.check` found: rebuild it, else move it to `<home>/quarantine/<stamp>/`.

A file is moved to quarantine before it is rebuilt and dropped from there once the rebuild is in place, so a
rebuild that fails leaves it quarantined (nothing reads it, nothing is lost). Cache rows are decoded again from
their sources (found under the recorded ingest roots, by name and then by content, or read from the NIH archive
`image_archives` names) into a new shard, and their
`cache_entries` rows point there; parts of a `harvest mine` run are mined again from the run's recorded config;
registered checkpoints are trained again from the config in `models`. Rows of the warehouse stay, but for the
index rows of cache images whose source is gone.
"""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.base.files import checksum_path, matches_record, record_sha256, sha256_file
from pipeline.base.home import Home
from pipeline.images import cache
from pipeline.ingest.common import add_cache_rows, decode_png, ingest_lock, next_shard, sha256_bytes
from pipeline.integrity.check import Problem
from pipeline.runs.record import ingest_roots, writer
from warehouse import db


class Unrepairable(Exception):
    """Why a thing cannot be rebuilt here, and what rebuilds it."""


class Repair:
    def __init__(self, home, say: Callable[[str], None] = print):
        self.home, self.say = Home.resolve(home), say
        self.folder = self.home.root / "quarantine" / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    def run(self, problems: list[Problem]) -> None:
        for p in problems:
            if p.kind == "wal":   # first: every other repair opens the warehouse
                self.wal(p)
        if any(p.kind == "run" for p in problems):
            writer(self.home).close()   # marks the runs of dead processes killed
            self.say("repaired: runs of dead processes marked killed")
        cached = [p for p in problems if p.kind == "cache"]
        if cached:
            self.cache(cached)
        for p in problems:
            if p.kind in ("checkpoint", "export"):
                try:
                    getattr(self, p.kind)(p)
                except Exception as exc:   # what cannot be rebuilt is quarantined (a failed rebuild left it there)
                    self.failed(p.path, exc)
        parts = [p for p in problems if p.kind == "part"]
        if parts:   # after the cache and the checkpoints they are mined from
            self.parts(parts)

    def failed(self, path: Path, exc: Exception) -> None:
        """`path` could not be rebuilt: in quarantine (moved there now, or by the rebuild that failed)."""
        where = self.quarantine(path) if path.exists() else self.dest(path)
        self.say(f"quarantined: {path} -> {where}: {' '.join(str(exc).split())[:300]}")

    def dest(self, path: Path) -> Path:
        return self.folder / path.relative_to(self.home.root)

    def quarantine(self, path: Path) -> Path:
        dest = self.dest(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        if checksum_path(path).exists():
            os.replace(checksum_path(path), checksum_path(dest))
        return dest

    @contextmanager
    def rebuilt(self, path: Path, how: str):
        """Quarantine `path`, let the caller rebuild it, drop the quarantined copy once that worked."""
        moved = self.quarantine(path) if path.exists() else None
        yield
        if moved is not None:
            shutil.rmtree(moved) if moved.is_dir() else moved.unlink()
            checksum_path(moved).unlink(missing_ok=True)
        self.say(f"repaired: {path}: {how}")

    def wal(self, p: Problem) -> None:
        """Keep the whole transactions before the damage: a copy of the WAL goes to quarantine, the WAL is cut
        there and a writer's open replays it into the warehouse (DuckDB checkpoints it on close). What came after
        is lost as if its writer had been killed before it: the command that was killed does it again."""
        dest = self.dest(p.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p.path, dest)
        with open(p.path, "r+b") as f:
            f.truncate(p.data["at"])
        db.connect(self.home).close()
        self.say(f"repaired: {p.path}: the whole transactions before byte {p.data['at']} replayed into the "
                 f"warehouse, the WAL copied to {dest}; run again the command that was killed")

    # ---- cache -------------------------------------------------------------------------------------

    def cache(self, problems: list[Problem]) -> None:
        """Decode the damaged rows again into one new shard per size; rows whose source is gone are dropped
        from the index (their image stays; `harvest ingest` caches it again once the file is back)."""
        wanted = {(sha, p.data["size"]) for p in problems for sha in p.data["sources"]}
        with ingest_lock(self.home):
            con = db.connect(self.home, read_only=True)
            try:
                images = {sha: (iid, source) for sha, iid, source in con.execute(
                    "SELECT source_sha256, min(image_id), min(source) FROM images WHERE source_sha256 IN "
                    "(SELECT unnest(?)) GROUP BY 1", [sorted({s for s, _ in wanted})]).fetchall()}
                roots, shard = ingest_roots(con, self.home), next_shard(con, self.home)
            finally:
                con.close()
            pixels = {sha: self.decode(sha, *images[sha], roots) for sha in images}
            pixels.update(self.from_archives({images[sha][0]: sha for sha in images if pixels[sha] is None
                                              and images[sha][1] != "dicom"}, roots))
            rows, lost, stacks = [], [], {}
            for sha, size in sorted(wanted):
                if pixels.get(sha) is None:
                    lost.append((sha, size))
                    continue
                stack = stacks.setdefault(size, [])
                stack.append(cache.resize(pixels[sha], size))
                rows.append((sha, size, shard, len(stack) - 1, cache.checksum(stack[-1])))
            for size, stack in stacks.items():
                cache.write_shard(self.home.cache, size, shard, np.stack(stack))
            con = writer(self.home)
            try:
                with db.transaction(con):
                    if rows:
                        add_cache_rows(con, rows)
                    for table in ("cache_entries", "cache_checksums") if lost else ():
                        con.executemany(f"DELETE FROM {table} WHERE source_sha256 = ? AND size = ?", lost)
                used = set(con.execute("SELECT DISTINCT size, shard FROM cache_entries").fetchall())
            finally:
                con.close()
        for p in problems:
            if (p.data["size"], p.data["shard"]) not in used and p.path.exists():
                self.say(f"quarantined: {p.path} -> {self.quarantine(p.path)}: no row reads it any more")
        self.say(f"repaired: {len(rows)} cached image(s) decoded again from their sources into shard {shard}"
                 + (f"; {len(lost)} whose source was not found left the cache (ingest it again)" if lost else ""))

    def decode(self, sha: str, image_id: str, source: str, roots: list[Path]) -> np.ndarray | None:
        """The pixels of the source file of content `sha` (NIH layout: by name; DICOM: by content), or None."""
        for root in roots:
            path = self.sources(root, source == "dicom").get(sha if source == "dicom" else image_id)
            if path is None or sha256_file(path) != sha:
                continue
            data = path.read_bytes()
            if source == "dicom":
                from pipeline.images.dicom import read_dicom
                from pipeline.ingest.dicom import home_salt
                return read_dicom(io.BytesIO(data), salt=home_salt(self.home)).pixels
            return decode_png(data, path.suffix)
        return None

    def from_archives(self, wanted: dict[str, str], roots: list[Path]) -> dict[str, np.ndarray]:
        """sha256 -> pixels of the images `wanted` (image id -> sha256) that were read from NIH's archives, each
        archive under the roots read once; a member whose bytes are not the ones ingested is left out."""
        from pipeline.ingest.archives import read_members, recorded

        con = db.connect(self.home, read_only=True)
        try:
            found = recorded(con, wanted, roots)
        finally:
            con.close()
        by_archive: dict[Path, dict[str, str]] = {}
        for iid, (archive, member, _) in found.items():
            by_archive.setdefault(archive, {})[iid] = member
        out = {}
        for archive, names in by_archive.items():
            for iid, data in read_members(archive, names):
                if sha256_bytes(data) == wanted[iid]:
                    out[wanted[iid]] = decode_png(data, Path(names[iid]).suffix)
        return out

    @functools.cache
    def sources(self, root: Path, dicom: bool) -> dict[str, Path]:
        """The files of an ingest root, once: NIH layout by name; DICOM by content (names may carry PHI)."""
        from pipeline.ingest.dicom import dicom_files
        from pipeline.ingest.layout import image_files

        if not root.is_dir():
            return {}
        return {sha256_file(p): p for p in dicom_files(root)} if dicom else image_files(root)

    # ---- one file each -----------------------------------------------------------------------------

    def checkpoint(self, p: Problem) -> None:
        from pipeline.training.checkpoint import model_row
        from pipeline.training.stages import home_plans, resolved_config, train

        if p.data.get("record_only"):
            record_sha256(p.path, p.path)
            self.say(f"repaired: {checksum_path(p.path)}: written again from the file, which matches models")
            return
        if p.data["model_id"] is None:   # resume state (last.pt, best.pt): the stage starts over without it
            if matches_record(p.path):   # written again meanwhile, by a stage trained again above
                return
            raise Unrepairable("resume state: `harvest train` starts the stage over without it")
        row = model_row(self.home, p.data["model_id"])
        config = json.loads(row["config"]) if isinstance(row["config"], str) else row["config"]
        if row["stage"] == "detector" or not config:
            raise Unrepairable(f"model {row['model_id']}: train it again with `harvest detector train`")
        if row["model_id"] not in [s.model_id for s in home_plans(self.home, resolved_config(config))]:
            raise Unrepairable(f"the config recorded for {row['model_id']} no longer plans it; train it again")
        with self.rebuilt(p.path, f"stage {row['model_id']} trained again"):
            train(self.home, config)

    def parts(self, problems: list[Problem]) -> None:
        """Mine the damaged shards of each `harvest mine` run again: all of a run's damaged parts are quarantined
        first, so the shard plan reads only its good ones."""
        for run_id in sorted({p.data["run_id"] for p in problems}):
            damaged = [p for p in problems if p.data["run_id"] == run_id]
            try:
                self.mine_again(run_id, damaged)
            except Exception as exc:   # left in quarantine, with the reason
                for p in damaged:
                    self.failed(p.path, exc)

    def mine_again(self, run_id: str, damaged: list[Problem]) -> None:
        from pipeline.config.mining import MiningConfig
        from pipeline.mining import mine_shard
        from pipeline.runs.parts import finished_parts, list_images, plan_shards, run_dir, write_part
        from pipeline.training.checkpoint import load_model

        con = db.connect(self.home, read_only=True)
        try:
            run = con.execute("SELECT flow, params, model_id FROM runs WHERE run_id = ?", [run_id]).fetchone()
        finally:
            con.close()
        if not run or run[0] != "mine":
            raise Unrepairable(f"part of a {run[0] if run else 'unrecorded'} run: run it again to rebuild it")
        params = json.loads(run[1]) if isinstance(run[1], str) else run[1]
        config = MiningConfig.from_dict(params["config"])
        moved = {p.data["shard"]: (p.path, self.quarantine(p.path)) for p in damaged if p.path.exists()}
        jobs = dict(plan_shards(list_images(self.home, params["split"]), params["shard_size"],
                                finished_parts(run_dir(self.home, run_id))))
        if any(shard not in jobs for shard in moved):
            raise Unrepairable("the run's images changed since it was mined: run `harvest mine` again")
        model = load_model(self.home, run[2], device=config.device)[0]
        for shard, (path, copy) in moved.items():
            ids = jobs[shard]
            write_part(self.home, run_id, shard, mine_shard(self.home, run[2], ids, config, run_id, model=model), ids)
            copy.unlink()
            checksum_path(copy).unlink(missing_ok=True)
            self.say(f"repaired: {path}: shard {shard} of {run_id} mined again")

    def export(self, p: Problem) -> None:
        """An export is the output of a command the user chose (format, filters, images): quarantined, and the
        command that writes it again named."""
        raise Unrepairable(f"`{p.data['command']}` writes it again" if p.data.get("command") else
                           "run `harvest export` again to write it")
