"""Checkpoints: a run killed mid-stage resumes to the same weights; safe loading; sha256 in the warehouse."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import blob_home, tiny_config  # noqa: E402

from pipeline.training import checkpoint  # noqa: E402
from pipeline.training.stages import train  # noqa: E402
from warehouse import db  # noqa: E402


class Killed(Exception):
    pass


def resume_config() -> dict:
    """base (1 epoch) -> am1 (2 epochs, KP), mid-epoch resume points every 2 steps."""
    return tiny_config(runtime={"batch_size": 8, "save_every_steps": 2},
                       stages={"base": {"epochs": 1}, "msa_init": {"epochs": 0}, "end_to_end": {"epochs": 0}},
                       am={"steps": 1, "stage": {"epochs": 2}})


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    home = blob_home(tmp, n=44)
    shutil.copytree(home, tmp / "killed")
    return home, tmp / "killed"


def test_killed_run_resumes_to_the_same_weights(homes):
    clean, killed = homes
    cfg = resume_config()
    final_id = train(clean, cfg)

    def kill(model_id, epoch, step):
        if model_id.startswith("am1") and (epoch, step) == (1, 3):
            raise Killed()
    with pytest.raises(Killed):
        train(killed, cfg, on_step=kill)
    last = checkpoint.load_checkpoint(killed / "checkpoints" / final_id / "last.pt")
    assert (last["epoch"], last["step"]) == (1, 2)                 # the mid-epoch resume point before the kill
    assert not (killed / "checkpoints" / final_id / "final.pt").exists()
    redone = []
    assert train(killed, cfg, on_step=lambda *a: redone.append(a)) == final_id
    assert redone[0] == (final_id, 1, 3)                            # base reused, am1 picks up at step 3
    a = checkpoint.load_checkpoint(clean / "checkpoints" / final_id / "final.pt")["model"]
    b = checkpoint.load_checkpoint(killed / "checkpoints" / final_id / "final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_load_safely_and_match_the_warehouse(homes):
    clean, _ = homes
    model, meta = checkpoint.load_model(clean, "latest")
    row = checkpoint.model_row(clean, meta["model_id"])
    path = clean / row["checkpoint"]
    state = torch.load(path, weights_only=True)                     # plain tensors and values only
    assert state["meta"]["parent_id"] == row["parent_id"] and row["parent_id"].startswith("base-")
    assert state["meta"]["reference_id"] == row["parent_id"]        # N_A is the pre-AM network
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    x = torch.zeros(1, 1, 64, 64)
    assert model(x).shape == (1, 14) and not model.training
    tampered = path.read_bytes()
    path.write_bytes(tampered[:-10] + b"0" * 10)
    try:
        with pytest.raises(ValueError, match="sha256"):
            checkpoint.load_model(clean, meta["model_id"])
    finally:
        path.write_bytes(tampered)
    con = db.connect(clean, read_only=True)
    assert con.execute("SELECT count(*) FROM models").fetchone()[0] == 2
    con.close()
    with pytest.raises(KeyError, match="no model"):
        checkpoint.load_model(clean, "nope")
