"""A child process for the WAL faults (`test_wal.py`): ingest an NIH folder into a home while holding a warehouse
connection open, then die by SIGKILL (`kill`) or close it (`close`).

Every connection's close checkpoints the WAL into `warehouse.duckdb` once it is the process's last one, so a home
at rest has no WAL; a writer killed between its commit and that close leaves one. The held connection keeps the
process's DuckDB instance open while the ingest commits, so the kill leaves all of its commits in the WAL.
Usage: python -m tests.pipeline.integrity.wal_writer HOME NIH_ROOT SIZE kill|close
"""
import os
import signal
import sys
from pathlib import Path

from pipeline.base.home import Home
from pipeline.ingest.nih import ingest_nih
from pipeline.runs.record import recorded_run
from warehouse import db

if __name__ == "__main__":
    home, root, size, end = Home(Path(sys.argv[1])).make(), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    held = db.connect(home)
    with recorded_run(home, "ingest", {"kind": "nih", "root": root, "sizes": [size]}):
        ingest_nih(home, root, sizes=(size,), workers=1)
    if end == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    held.close()
