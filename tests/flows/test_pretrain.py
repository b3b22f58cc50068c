"""`harvest pretrain`: phantom of a reserved seed -> ingest -> train -> float16 weights with the model card's
facts; run again, it reuses every step; other seeds are refused, and a pretraining phantom is never scored."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.phantom.seeds import PRETRAIN_SEEDS, check_scorable, require_pretrain_seed

TINY = {
    "name": "tiny-pretrain", "seed": 0, "model": {"arch": "resnet18", "neck": "bilinear", "imagenet": False},
    "data": {"input_size": 64, "val_fraction": 0.25, "train_splits": ["train", "test"], "augment": {"enabled": False}},
    "runtime": {"device": "cpu", "amp": "auto", "batch_size": 8, "eval_batch_size": 16, "log_every": 0},
    "stages": {"base": {"epochs": 0}, "msa_init": {"epochs": 0}, "end_to_end": {"epochs": 1, "lr": 0.01}},
    "am": {"steps": 0},
    "phantom": {"n": 24, "seed": 1000, "size": 128, "difficulty": 0.5},
}


def harvest(home, *args) -> int:
    from flows.cli import main
    return main(["--home", str(home), *map(str, args)])


def test_seed_ranges():
    require_pretrain_seed(PRETRAIN_SEEDS.start)
    with pytest.raises(ValueError, match="reserved seeds"):
        require_pretrain_seed(0)
    with pytest.raises(ValueError, match="reserved for pretraining"):
        check_scorable(PRETRAIN_SEEDS.stop - 1)
    check_scorable(11)


@pytest.mark.timeout(900)
def test_pretrain_writes_weights_and_card_then_reuses(tmp_path, prefect_api):
    import torch

    from models import create_model
    from pipeline.evaluation.run import evaluate_run
    from pipeline.training.weights import load_init
    from warehouse import db

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    home, out = tmp_path / "home", tmp_path / "w" / "tiny.pt"
    assert harvest(home, "pretrain", "--config", config, "--out", out) == 0
    card = json.loads(Path(f"{out}.json").read_text())
    assert card["phantom"]["seed"] == 1000 and card["phantom"]["n"] == 24 and card["phantom"]["difficulty"] == 0.5
    assert [s["stage"] for s in card["stages"]] == ["end_to_end"]
    assert set(card["validation"]["auroc"]) and card["hardware"].startswith("CPU")
    assert card["commit"] != "" and card["train_seconds"] > 0
    state = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state["model"].values() if v.is_floating_point())
    assert load_init(create_model("resnet18", "bilinear", 14), out, "resnet18") is True   # the whole model

    assert harvest(home, "pretrain", "--config", config, "--out", out) == 0
    assert json.loads(Path(f"{out}.json").read_text())["sha256"] == card["sha256"]
    con = db.connect(home, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM models").fetchone()[0] == 1      # reused, not retrained
    finally:
        con.close()
    with pytest.raises(ValueError, match="reserved for pretraining"):   # its phantom is never scored
        evaluate_run(home, "any-run")


def test_pretrain_refuses_an_evaluation_seed(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "phantom": {**TINY["phantom"], "seed": 3}}))
    assert harvest(tmp_path / "home", "pretrain", "--config", config, "--out", tmp_path / "w.pt") != 0
    err = capsys.readouterr().err
    assert "reserved seeds" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "phantom").exists()
