"""Small file helpers shared by the pipeline."""
from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoints and CTs are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class NoSpace(ValueError):
    """Not enough free disk for a job whose size is known beforehand (the CLI prints it as one line)."""


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system of `path`, or of its nearest existing parent."""
    import shutil
    where = os.path.abspath(path)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    return shutil.disk_usage(where).free


def require_free(path: str | os.PathLike, need: int, what: str, margin: float = 1.1) -> None:
    """Raise :class:`NoSpace` unless `path`'s file system has `need` bytes (times `margin`) free."""
    free = free_bytes(path)
    if need * margin > free:
        raise NoSpace(f"{what} needs about {need / 2**20:,.0f} MiB in {path}, and {free / 2**20:,.0f} MiB are free "
                      "there; free some space or choose another folder")
