"""Shared ingestion machinery: decode in worker processes, write cache shards, commit rows per chunk.

Each chunk is committed in one transaction after its cache shards exist, so killing ingestion at any point
and re-running it loses nothing and duplicates nothing: finished files are recognised by their sha256.
The warehouse is open only around those commits (one short connection each), never while decoding, so readers
and other writers get in between. One ingest per home at a time (`ingest_lock`); it starts by sweeping what a
killed or changed run left behind (`sweep_orphans`). Decode workers die with the ingesting process.

Items come as a list (files) or a stream (members of an archive, read in this process): at most a few per worker
are in flight, so memory stays bounded however many images a source holds. A source that turns bad after its
image was ingested (truncated, emptied, deleted) keeps its image as ingested and is reported, not rejected
(`broken_sources`): the warehouse and the cache hold the version its sha256 names.
"""
from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing as mp
import os
import re
import threading
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.base.lifeline import die_with_parent
from pipeline.images import cache
from pipeline.images.dicom import by_rows, to_uint8
from pipeline.images.rejects import MAX_PIXELS, Reject, check_file_size, check_pixels
from pipeline.runs.record import writer
from warehouse import db

log = logging.getLogger(__name__)
CHUNK = 256  # images per transaction and per cache shard
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL warns above it (silenced: decode_png rejects), raises above twice it

IMAGE_COLUMNS = ["image_id", "patient_id", "follow_up", "age", "sex", "view", "width", "height",
                 "spacing_x", "spacing_y", "split", "source", "source_sha256", "ingested_at"]


@dataclass
class Item:
    """One file to ingest. `row` holds the `images` columns known before decoding (and, for an archive member,
    `archive` and `member`: its `image_archives` row)."""
    path: str                       # absolute path of the source file (an archive member: archive/member)
    rel: str                        # path relative to the dataset root, used in rejects
    row: dict = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    data: bytes | None = None       # the bytes, already read (an archive member); None: read `path`
    fault: Reject | None = None     # known bad before decoding (missing, cut short in its archive)


@dataclass
class Decoded:
    item: Item
    sha256: str | None = None
    pixels: dict[int, np.ndarray] | None = None   # size -> uint8 [S,S]; None when already cached
    meta: dict = field(default_factory=dict)      # columns learnt from the file (width, height, ids, ...)
    reject: Reject | None = None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_png(data: bytes, suffix: str = "") -> np.ndarray:
    """PNG/other raster bytes -> uint8 gray `[H, W]`.

    Conversion rules (documented in the README): 8-bit gray is taken as is; RGB/RGBA/palette images are
    converted to gray with ITU-R 601-2 luma (alpha dropped: real NIH has a few RGBA files); 16-bit and 32-bit
    gray are min-max stretched to 8 bits; bilevel (mode '1') and other modes are rejected. The size is checked
    against MAX_PIXELS from the header, before decoding; a file whose content is not the format its name
    `suffix` promises (JPEG bytes in a .png) is rejected.
    """
    if not data:
        raise Reject("empty_file", "the file has zero bytes; re-copy it from the source archive")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixels names the size
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # over 2 * MAX_PIXELS: PIL refuses before telling the size
        raise Reject("too_many_pixels", f"PIL: {exc} That is over twice the limit of {MAX_PIXELS:,} pixels; "
                                        "set HARVEST_MAX_PIXELS to ingest larger images") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _unreadable(exc) from None
    check_pixels(*img.size)
    expected = Image.registered_extensions().get(suffix.lower())
    if expected and img.format != expected:
        raise Reject("format_mismatch", f"a {suffix} file holding {img.format} data (converted or renamed); "
                                        f"replace it with the original {expected} file")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise _unreadable(exc) from None
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("RGB", "RGBA", "P", "LA", "PA"):
        return np.asarray(img.convert("RGB").convert("L"), dtype=np.uint8)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            raise Reject("constant_image", f"{img.mode} image has a single value {lo}; nothing to see")
        return by_rows(arr, lambda b: to_uint8(b, lo, hi))  # float64 one block at a time: bounded memory
    raise Reject("bad_mode", f"unsupported image mode {img.mode!r}; expected 8-bit gray, RGB(A) or 16-bit gray")


def _unreadable(exc: Exception) -> Reject:
    what = re.sub(r" <[^<>]* at 0x[0-9a-f]+>", "", str(exc))   # PIL names its buffer object: not a fact of the file
    return Reject("unreadable_image", f"not a readable image ({type(exc).__name__}: {what}); "
                                      "the file is truncated or not an image")


def read_image_file(path) -> bytes:
    """The file's bytes, its size checked first (`file_too_large`): an absurd file is never read whole."""
    with open(path, "rb") as f:
        check_file_size(os.fstat(f.fileno()).st_size)
        return f.read()


def _decode_item(item: Item, sizes, cached: dict, decoder: Callable) -> Decoded:
    out = Decoded(item)
    data, item.data = item.data, None   # the bytes do not travel back from a worker
    try:
        if item.fault is not None:
            raise item.fault
        if data is None:
            data = read_image_file(item.path)
        out.sha256 = sha256_bytes(data) if data else None
        if out.sha256 in cached:          # decoded before: reuse the stored frame, skip the decode
            out.meta = dict(zip(("width", "height"), cached[out.sha256]))
            return out
        pixels, out.meta = decoder(data, Path(item.path).suffix)
        if pixels.ndim != 2 or min(pixels.shape) < 16:
            raise Reject("bad_shape", f"image shape {pixels.shape} is not a 2-D image of at least 16x16")
        out.meta.setdefault("height", pixels.shape[0])
        out.meta.setdefault("width", pixels.shape[1])
        out.pixels = {s: cache.resize(pixels, s) for s in sizes}
    except Reject as rej:
        out.reject = rej
    except FileNotFoundError:
        out.reject = Reject("missing_image", "the file listed in the metadata does not exist under the dataset root")
    except MemoryError:
        out.reject = Reject("out_of_memory", f"decoding ran out of memory; lower HARVEST_MAX_PIXELS (now "
                                             f"{MAX_PIXELS:,}) or ingest with fewer workers")
    except Exception as exc:  # any other decoder failure: one file's reject, never the batch's crash
        out.reject = Reject("decode_error", f"{type(exc).__name__}: {exc}")
    return out


_JOB: dict = {}   # a worker's sizes, cached shas and decoder, sent once (`_start_worker`), not with every item


def _start_worker(parent: int, job: dict) -> None:
    die_with_parent(parent)
    _JOB.update(job)


def _decode_job(item: Item) -> Decoded:
    return _decode_item(item, **_JOB)


def decode_all(items: Iterable[Item], sizes, cached: dict, decoder: Callable, workers: int | None,
               total: int) -> Iterator[Decoded]:
    """Decode in worker processes (spawned: safe beside Prefect's and torch's threads), in input order, with at
    most 4 items per worker in flight: `items` may be a stream of bytes read from an archive."""
    job = {"sizes": tuple(sizes), "cached": cached, "decoder": decoder}
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or total < 64:
        yield from (_decode_item(it, **job) for it in items)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                             initargs=(os.getpid(), job)) as pool:
        pending: deque = deque()
        for it in items:
            pending.append(pool.submit(_decode_job, it))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def cached_shas(con, sizes) -> dict:
    """sha256 -> (width, height) of sources already ingested and cached at every requested size."""
    rows = con.execute("""
        SELECT c.source_sha256, any_value(i.width), any_value(i.height)
        FROM cache_entries c JOIN images i USING (source_sha256)
        WHERE c.size IN (SELECT unnest(?)) GROUP BY 1 HAVING count(DISTINCT c.size) = ?""",
                       [list(sizes), len(sizes)]).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def next_shard(con, home) -> int:
    used = con.execute("SELECT coalesce(max(shard) + 1, 0) FROM cache_entries").fetchone()[0]
    on_disk = [int(p.stem.split("-")[1]) + 1 for p in Path(home.cache).glob("size=*/shard-*.u8")]
    return max([used, *on_disk])


_HELD: dict[str, list] = {}   # lock file -> [fd, depth]: an ingest inside an ingest of this process holds it already
_HELD_GUARD = threading.Lock()


@contextmanager
def ingest_lock(home):
    """One ingest per home at a time (an exclusive `flock` on cache/.ingest.lock, released by the kernel when
    its process dies): shard numbers and the orphan sweep are safe from a concurrent ingest. Waits like a
    warehouse connection (message, then `WarehouseBusy` after `db.lock_timeout`). Re-entrant in a process."""
    import fcntl

    path = str(Path(home.cache) / ".ingest.lock")
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held:
            held[1] += 1
    if not held:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

        def attempt():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            return True

        def busy() -> str:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return f"another ingest into {home.root} is running" + (f" (pid {holder})" if holder else "")

        try:
            db.wait_unlocked(attempt, db.lock_timeout(read_only=False), busy)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        with _HELD_GUARD:
            _HELD[path] = held = [fd, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[path]
                os.close(held[0])   # releases the flock


def sweep_orphans(home) -> dict:
    """Remove what a killed ingest or a changed image left behind (call it holding `ingest_lock`):
    `cache_entries` rows whose source no image references, then shard files (and temp files) no row
    references. Rows go first, in one transaction: a kill in between leaves only unreferenced files."""
    con = writer(home)
    try:
        with db.transaction(con):
            rows = con.execute("""DELETE FROM cache_entries WHERE source_sha256 NOT IN
                (SELECT source_sha256 FROM images WHERE source_sha256 IS NOT NULL)""").fetchone()[0]
            con.execute("""DELETE FROM cache_checksums k WHERE NOT EXISTS (SELECT 1 FROM cache_entries c
                WHERE c.source_sha256 = k.source_sha256 AND c.size = k.size)""")
        used = set(con.execute("SELECT DISTINCT size, shard FROM cache_entries").fetchall())
    finally:
        con.close()
    files = 0
    for path in Path(home.cache).glob("size=*/*"):
        if path.name.startswith(".shard-") and path.name.endswith(".tmp"):   # a shard write cut short
            orphan = True
        elif path.suffix == ".u8" and path.name.startswith("shard-"):
            orphan = (int(path.parent.name.split("=")[1]), int(path.stem.split("-")[1])) not in used
        else:
            continue
        if orphan:
            path.unlink(missing_ok=True)
            files += 1
    return {"orphan_cache_rows": rows, "orphan_cache_files": files}


def add_cache_rows(con, rows: list[tuple[str, int, int, int, int]]) -> None:
    """Insert or replace `cache_entries` and `cache_checksums` rows: (source_sha256, size, shard, row, crc32)."""
    entries = pd.DataFrame(rows, columns=["source_sha256", "size", "shard", "row", "crc32"])
    con.register("_ce", entries)
    con.execute("INSERT OR REPLACE INTO cache_entries SELECT source_sha256, size, shard, row FROM _ce")
    con.execute("INSERT OR REPLACE INTO cache_checksums SELECT source_sha256, size, crc32 FROM _ce")
    con.unregister("_ce")


def reject_rows(con, stage: str, source: str, rejects: Iterable[tuple[str, Reject]]) -> int:
    """Insert rejects not already recorded for (stage, source, path, reason): re-runs add no duplicates."""
    df = pd.DataFrame([(stage, source, p, r.reason, r.detail) for p, r in rejects],
                      columns=["stage", "source", "path", "reason", "detail"])
    if df.empty:
        return 0
    con.register("_rej", df)
    con.execute("""INSERT INTO rejects SELECT r.*, now() FROM _rej r WHERE NOT EXISTS (
        SELECT 1 FROM rejects o WHERE o.stage = r.stage AND o.source = r.source
          AND o.path IS NOT DISTINCT FROM r.path AND o.reason = r.reason)""")
    con.unregister("_rej")
    return len(df)


def clear_rejects(con, stage: str, source: str, paths: list[str]) -> None:
    """A file that now ingests cleanly drops its old rejects."""
    if paths:
        con.execute("DELETE FROM rejects WHERE stage = ? AND source = ? AND path IN (SELECT unnest(?))",
                    [stage, source, paths])


def upsert_images(con, rows: list[dict], labels: dict[str, list[str]]) -> None:
    """Insert or replace `images` rows, replace their `labels` and their `image_archives` rows (a row with
    `archive` and `member` came from an archive; one without, from a file or the metadata alone)."""
    if not rows:
        return
    df = pd.DataFrame(rows).reindex(columns=IMAGE_COLUMNS)
    df["ingested_at"] = pd.Timestamp.now()
    con.register("_img", df)
    con.execute(f"INSERT OR REPLACE INTO images SELECT {', '.join(IMAGE_COLUMNS)} FROM _img")
    con.unregister("_img")
    ids = [r["image_id"] for r in rows]
    con.execute("DELETE FROM labels WHERE image_id IN (SELECT unnest(?))", [ids])
    con.execute("DELETE FROM image_archives WHERE image_id IN (SELECT unnest(?))", [ids])
    members = [(r["image_id"], r["archive"], r["member"]) for r in rows if r.get("archive")]
    if members:
        con.executemany("INSERT INTO image_archives VALUES (?, ?, ?)", members)
    lab = pd.DataFrame([(iid, f) for iid, fs in labels.items() for f in fs], columns=["image_id", "finding"])
    if not lab.empty:
        con.register("_lab", lab)
        con.execute("INSERT INTO labels SELECT image_id, finding FROM _lab")
        con.unregister("_lab")


def broken_line(d: Decoded) -> str:
    """One line for a source that turned bad after its image was ingested: the image keeps that version."""
    return (f"{d.item.rel}: ingested before, now {d.reject.reason} ({d.reject.detail}); the warehouse and the "
            "cache keep the version ingested: restore the file, or re-ingest it once it is good")


def ingest_images(home, items: Iterable[Item], sizes, stage: str, source: str, decoder: Callable,
                  workers: int | None = None, desc: str = "ingest", total: int | None = None) -> dict:
    """Decode `items` (a list, or a stream of `total` items), cache them at `sizes` and commit
    `images`/`labels`/`cache_entries`, chunk by chunk.

    The warehouse is opened for the sweep and the cached shas, then once per chunk commit; decoding runs with
    no connection open. A bad file whose image id was ingested before is `broken_sources`, not a reject."""
    total = len(items) if total is None else total
    counts = {"images": 0, "decoded": 0, "skipped_cached": 0, "rejects": 0, "broken_sources": 0}
    with ingest_lock(home):
        swept = sweep_orphans(home)
        if any(swept.values()):
            log.info("swept %s", ", ".join(f"{k}={v}" for k, v in swept.items()))
        con = writer(home)
        try:
            cached = cached_shas(con, sizes)
            shard = next_shard(con, home)
            ingested = {r[0] for r in con.execute("SELECT image_id FROM images WHERE source_sha256 IS NOT NULL")
                        .fetchall()}
        finally:
            con.close()
        chunk: list[Decoded] = []
        bar = tqdm(total=total, desc=desc, unit="img", disable=total < 64)

        def commit(chunk: list[Decoded]) -> None:
            nonlocal shard
            fresh = [d for d in chunk if d.reject is None and d.pixels is not None]
            for size in sizes:
                if fresh:
                    cache.write_shard(home.cache, size, shard, np.stack([d.pixels[size] for d in fresh]))
            ok = [d for d in chunk if d.reject is None]
            rows, labels = [], {}
            for d in ok:
                row = {**d.item.row, **{k: v for k, v in d.meta.items() if k in IMAGE_COLUMNS},
                       "source_sha256": d.sha256}
                if not row.get("image_id"):   # a DICOM whose content is already ingested: nothing new
                    continue
                rows.append(row)
                labels[row["image_id"]] = d.item.labels
            broken = [d for d in chunk if d.reject and d.item.row.get("image_id") in ingested]
            rejected = [d for d in chunk if d.reject and d.item.row.get("image_id") not in ingested]
            for d in broken:
                log.warning("%s", broken_line(d))
            con = writer(home)
            try:
                with db.transaction(con):
                    upsert_images(con, rows, labels)
                    if fresh:
                        add_cache_rows(con, [(d.sha256, s, shard, k, cache.checksum(d.pixels[s]))
                                             for s in sizes for k, d in enumerate(fresh)])
                    clear_rejects(con, stage, source, [d.item.rel for d in ok + broken])
                    counts["rejects"] += reject_rows(con, stage, source,
                                                     [(d.item.rel, d.reject) for d in rejected])
            finally:
                con.close()
            if fresh:
                shard += 1
            counts["images"] += len(rows)
            counts["broken_sources"] += len(broken)
            counts["decoded"] += len(fresh)
            counts["skipped_cached"] += len(ok) - len(fresh)

        for d in decode_all(items, sizes, cached, decoder, workers, total):
            chunk.append(d)
            bar.update(1)
            if len(chunk) >= CHUNK:
                commit(chunk)
                chunk = []
        if chunk:
            commit(chunk)
        bar.close()
    return counts
