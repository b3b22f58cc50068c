"""Decode-once image cache (DESIGN.md section 3).

Each ingestion chunk decodes its images once, resizes them to every configured size and writes one immutable
shard per size: `cache/size=<S>/shard-<id>.u8`, raw uint8 `[n, S, S]`, written atomically (temp + rename).
The warehouse table `cache_entries(source_sha256, size, shard, row)` indexes it, committed after the shard
exists, so a killed writer leaves at most an unreferenced shard and never a dangling row.
Readers memory-map shards; nothing on the hot path decodes PNG or DICOM.
"""
from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[H, W]` -> uint8 `[size, size]`, PIL bilinear with antialiasing when shrinking."""
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def shard_path(cache_dir: Path, size: int, shard: int) -> Path:
    return Path(cache_dir) / f"size={size}" / f"shard-{shard:06d}.u8"


def write_shard(cache_dir: Path, size: int, shard: int, images: np.ndarray) -> Path:
    """Write `[n, size, size]` uint8 atomically; the shard is never modified afterwards."""
    assert images.dtype == np.uint8 and images.shape[1:] == (size, size), images.shape
    path = shard_path(cache_dir, size, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(np.ascontiguousarray(images).tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@lru_cache(maxsize=256)
def open_shard(path: str, size: int) -> np.memmap:
    n = os.path.getsize(path) // (size * size)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(n, size, size))


def _run(idx: np.ndarray):
    """`idx` as a slice when it is one increasing run (a copy from a slice is one memcpy), else as it is."""
    if len(idx) and (np.diff(idx) == 1).all():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def gather(cache_dir: Path, size: int, shards: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Fetch images by (shard, row) into one `[B, size, size]` uint8 array (`out`, e.g. page-locked memory, or a
    new one), one copy per shard: consecutive rows, the usual case, are copied straight from the memory map."""
    if out is None:
        out = np.empty((len(rows), size, size), dtype=np.uint8)
    elif out.shape != (len(rows), size, size) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {(len(rows), size, size)}, got {out.dtype} {out.shape}")
    for shard in np.unique(shards):
        sel = np.flatnonzero(shards == shard)
        mm = open_shard(str(shard_path(cache_dir, size, int(shard))), size)
        out[_run(sel)] = mm[_run(rows[sel])]
    return out
