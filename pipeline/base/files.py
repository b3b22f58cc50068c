"""Small file helpers shared by the pipeline: sha256, atomic writes, and the sha256 recorded beside a file.

A file the pipeline commits (a mined Parquet part, a checkpoint) gets `<name>.sha256` beside it, in the format
of `sha256sum` (so `sha256sum -c part-00000.parquet.sha256` checks it without project code). The record is
written before the file is renamed into place: a kill in between leaves a record that does not match an older
file of that name, which reads as damage (rebuilt), never as a good file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

CHECKSUM_SUFFIX = ".sha256"


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


def write_atomic(path: str | os.PathLike, data) -> Path:
    """Write `data` (bytes or any buffer, e.g. a C-contiguous array) so that readers see no file or all of it:
    a temp file `.<name>.*.tmp` in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def checksum_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def record_sha256(written: str | os.PathLike, path: str | os.PathLike) -> str:
    """Record the sha256 of `written` (the temp file about to become `path`, or `path` itself) as `path`'s."""
    digest = sha256_file(written)
    write_atomic(checksum_path(path), f"{digest}  {Path(path).name}\n".encode())
    return digest


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 recorded for `path`, None when there is no record (files written before records existed)."""
    try:
        words = checksum_path(path).read_text(errors="replace").split()
    except FileNotFoundError:
        return None
    return words[0] if words else ""


def matches_record(path: str | os.PathLike) -> bool | None:
    """True or False: `path` has or lacks its recorded sha256; None: nothing recorded (unknown)."""
    recorded = recorded_sha256(path)
    return None if recorded is None else recorded == sha256_file(path)
