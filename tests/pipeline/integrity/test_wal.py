"""Seeded faults in DuckDB's WAL (issue #21, item 8): a real ingest killed by SIGKILL after its commits, before its
connection's close checkpointed them, leaves them in `warehouse.duckdb.wal`; each bit flip, truncation or zeroed
range of it is named by `harvest check` or harmless, no verb fails with a traceback, and `check --repair` plus
the rerun the kill-restart contract asks for give back the clean home."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from flows.cli import main
from pipeline.base.home import Home
from pipeline.images.dataset import CacheDataset
from pipeline.ingest.nih import ingest_nih
from pipeline.integrity.check import check_home
from pipeline.integrity.repair import Repair
from pipeline.runs.record import recorded_run
from tests.pipeline.integrity.test_check_repair import KINDS, inject, write_nih
from warehouse import db
from warehouse.wal import damage, wal_path

SIZE, SEED, EACH = 64, 20, 4
ROWS = [(f"0000000{k}_000.png", labels, k) for k, labels in
        enumerate(["Mass", "Effusion|Nodule", "No Finding", "Atelectasis", "Cardiomegaly", "Pneumothorax"])]
BOXES = [("00000000_000.png", "Mass", 100, 120, 200, 180), ("00000001_000.png", "Effusion", 300, 310, 90, 80)]


def ingested(home: Home, root, end: str) -> None:
    """The ingest of `root` in a child process (`wal_writer`) that ends by `end` (kill | close)."""
    db.connect(home.make()).close()   # a home that existed before: its schema is in warehouse.duckdb
    done = subprocess.run([sys.executable, "-m", "tests.pipeline.integrity.wal_writer", str(home.root), str(root),
                           str(SIZE), end], capture_output=True, text=True, timeout=300)
    assert done.returncode == (-9 if end == "kill" else 0), done.stderr


def ingest_again(home: Home, root) -> None:
    """What the kill-restart contract asks after a kill: the same command again."""
    with recorded_run(home, "ingest", {"kind": "nih", "root": str(root), "sizes": [SIZE]}):
        ingest_nih(home, root, sizes=(SIZE,), workers=1)


def state(home: Home) -> dict:
    con = db.connect(home, read_only=True)
    try:
        tables = {t: con.execute(f"SELECT * {'EXCLUDE (ingested_at)' if t == 'images' else ''} FROM {t} ORDER BY ALL")
                  .fetchall() for t in ("images", "labels", "gt_boxes")}
    finally:
        con.close()
    ds = CacheDataset(home, size=SIZE)
    return {**tables, "pixels": {i: ds.get_batch([k], verify=True)["image"].numpy().tobytes()
                                 for k, i in enumerate(ds.image_ids)}}


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    base = tmp_path_factory.mktemp("wal")
    root = write_nih(base, ROWS, BOXES)
    clean, walled = Home(base / "clean"), Home(base / "walled")
    ingested(clean, root, "close")
    ingested(walled, root, "kill")
    return root, clean, walled


def test_a_killed_writer_leaves_a_whole_wal_that_replays_to_the_clean_home(homes, tmp_path):
    root, clean, walled = homes
    assert not wal_path(clean.warehouse).exists() and wal_path(walled.warehouse).stat().st_size > 10_000
    assert damage(wal_path(walled.warehouse)) is None and check_home(walled) == []
    home = Home(shutil.copytree(walled.root, tmp_path / "h"))
    assert state(home) == state(clean)


def test_each_wal_fault_is_named_by_check_or_harmless_and_repair_gives_back_the_clean_home(homes, tmp_path, capsys):
    root, clean, walled = homes
    rng, clean_state, faults = np.random.default_rng(SEED), state(clean), []
    for k, kind in enumerate(kind for kind in KINDS for _ in range(EACH)):
        home = Home(shutil.copytree(walled.root, tmp_path / f"fault-{k}"))
        what = inject(wal_path(home.warehouse), kind, rng)
        faults.append((what, found_or_harmless(home, root, what, clean_state, capsys)))
    assert len(faults) == 3 * EACH
    print(f"\n{len(faults)} WAL faults: {sum(f[1] == 'found' for f in faults)} found by check, "
          f"{sum(f[1] == 'harmless' for f in faults)} harmless; each repaired and rerun to the clean home")
    print("\n".join(f"  {what}: {how}" for what, how in faults))


@pytest.mark.parametrize("at, bit, duckdb_says", [(2, 0x01, "nothing: it skips the WAL"),
                                                  (12, 0x01, "WAL does not match database file")])
def test_a_damaged_wal_header_is_named_and_repair_sets_the_wal_aside(homes, tmp_path, capsys, at, bit, duckdb_says):
    """The header: a flipped type byte DuckDB reads as a torn WAL and skips whole; a flipped identifier byte it
    refuses. Both are named, and repair replays nothing of the WAL (no whole transaction before byte 0)."""
    root, clean, walled = homes
    home = Home(shutil.copytree(walled.root, tmp_path / "h"))
    wal = wal_path(home.warehouse)
    data = bytearray(wal.read_bytes())
    data[at] ^= bit
    wal.write_bytes(bytes(data))
    try:
        db.connect(home, read_only=True).close()
        said = "nothing: it skips the WAL"
    except db.DamagedWAL as exc:
        said = exc.reason
    assert duckdb_says in said
    assert found_or_harmless(home, root, f"bit flip at byte {at}", state(clean), capsys) == "found"


def found_or_harmless(home: Home, root, what: str, clean_state: dict, capsys) -> str:
    """'found' or 'harmless' for the fault `what` in the WAL of `home`, after asserting that no verb prints a
    traceback, and that `Repair` and the ingest again give back the clean home."""
    wal = wal_path(home.warehouse)
    capsys.readouterr()
    for verb in ("status", "check"):           # a verb's output, or one line naming the WAL: no traceback
        code = main(["--home", str(home.root), verb])
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (0, 1) and (not err or (len(err) == 1 and str(wal) in err[0])), (verb, what, err)
    lines = [p.line() for p in check_home(home)]
    found = any(str(wal) in line for line in lines)
    harmless = not found and state(home) == clean_state
    assert found or harmless, f"{what} of {wal} neither found nor harmless: {lines}"
    said = []
    Repair(home, say=said.append).run(check_home(home))
    ingest_again(home, root)
    assert check_home(home) == [], said
    assert not wal.exists() and state(home) == clean_state, (what, said)
    return "found" if found else "harmless"
