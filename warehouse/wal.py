"""DuckDB's write-ahead log (`warehouse.duckdb.wal`): what DuckDB does not check of it, and one line for what it does.

A WAL outlives only a writer killed between a commit and its connection's close (every close checkpoints it into
`warehouse.duckdb`). DuckDB replays it on open and checks each entry's checksum, the database it belongs to and
its checkpoint iteration, failing the open otherwise (`replay_damage` turns that into one line). It reads a header
it cannot parse, an entry whose size runs past the end, or a zero-filled entry as the torn tail of a killed write:
it silently replays nothing from there on, losing the transactions after it. `damage` walks the WAL's frames to
tell those from a whole file. A WAL cut at an entry boundary cannot be told from a writer killed there.

Layout (DuckDB 1.1 to 2.0, WAL version 2): a header object (field 100 the type WAL_VERSION, 101 the version, 102
the database's 16-byte identifier, 103 its checkpoint iteration, then 0xFFFF), then entries, each a little-endian
u64 size, a u64 checksum and `size` bytes of a serialized object whose first field is 100 (its type).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

WAL_VERSION_TYPE, KNOWN_VERSION, FRAME = 98, 2, 16


def wal_path(db: Path) -> Path:
    return Path(f"{db}.wal")


class DamagedWAL(ValueError):
    """A WAL DuckDB refuses or reads only in part. `at`: the byte from which its transactions are not trusted
    (the whole transactions before it are); the message is one line with the cure."""

    def __init__(self, path: Path, reason: str, at: int):
        self.path, self.reason, self.at = Path(path), reason, at
        super().__init__(f"warehouse WAL {path} is damaged ({reason}); `harvest check --repair` keeps the whole "
                         f"transactions before byte {at} and moves the WAL to quarantine (then run again the "
                         "command that was killed)")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """An unsigned LEB128 integer at `pos` -> (value, next position); ValueError if it does not end."""
    value = shift = 0
    for k in range(pos, min(pos + 10, len(data))):
        value |= (data[k] & 0x7F) << shift
        if not data[k] & 0x80:
            return value, k + 1
        shift += 7
    raise ValueError(f"a varint at byte {pos} does not end")


def _field(data: bytes, pos: int, want: int) -> int:
    if data[pos:pos + 2] != struct.pack("<H", want):
        raise ValueError(f"header field {want} expected at byte {pos}")
    return pos + 2


def _header_end(data: bytes) -> int:
    """The byte after the header object; ValueError naming what is not as DuckDB writes it."""
    kind, pos = _varint(data, _field(data, 0, 100))
    version, pos = _varint(data, _field(data, pos, 101))
    if kind != WAL_VERSION_TYPE or version != KNOWN_VERSION:
        raise ValueError(f"header type {kind}, version {version}; DuckDB writes {WAL_VERSION_TYPE}, {KNOWN_VERSION}")
    count, pos = _varint(data, _field(data, pos, 102))
    if count != 16:
        raise ValueError(f"a database identifier of {count} bytes")
    for _ in range(count):
        byte, pos = _varint(data, pos)
        if byte > 255:
            raise ValueError("a database identifier byte over 255")
    _, pos = _varint(data, _field(data, pos, 103))
    if data[pos:pos + 2] != b"\xff\xff":
        raise ValueError(f"the header does not end at byte {pos}")
    return pos + 2


def damage(path: Path) -> DamagedWAL | None:
    """What DuckDB would silently skip in the WAL at `path` (read while no writer appends to it), else None.
    An empty or absent WAL holds nothing."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if not data:
        return None
    try:
        pos = _header_end(data)
    except (ValueError, IndexError) as exc:
        return DamagedWAL(path, f"its header cannot be read: {exc}", 0)
    while pos < len(data):
        if len(data) - pos < FRAME:
            return DamagedWAL(path, f"it ends inside the entry at byte {pos}", pos)
        size = struct.unpack_from("<Q", data, pos)[0]
        if size == 0 or size > len(data) - pos - FRAME:
            return DamagedWAL(path, f"the entry at byte {pos} claims {size} bytes, "
                                    f"{len(data) - pos - FRAME} are left", pos)
        if data[pos + FRAME:pos + FRAME + 2] != b"d\x00":   # field 100, the entry's type
            return DamagedWAL(path, f"the entry at byte {pos} does not start as a WAL entry", pos)
        pos += FRAME + size
    return None


_REPLAY = re.compile(r"replaying WAL|WAL does not match|WAL checkpoint iteration", re.I)


def replay_damage(exc: BaseException, db: Path) -> DamagedWAL | None:
    """DuckDB's failure to replay the WAL of `db` as one `DamagedWAL` (the entry it names, else the whole WAL),
    else None."""
    text = " ".join(str(exc).split())
    if not _REPLAY.search(text):
        return None
    reason = re.sub(r'^.*?Failure while replaying WAL file "[^"]*": ', "", re.sub(r"^[A-Z][A-Za-z ]* Error: ", "", text))
    entry = re.search(r"entry at byte position (\d+) computed checksum \d+ does not match stored checksum \d+", reason)
    if entry:   # DuckDB names the entry's payload; its frame starts FRAME bytes before
        at = max(0, int(entry.group(1)) - FRAME)
        return DamagedWAL(wal_path(db), f"the entry at byte {at} does not match its checksum", at)
    return DamagedWAL(wal_path(db), reason.split(". ")[0][:200], 0)
