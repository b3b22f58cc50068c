"""NIH's own download read as it comes: `images_001.tar.gz` .. `images_012.tar.gz` beside the CSVs.

Each archive is read once, front to back, as a stream (gzip, then tarfile's stream mode `r|`): nothing is
extracted to disk and one member at a time is in memory, its size checked from its tar header before it is read
(`check_file_size`). Members are matched by file name (`images/00000001_000.png` -> `00000001_000.png`); the
first archive holding a name wins, as the first folder does for extracted files. A stream that breaks (a
truncated download, flipped bits: gzip checks its CRC32 and length at the end) ends that archive: the members
before the break are used, the member it cut is a reject, the archive gets a reject row naming the break, and
the other archives go on.
"""
from __future__ import annotations

import gzip
import tarfile
import zlib
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from pipeline.images.rejects import Reject, check_file_size

ARCHIVE_GLOB = "images_*.tar.gz"
_BROKEN = (tarfile.TarError, EOFError, OSError, zlib.error)   # gzip.BadGzipFile is an OSError


def archive_files(root) -> list[Path]:
    """The official archives directly under `root`, in name order."""
    return sorted(p for p in Path(root).glob(ARCHIVE_GLOB) if p.is_file())


@dataclass
class Member:
    """A wanted member of an archive: its bytes, or why it cannot be used."""
    name: str                       # file name, the image id
    member: str                     # path inside the archive (`images/<name>`)
    data: bytes | None = None
    fault: Reject | None = None


class ArchiveBroken(Exception):
    """The archive's stream broke; `reject` is its rejects row, `member` the member it cut short (or None)."""

    def __init__(self, reject: Reject, member: Member | None):
        super().__init__(reject.detail)
        self.reject, self.member = reject, member


def broken(archive: Path, exc: BaseException, n_read: int) -> Reject:
    truncated = isinstance(exc, EOFError) or "unexpected end" in str(exc)
    return Reject("archive_truncated" if truncated else "archive_corrupt",
                  f"{archive.name}: read {n_read} member(s), then {type(exc).__name__}: {exc}; the images after "
                  "that point are not read: download the archive again (or extract what it holds)")


def members(archive: Path, wanted: Container[str]) -> Iterator[Member]:
    """The members of `archive` whose file name is in `wanted`, in archive order, each read whole (or with a
    `fault`). Raises `ArchiveBroken` where the stream breaks, after the members read before it."""
    n_read, current = 0, None
    try:
        with gzip.open(archive, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            for info in tar:
                n_read += 1
                name = PurePosixPath(info.name).name
                if name not in wanted:
                    continue
                current = Member(name, info.name)
                if not info.isfile():
                    current.fault = Reject("not_a_file", f"{info.name} in {archive.name} is not a regular file "
                                                         "(a link or folder): the archive is not NIH's own")
                else:
                    try:
                        check_file_size(info.size)
                        current.data = tar.extractfile(info).read()
                    except Reject as rej:   # the next header skips the unread data
                        current.fault = rej
                done, current = current, None
                yield done
            while gz.read(1 << 20):   # the tar end is before gzip's: reach its CRC32 and length check
                pass
    except _BROKEN as exc:
        rej = broken(archive, exc, n_read)
        if current is not None:
            current.data, current.fault = None, Reject(rej.reason, f"cut short: {rej.detail}")
        raise ArchiveBroken(rej, current) from None


def read_members(archive: Path, names: dict[str, str]) -> Iterator[tuple[str, bytes]]:
    """(file name, bytes) of the members `names` (file name -> member path) of one archive, one at a time, in
    one pass; a name whose member is missing, faulty or past a break is left out."""
    left = dict(names)
    try:
        for m in members(archive, left):
            if m.data is not None and left.get(m.name) == m.member:
                del left[m.name]
                yield m.name, m.data
                if not left:
                    return
    except ArchiveBroken:
        return


def recorded(con, image_ids, roots: list[Path]) -> dict[str, tuple[Path, str, str]]:
    """image id -> (archive, member, sha256 ingested) of those of `image_ids` read from an archive that is under
    one of `roots` now (the first that holds it). A home from before `image_archives` existed, opened read-only,
    has none."""
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'image_archives'").fetchone()[0]:
        return {}
    rows = con.execute("""SELECT a.image_id, a.archive, a.member, i.source_sha256 FROM image_archives a
                          JOIN images i USING (image_id) WHERE a.image_id IN (SELECT unnest(?))""",
                       [sorted(image_ids)]).fetchall()
    out = {}
    for iid, archive, member, sha in rows:
        where = next((root / archive for root in roots if (root / archive).is_file()), None)
        if where is not None:
            out[iid] = (where.resolve(), member, sha)
    return out
