"""Configs are validated by type, range and choice before anything runs: one line naming the key, the value and
what is allowed (issue #15, item 2)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config.harvest import check, load_sections
from pipeline.config.mining import MiningConfig
from pipeline.config.train import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("data, key, value", [
    ({"data": {"input_size": "256px"}}, "data.input_size", "'256px'"),
    ({"runtime": {"batch_size": "eight"}}, "runtime.batch_size", "'eight'"),
    ({"stages": {"base": {"epochs": "ten"}}}, "stages.base.epochs", "'ten'"),
    ({"stages": {"end_to_end": {"lr": "fast"}}}, "stages.end_to_end.lr", "'fast'"),
    ({"am": {"stage": {"lr": "fast"}}}, "am.stage.lr", "'fast'"),
    ({"model": {"arch": "resnet9000"}}, "model.arch", "'resnet9000'"),
    ({"model": {"neck": "fpn"}}, "model.neck", "'fpn'"),
    ({"runtime": {"batch_size": -4}}, "runtime.batch_size", "-4"),
    ({"stages": {"base": {"epochs": -1}}}, "stages.base.epochs", "-1"),
    ({"stages": {"base": {"epochs": 10.5}}}, "stages.base.epochs", "10.5"),
    ({"runtime": {"channels_last": "yes"}}, "runtime.channels_last", "'yes'"),
    ({"model": {"imagenet": 1}}, "model.imagenet", "1"),
    ({"runtime": {"batch_size": True}}, "runtime.batch_size", "True"),
    ({"data": {"augment": {"scale": [1.0, 1.1, 1.2]}}}, "data.augment.scale", "[1.0, 1.1, 1.2]"),
    ({"data": {"augment": {"scale": [1.1, 1.0]}}}, "data.augment.scale", "[1.1, 1.0]"),
    ({"data": {"augment": {"scale": [1.0, "big"]}}}, "data.augment.scale[1]", "'big'"),
    ({"data": {"train_splits": "train"}}, "data.train_splits", "'train'"),
    ({"data": {"train_splits": ["training"]}}, "data.train_splits", "['training']"),
    ({"data": {"input_size": 100}}, "data.input_size", "100"),
    ({"data": {"input_size": 32}}, "data.input_size", "32"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction", "1.0"),
    ({"runtime": 5}, "runtime", "5"),
    ({"stages": {"base": [1, 2]}}, "stages.base", "[1, 2]"),
    ({"runtime": {"device": "gpu"}}, "runtime.device", "'gpu'"),
    ({"runtime": {"amp": "fp16"}}, "runtime.amp", "'fp16'"),
    ({"stages": {"base": {"momentum": 1.0}}}, "stages.base.momentum", "1.0"),
    ({"stages": {"msa_init": {"schedule": "step"}}}, "stages.msa_init.schedule", "'step'"),
    ({"stages": {"base": {"weight_decay": "1e-4"}}}, "stages.base.weight_decay", "'1e-4'"),
    ({"am": {"steps": -1}}, "am.steps", "-1"),
    ({"am": {"kp_lambda": -0.5}}, "am.kp_lambda", "-0.5"),
    ({"am": {"mode": "kd"}}, "am.mode", "'kd'"),
    ({"am": {"kp_layers": ["layer5"]}}, "am.kp_layers", "['layer5']"),
    ({"seed": "zero"}, "seed", "'zero'"),
])
def test_bad_training_values_name_key_and_value(data, key, value):
    with pytest.raises(ValueError) as err:
        load_config(data)
    message = str(err.value)
    assert message.startswith(f"{key} = {value}: "), message
    assert "\n" not in message


def test_unknown_keys_are_named_with_their_section():
    with pytest.raises(ValueError, match=r"unknown key\(s\) runtime\.batchsize; valid in runtime: .*batch_size"):
        load_config({"runtime": {"batchsize": 8}})


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime:\n  batch_size: -4\n")
    with pytest.raises(ValueError, match=rf"^config {bad}: runtime.batch_size = -4: must be a positive integer$"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match=rf"^config {bad}: \(top level\) = \['just', 'a list'\]: must be a mapping"):
        load_config(bad)
    bad.write_text("runtime: {batch_size: 8\n")
    with pytest.raises(ValueError, match=rf"^config {bad}: not valid YAML: .*line") as err:
        load_config(bad)
    assert "\n" not in str(err.value)


def test_valid_values_keep_their_form():
    cfg = load_config({"stages": {"base": {"lr": 1, "min_delta": 0}}, "data": {"augment": {"scale": [1, 1.2]}},
                       "runtime": {"device": "cuda:1", "workers": 2}})
    assert cfg.stages.base.lr == 1 and type(cfg.stages.base.lr) is int   # stage fingerprints keep what was written
    assert cfg.data.augment.scale == (1, 1.2) and cfg.runtime.device == "cuda:1"
    assert load_config({"runtime": None}) == TrainConfig()                 # an empty section: its defaults


DETECTOR_CONFIGS = sorted((REPO / "configs").glob("detector*.yaml"))


@pytest.mark.parametrize("path", sorted(set((REPO / "configs").glob("*.yaml")) - set(DETECTOR_CONFIGS)),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)
    check(path)
    assert set(load_sections(path)) == {"phantom", "mining", "export", "incremental"}


@pytest.mark.parametrize("path", DETECTOR_CONFIGS, ids=lambda p: p.name)
def test_shipped_detector_configs_load(path):
    from pipeline.config.detector import DetectorConfig
    assert DetectorConfig.load(path) == DetectorConfig.load(path)   # validated, and deterministic


@pytest.mark.parametrize("sections, key, value", [
    ({"phantom": {"n": 0}}, "phantom.n", "0"),
    ({"phantom": {"n": "many"}}, "phantom.n", "'many'"),
    ({"phantom": {"seed": 1.5}}, "phantom.seed", "1.5"),
    ({"phantom": {"size": 100000}}, "phantom.size", "100000"),
    ({"phantom": {"difficulty": 2}}, "phantom.difficulty", "2"),
    ({"phantom": {"difficulty": "brutal"}}, "phantom.difficulty", "'brutal'"),
    ({"phantom": 5}, "phantom", "5"),
    ({"mining": {"split": "training"}}, "mining.split", "'training'"),
    ({"mining": {"shard_size": 0}}, "mining.shard_size", "0"),
    ({"mining": {"batch_size": "eight"}}, "mining.batch_size", "'eight'"),
    ({"mining": {"steps": 0}}, "mining.steps", "0"),
    ({"mining": {"thresholds": [0.5, 1.5]}}, "mining.thresholds", "(0.5, 1.5)"),
    ({"export": {"formats": ["pdf"]}}, "export.formats", "['pdf']"),
    ({"export": {"formats": "coco"}}, "export.formats", "'coco'"),
    ({"export": {"ranks": [0]}}, "export.ranks", "[0]"),
    ({"export": {"min_score": 1.5}}, "export.min_score", "1.5"),
    ({"export": {"trust_floor": -0.1}}, "export.trust_floor", "-0.1"),
    ({"incremental": {"retrain": "nightly"}}, "incremental.retrain", "'nightly'"),
])
def test_bad_harvest_sections_name_key_and_value(tmp_path, sections, key, value):
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump(sections))
    with pytest.raises(ValueError) as err:
        load_sections(path)
    assert str(err.value).startswith(f"config {path}: {key} = {value}: "), str(err.value)


def test_unknown_harvest_keys(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump({"phantom": {"count": 5}, "mining": {"treshold": 0.5}}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) phantom\.count"):
        load_sections(path)
    path.write_text(yaml.safe_dump({"mining": {"treshold": 0.5}}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) mining\.treshold"):
        load_sections(path)


def test_mining_config_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("batch_size: -2\n")
    with pytest.raises(ValueError, match=rf"^config {path}: batch_size = -2: must be a positive integer$"):
        MiningConfig.from_yaml(path)
    with pytest.raises(ValueError, match=r"^device = 'gpu': must be cpu, cuda or cuda:N$"):
        MiningConfig.from_dict({"device": "gpu"})
    assert MiningConfig.from_dict({"input_size": None, "thresholds": [0.5, 1]}).thresholds == (0.5, 1.0)


@pytest.mark.parametrize("verb", ["train", "demo", "ablate"])
def test_cli_rejects_a_bad_config_in_one_line(tmp_path, verb):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime:\n  batch_size: eight\n")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "harvest"), verb, "--config", str(bad),
                           "--home", str(tmp_path / "home")], capture_output=True, text=True, env=env, timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [f"harvest {verb}: error: config {bad}: runtime.batch_size = 'eight': "
                                        f"must be an integer"], proc.stderr
    assert not (tmp_path / "home").exists()       # nothing ran: no home, no phantom data, no Prefect server
    assert seconds < 30, seconds                  # imports only (about 3 s idle; a loaded 2-core box is slower)


def test_a_harvest_caches_the_training_and_the_mining_input_size(tmp_path):
    from pipeline.config.harvest import cache_sizes
    path = tmp_path / "c.yaml"
    path.write_text("data: {input_size: 256}\nmining: {input_size: 384}\n")
    assert cache_sizes(path) == [256, 384]
    path.write_text("data: {input_size: 256}\nmining: {thresholds: [0.5]}\n")
    assert cache_sizes(path) == [256]
