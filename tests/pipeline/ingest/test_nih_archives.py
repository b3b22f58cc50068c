"""NIH's download as it comes: `images_0xx.tar.gz` archives beside the CSVs, read as a stream. An ingest from
them equals the ingest of the same files extracted; bad members, broken archives, reruns and kills behave as
for folders."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.images import cache
from pipeline.ingest.nih import ingest_nih
from tests.conftest import gray_image
from warehouse import db

GOOD = [(f"{k:08d}_000.png", "Mass" if k % 2 else "No Finding", k) for k in range(1, 9)]
BAD = [("00000009_000.png", "Mass", 9), ("00000010_000.png", "Mass", 10), ("00000011_000.png", "Edema", 11),
       ("00000012_000.png", "Mass", 12), ("missing_000.png", "Mass", 13)]


def make_archives(src, dest, per_archive: int, names=None) -> list:
    """NIH's layout of `src` as its download: the CSVs, and its images as members `images/<name>` of
    `images_001.tar.gz`, `images_002.tar.gz`, ... (`per_archive` each, in name order)."""
    dest.mkdir(parents=True, exist_ok=True)
    for csv in src.glob("*.*"):
        if csv.is_file():
            shutil.copy(csv, dest / csv.name)
    names = sorted(p.name for p in (src / "images").iterdir()) if names is None else names
    out = []
    for k in range(0, len(names), per_archive):
        path = dest / f"images_{k // per_archive + 1:03d}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name in names[k:k + per_archive]:
                tar.add(src / "images" / name, arcname=f"images/{name}")
        out.append(path)
    return out


def extract(archives, dest) -> None:
    """`tar xzf` of each archive into `dest`, beside the CSVs."""
    dest.mkdir(parents=True)
    for listed in [*archives[0].parent.glob("*.csv"), *archives[0].parent.glob("*.txt")]:
        shutil.copy(listed, dest / listed.name)
    for path in archives:
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")


def snapshot(home) -> dict:
    """Every row an ingest writes but the source root and times, and the bytes of every cached image."""
    con = db.connect(home, read_only=True)
    try:
        got = {t: sorted(con.execute(sql).fetchall()) for t, sql in [
            ("images", "SELECT * EXCLUDE (ingested_at) FROM images"), ("labels", "SELECT * FROM labels"),
            ("gt_boxes", "SELECT * FROM gt_boxes"), ("rejects", "SELECT stage, path, reason, detail FROM rejects"),
            ("cache", "SELECT source_sha256, size, shard, row FROM cache_entries")]}
    finally:
        con.close()
    got["pixels"] = {(sha, size): cache.checksum(cache.gather(home / "cache", size, np.array([shard]),
                                                              np.array([row]))[0]).to_bytes(4, "big") +
                     cache.gather(home / "cache", size, np.array([shard]), np.array([row])).tobytes()
                     for sha, size, shard, row in got["cache"]}
    got["shards"] = {p.relative_to(home / "cache").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in sorted((home / "cache").glob("size=*/*.u8"))}
    return got


def members_of(home) -> dict:
    con = db.connect(home, read_only=True)
    try:
        return {iid: (a, m) for iid, a, m in con.execute("SELECT * FROM image_archives").fetchall()}
    finally:
        con.close()


def spoil(img) -> None:
    (img / "00000009_000.png").write_bytes(b"")                                                  # empty
    (img / "00000010_000.png").write_bytes((img / "00000001_000.png").read_bytes()[:300])       # truncated
    (img / "00000011_000.png").write_text("not an image at all")
    Image.fromarray(gray_image(5)).save(img / "00000012_000.png", format="JPEG")                 # renamed JPEG


def test_archives_ingest_equals_the_extracted_files(make_nih, tmp_path):
    src = make_nih(GOOD + BAD, boxes=[("00000003_000.png", "Mass", 10, 20, 30, 40)], test=["00000004_000.png"])
    spoil(src / "images")
    archives = make_archives(src, tmp_path / "download", per_archive=5)
    assert [p.name for p in archives] == ["images_001.tar.gz", "images_002.tar.gz", "images_003.tar.gz"]
    extract(archives, tmp_path / "extracted")
    assert (tmp_path / "extracted" / "images" / "00000001_000.png").is_file()

    from_archives = ingest_nih(tmp_path / "a", tmp_path / "download", sizes=(64, 32), workers=1)
    from_files = ingest_nih(tmp_path / "f", tmp_path / "extracted", sizes=(64, 32), workers=1)
    assert from_archives == from_files == {"images": 8, "decoded": 8, "skipped_cached": 0, "rejects": 5,
                                           "broken_sources": 0, "boxes": 1}
    a, f = snapshot(tmp_path / "a"), snapshot(tmp_path / "f")
    assert a == f
    assert {(p, r) for _, p, r, _ in a["rejects"]} == {
        ("images/00000009_000.png", "empty_file"), ("images/00000010_000.png", "unreadable_image"),
        ("images/00000011_000.png", "unreadable_image"), ("images/00000012_000.png", "format_mismatch"),
        ("images/missing_000.png", "missing_image")}
    shas = {r[0]: r[12] for r in a["images"]}
    assert shas == {n: hashlib.sha256((src / "images" / n).read_bytes()).hexdigest() for n, *_ in GOOD}
    assert len(a["pixels"]) == 16 and len(a["shards"]) == 2
    assert members_of(tmp_path / "a") == {n: (f"images_00{(k // 5) + 1}.tar.gz", f"images/{n}")
                                          for k, (n, *_) in enumerate(GOOD)}
    assert members_of(tmp_path / "f") == {}


def test_rerun_decodes_only_new_or_changed_members_and_a_file_wins(make_nih, tmp_path):
    src = make_nih(GOOD)
    download = tmp_path / "download"
    make_archives(src, download, per_archive=4)
    home = tmp_path / "home"
    assert ingest_nih(home, download, sizes=(32,))["decoded"] == 8
    again = ingest_nih(home, download, sizes=(32,))
    assert again["decoded"] == 0 and again["skipped_cached"] == 8
    Image.fromarray(gray_image(99)).save(src / "images" / "00000002_000.png")          # changed in archive 1
    Image.fromarray(gray_image(100)).save(src / "images" / "00000009_000.png")         # new, in archive 3
    with open(src / "Data_Entry_2017_v2020.csv", "a") as f:
        f.write("00000009_000.png,Edema,0,9,40,F,PA,2500,2500,0.143,0.143\n")
    make_archives(src, download, per_archive=4)
    changed = ingest_nih(home, download, sizes=(32,))
    assert (changed["decoded"], changed["skipped_cached"], changed["images"]) == (2, 7, 9)
    assert members_of(home)["00000009_000.png"] == ("images_003.tar.gz", "images/00000009_000.png")
    (download / "images").mkdir()
    shutil.copy(src / "images" / "00000001_000.png", download / "images")           # extracted: the file wins
    assert ingest_nih(home, download, sizes=(32,))["decoded"] == 0
    assert "00000001_000.png" not in members_of(home) and len(members_of(home)) == 8


def reasons(home) -> dict:
    con = db.connect(home, read_only=True)
    try:
        return dict(con.execute("SELECT path, reason FROM rejects").fetchall())
    finally:
        con.close()


def image_ids(home) -> set:
    con = db.connect(home, read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT image_id FROM images").fetchall()}
    finally:
        con.close()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped"])
def test_a_broken_archive_is_a_reject_and_the_rest_goes_on(make_nih, tmp_path, damage):
    rows = [(f"{k:08d}_000.png", "Mass", k) for k in range(1, 16)]
    src = make_nih(rows, size=256)   # noisy 256 px PNGs: members span many gzip blocks
    download = tmp_path / "download"
    first, second, third = make_archives(src, download, per_archive=5)
    data = bytearray(second.read_bytes())
    if damage == "truncated":
        data = data[:len(data) * 6 // 10]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data[len(data) // 2] ^= 0xFF
    second.write_bytes(bytes(data))
    home = tmp_path / "home"
    summary = ingest_nih(home, download, sizes=(32,))
    got = reasons(home)
    assert got.pop("images_002.tar.gz") == ("archive_truncated" if damage == "truncated" else "archive_corrupt")
    in_second = {n for n, *_ in rows[5:10]}
    assert {n for n, *_ in rows} - in_second <= image_ids(home)              # archives 1 and 3 go on
    lost = in_second - image_ids(home)
    assert lost and {p.removeprefix("images/") for p in got} == lost        # each unread image is named
    assert summary["images"] == 15 - len(lost) and summary["rejects"] == len(lost) + 1
    make_archives(src, download, per_archive=5)                              # downloaded again
    assert ingest_nih(home, download, sizes=(32,))["decoded"] == len(lost)
    assert reasons(home) == {} and len(image_ids(home)) == 15
