"""`harvest status` says in one line when the newest model was trained on other data than the warehouse holds now
(#21 item 1), and which verb retrains; it stays fast (no torch)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline" / "training"))
from ddp_worker import blob_home, tiny_config, write_blob_nih  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = tiny_config(stages={"base": {"epochs": 1}, "msa_init": {"epochs": 0}, "end_to_end": {"epochs": 0}},
                     am={"steps": 1, "stage": {"epochs": 0}})
# `harvest status` in a child, which then says whether torch was imported.
CLI = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
       "print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")


def status(home) -> list[str]:
    done = subprocess.run([sys.executable, "-c", CLI, "--home", str(home), "status"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and "torch imported: False" in done.stdout, done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith("models: ")]


def test_status_says_when_the_newest_model_is_older_than_the_data(tmp_path):
    from pipeline.ingest.nih import ingest_nih
    from pipeline.training import stages

    home = blob_home(tmp_path, n=24)
    model_id = stages.train(home, CONFIG)
    assert status(home) == []   # trained on what the warehouse holds
    ingest_nih(home, write_blob_nih(tmp_path / "more", n=40), sizes=(64,), workers=1)   # 16 new images
    [line] = status(home)
    print(line)
    assert line.startswith(f"models: the newest model {model_id} is older than the warehouse's data: trained on ")
    assert line.endswith("retrain with `harvest train --config CONFIG`")   # no recorded train run names a file
