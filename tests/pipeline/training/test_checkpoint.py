"""Checkpoints: a run killed mid-stage resumes to the same weights; safe loading; sha256 in the warehouse."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import blob_home, tiny_config  # noqa: E402
from tests.conftest import scratch  # noqa: E402

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
    with scratch(tmp_path_factory, "resume") as tmp:
        home = blob_home(tmp, n=44)
        shutil.copytree(home, tmp / "killed")
        yield home, tmp / "killed"


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


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_final_checkpoint_counts_as_absent_and_its_stage_trains_again(homes, tmp_path, caplog, damage):
    clean, _ = homes
    cfg = resume_config()
    final_id = train(clean, cfg)                                    # trained by the first test, else now
    home = tmp_path / "home"
    shutil.copytree(clean, home)
    final = home / "checkpoints" / final_id / "final.pt"
    data = bytearray(final.read_bytes())
    if damage == "truncated":                                       # torch.load fails
        final.write_bytes(data[: len(data) // 2])
    else:                                                           # loads, but not the recorded sha256
        data[len(data) // 2] ^= 0x10
        final.write_bytes(bytes(data))
    steps = []                                                      # the stage trains again from its last.pt
    with caplog.at_level("WARNING", logger="pipeline.training"):
        assert train(home, cfg, on_step=lambda *a: steps.append(a[0])) == final_id
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "\n" not in warned[0] and str(final) in warned[0], warned
    assert steps == []                                              # base reused, am1 rebuilt from its last epoch
    model, meta = checkpoint.load_model(home, final_id)             # the sha256 in `models` matches again
    a = checkpoint.load_checkpoint(clean / "checkpoints" / final_id / "final.pt")["model"]
    b = model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                  # the same weights as the clean run's


def test_resumable_counts_a_damaged_checkpoint_as_absent_with_one_warning(tmp_path, caplog):
    from pipeline.base.home import Home
    from tests.conftest import register_tiny_model

    home = Home(tmp_path / "home").make()
    model_id = register_tiny_model(home.root, "tiny-abc")
    final = home.checkpoints / model_id / "final.pt"
    ckpt = checkpoint.Resumable(home, model_id, fingerprint=None)
    assert ckpt.finished()["model_id"] == model_id                  # intact: reused
    good = final.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    for damaged, name in [(bytes(flipped), "final.pt"), (good[: len(good) // 3], "final.pt"),
                          (good[: len(good) // 3], "last.pt")]:
        (home.checkpoints / model_id / name).write_bytes(damaged)
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipeline.training"):
            found = ckpt.finished() if name == "final.pt" else ckpt.restore(None, None, None)
        assert found is None
        assert [r.getMessage().count("\n") for r in caplog.records] == [0], caplog.records
        assert str(home.checkpoints / model_id / name) in caplog.records[0].getMessage()
        final.write_bytes(good)


def test_every_checkpoint_has_its_sha256_beside_it_and_loads_only_when_it_matches(tmp_path):
    path = tmp_path / "m" / "last.pt"
    sha = checkpoint.save_checkpoint({"model": {"w": torch.arange(1000.0)}, "meta": {}}, path)
    assert (tmp_path / "m" / "last.pt.sha256").read_text() == f"{sha}  last.pt\n"
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.arange(1000.0))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01                                    # inside the tensor's bytes: torch loads it
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        checkpoint.load_checkpoint(path)
