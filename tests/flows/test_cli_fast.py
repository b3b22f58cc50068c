"""`harvest` imports only the chosen verb's module: `--help`, `status` and `sql` start fast (flows/cli.py)."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import COMMANDS, VERBS, build_parser
from tests.pipeline.export.test_export import make_home

HARVEST = Path(sys.executable).parent / "harvest"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_home(tmp_path_factory.mktemp("fast") / "home").root


@pytest.mark.parametrize("args", [["--help"], ["status"], ["sql", "SELECT count(*) FROM mined_boxes"]])
def test_the_command_answers_in_well_under_two_seconds(home, args):
    start = time.perf_counter()
    done = subprocess.run([str(HARVEST), "--home", str(home), *args], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert seconds < 5, f"harvest {args[0]} took {seconds:.2f} s"   # about 0.1-0.4 s on 2 idle cores


@pytest.mark.parametrize("modules, heavy", [
    ("flows.query", {"prefect", "torch"}),
    # what checks a config: a bad one fails before torch loads
    ("pipeline.config.train, pipeline.config.mining, pipeline.config.detector, pipeline.config.harvest", {"torch"}),
    # verbs whose flows are built on first use (flows._verbs)
    ("flows.train, flows.ingest, flows.tune, flows.evaluate, flows.export, flows.detector, flows.check",
     {"prefect", "torch"}),
    # a deployment's entrypoint is a Prefect flow at import, so these load Prefect, but not torch
    ("flows.harvest, flows.ablate, flows.mine", {"torch"})])
def test_verb_and_config_modules_import_no_heavy_library(modules, heavy):
    code = f"import sys, {modules}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("verb, config", [("train", "runtime: {batch_size: -1}"), ("demo", "runtime: {amp: fp8}"),
                                          ("mine", "batch_size: 0")])
def test_a_bad_config_fails_in_one_line_before_torch_loads(tmp_path, verb, config):
    bad = tmp_path / "bad.yaml"
    bad.write_text(config + "\n")
    start = time.perf_counter()
    done = subprocess.run([str(HARVEST), "--home", str(tmp_path / "home"), verb, "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"harvest {verb}: error: config {bad}: ")
    assert seconds < 5, f"took {seconds:.2f} s"   # 0.3-1.5 s on 2 idle cores; torch alone takes 4-5


def test_each_verb_module_registers_the_verbs_listed_for_it():
    for module in VERBS:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        helps = {a.dest: a.help for a in sub._choices_actions}
        assert helps == {verb: help_line for verb, (m, help_line) in COMMANDS.items() if m == module}


def test_a_verb_gets_its_own_parser_only_when_chosen():
    listed = build_parser(modules=())._subparsers._group_actions[0].choices
    assert list(listed) == list(COMMANDS) and "--min-score" not in listed["export"].format_help()   # a placeholder
    export = build_parser(modules=["flows.export"])._subparsers._group_actions[0].choices["export"]
    assert "--min-score" in export.format_help()


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`harvest sql ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    home = make_home(tmp_path / "home").root
    query = "SELECT * FROM range(100000)"
    done = subprocess.run(f"{HARVEST} --home {home} sql '{query}' --max-rows 100000 | head -1",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "range" and "Traceback" not in done.stderr, done.stderr
