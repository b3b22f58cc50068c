"""Decode-once image cache (docs/design.md#data-contracts).

Each ingestion chunk decodes its images once, resizes them to every configured size and writes one immutable
shard per size: `cache/size=<S>/shard-<id>.u8`, raw uint8 `[n, S, S]`, written atomically (temp + rename).
The warehouse table `cache_entries(source_sha256, size, shard, row)` indexes it, committed after the shard
exists, so a killed writer leaves at most an unreferenced shard and never a dangling row; `cache_checksums`
holds the crc32 of each row's bytes (`checksum`), which `harvest check` and mining verify.
Readers read shards with `os.preadv` straight into their batch buffers; nothing on the hot path decodes PNG or DICOM.
"""
from __future__ import annotations

import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.base.files import write_atomic


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[H, W]` -> uint8 `[size, size]`, PIL bilinear with antialiasing when shrinking."""
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def shard_path(cache_dir: Path, size: int, shard: int) -> Path:
    return Path(cache_dir) / f"size={size}" / f"shard-{shard:06d}.u8"


def write_shard(cache_dir: Path, size: int, shard: int, images: np.ndarray) -> Path:
    """Write `[n, size, size]` uint8 atomically; the shard is never modified afterwards."""
    assert images.dtype == np.uint8 and images.shape[1:] == (size, size), images.shape
    return write_atomic(shard_path(cache_dir, size, shard), memoryview(np.ascontiguousarray(images)).cast("B"))


def checksum(image: np.ndarray) -> int:
    """crc32 of one cached image's bytes (zlib's, which releases the GIL: a read-ahead thread verifies while
    the model runs)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(image)).cast("B"))


class DamagedCache(ValueError):
    """A cached image whose bytes are not the ones cached (one line: the image, the shard file and row)."""


class _Shard:
    """A shard's open descriptor, closed when the last holder lets go (an evicted entry still being read by
    another thread stays open until that read ends). `os.preadv` takes an offset: no shared file position."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        os.close(self.fd)


@lru_cache(maxsize=64)
def _open(path: str, inode: int, mtime_ns: int) -> _Shard:
    return _Shard(path)


def _shard(path: str) -> _Shard:
    """The open shard at `path`, keyed by its inode too: a home deleted and rebuilt in the same process gets
    its new files, never a stale descriptor of the old ones."""
    st = os.stat(path)
    return _open(path, st.st_ino, st.st_mtime_ns)


def _read_into(path: str, dest: np.ndarray, offset: int) -> None:
    """Read `dest.nbytes` bytes of `path` at `offset` straight into `dest` (C-contiguous)."""
    shard, view, done = _shard(path), memoryview(dest).cast("B"), 0
    while done < len(view):
        got = os.preadv(shard.fd, [view[done:]], offset + done)
        if got == 0:
            raise IndexError(f"{path}: row past the end of the shard ({os.path.getsize(path)} bytes, "
                             f"read asked up to byte {offset + len(view)})")
        done += got


def gather(cache_dir: Path, size: int, shards: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Fetch images by (shard, row) into one `[B, size, size]` uint8 array: `out` (e.g. page-locked memory for
    a GPU) or a new one. One read per run of consecutive rows of a shard (a mining batch is one run); files are
    read, not memory-mapped, so the pages read do not count to the reader's resident memory (flat RSS however
    many images a process streams through)."""
    if out is None:
        out = np.empty((len(rows), size, size), dtype=np.uint8)
    elif out.shape != (len(rows), size, size) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 {(len(rows), size, size)}, got {out.dtype} {out.shape}")
    image = size * size
    j = 0
    while j < len(rows):
        k = j + 1
        while k < len(rows) and shards[k] == shards[j] and rows[k] == rows[k - 1] + 1:
            k += 1
        _read_into(str(shard_path(cache_dir, size, int(shards[j]))), out[j:k], int(rows[j]) * image)
        j = k
    return out
