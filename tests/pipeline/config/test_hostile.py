"""Hostile configs fail in one line, fast and small (issue #21, item 6): YAML bombs of any shape, a `model.init`
that is not a weights file of ours, and counts of absurd magnitude. The checks are timed in process; the bombs
and the CLI (`train`, `mine`, `demo`) run in subprocesses whose peak RSS is measured."""
from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline.config.check import MAX_YAML_NODES, read_yaml
from pipeline.config.harvest import check

REPO = Path(__file__).resolve().parents[3]
SHIPPED_WEIGHTS = REPO / "models" / "weights" / "demo-resnet18-bilinear-256.pt"


def laughs(top: str) -> str:
    """A billion laughs: 9 levels of 9 aliases, 9**9 strings once expanded, from about 400 bytes.
    `top`: list (the levels are the items of a top-level list) or map (under a section key)."""
    levels = ['["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += ["[" + ", ".join([f"*l{k - 1}"] * 9) + "]" for k in range(1, 9)]
    if top == "list":
        return "".join(f"- &l{k} {v}\n" for k, v in enumerate(levels))
    return "runtime:\n" + "".join(f"  k{k}: &l{k} {v}\n" for k, v in enumerate(levels))


def merge_bomb() -> str:
    """Merge keys (`<<`) copy a mapping's pairs into another: 9 levels of 9 merges."""
    lines = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9}"]
    lines += [f"m{k}: &m{k} {{<<: [{', '.join([f'*m{k - 1}'] * 9)}]}}" for k in range(1, 9)]
    return "\n".join(lines) + "\n"


YAML_BOMBS = {
    "laughs in a top-level list": (laughs("list"), "once its aliases are expanded"),
    "laughs in a section": (laughs("map"), "once its aliases are expanded"),
    "merge keys": (merge_bomb(), "once its aliases are expanded"),
    "a recursive alias": ("runtime: &r {a: *r}\n", "refers to its own anchor"),
    "deep nesting": ("runtime: " + "[" * 100_000 + "]" * 100_000 + "\n", "not valid YAML"),
    "a huge file": ("a: 1\n" * 300_000, "not a config file"),
    "wide and flat": ("[" + "1, " * (MAX_YAML_NODES + 10) + "1]\n", "once its aliases are expanded"),
}


INIT_CASES = {   # model.init values that are not weights of ours: (value as written, expected text)
    "passwd by traversal": (None, "is not a weights file"),      # ../ up to the root, then etc/passwd
    "random bytes": ("random.pt", "is not a weights file"),
    "a truncated weights file": ("truncated.pt", "is not a weights file"),
    "an empty file": ("empty.pt", "is not a weights file"),
    "a torch file of someone else": ("foreign.pt", "not cxr-harvest weights"),
    "a zip archive": ("plain.zip", "not a torch.save file"),
    "a folder": (".", "must be an existing weights file"),
    "a device": ("/dev/zero", "must be an existing weights file"),
}


def init_value(folder: Path, name: str) -> str:
    """Write the files of INIT_CASES into `folder`; the `model.init` value of case `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "random.pt").write_bytes(os.urandom(4096))
    (folder / "truncated.pt").write_bytes(SHIPPED_WEIGHTS.read_bytes()[:5_000_000])
    (folder / "empty.pt").write_bytes(b"")
    with zipfile.ZipFile(folder / "foreign.pt", "w") as z:            # torch.save's layout, someone else's pickle
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}}, protocol=2))
        z.writestr("archive/version", "3\n")
    with zipfile.ZipFile(folder / "plain.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    return INIT_CASES[name][0] or "../" * len(folder.resolve().parts) + "etc/passwd"


MAGNITUDES = {   # (config text, the dotted key named)
    "am.steps": ("am: {steps: 100000000000000000000000}\n", "am.steps"),
    "epochs": ("stages: {base: {epochs: 1000000000000}}\n", "stages.base.epochs"),
    "am epochs": ("am: {stage: {epochs: 1000000}}\n", "am.stage.epochs"),
    "batch_size": ("runtime: {batch_size: 1000000000}\n", "runtime.batch_size"),
    "eval_batch_size": ("runtime: {eval_batch_size: 1000000000}\n", "runtime.eval_batch_size"),
    "workers": ("runtime: {workers: 1000000}\n", "runtime.workers"),
    "warmup_steps": ("stages: {end_to_end: {warmup_steps: 100000000000}}\n", "stages.end_to_end.warmup_steps"),
    "patience": ("stages: {end_to_end: {patience: 100000000}}\n", "stages.end_to_end.patience"),
    "input_size": ("data: {input_size: 1048576}\n", "data.input_size"),
    "seed": ("seed: 1000000000000000000000000000000\n", "seed"),
    "phantom.n": ("phantom: {n: 1000000000000}\n", "phantom.n"),
    "phantom.seed": ("phantom: {seed: 100000000000000000000}\n", "phantom.seed"),
    "mining.steps": ("mining: {steps: 1000000000}\n", "mining.steps"),
    "mining.batch_size": ("mining: {batch_size: 1000000000}\n", "mining.batch_size"),
    "mining.shard_size": ("mining: {shard_size: 1000000000000}\n", "mining.shard_size"),
    "mining.thresholds": (f"mining: {{thresholds: [{', '.join(['0.5'] * 1000)}]}}\n", "mining.thresholds"),
    "export.ranks": ("export: {ranks: [1000000000]}\n", "export.ranks"),
    "a 4000-digit number": ("am: {steps: " + "9" * 4000 + "}\n", "am.steps"),
}


def timed_check(path: Path) -> tuple[str, float]:
    """The config check of `path`, in process: its one-line message and its seconds."""
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        check(path)
    return str(err.value), time.perf_counter() - t0


def assert_one_line(message: str, seconds: float, path: Path) -> None:
    assert message.startswith(f"config {path}: ") and "\n" not in message and len(message) < 400, message
    assert seconds < 2 * SLACK, seconds       # 2 s, the bound, with slack for a loaded 2-core machine


SLACK = 2.5
PROBE = """if True:
    import sys, time
    from pipeline.config.harvest import check
    from pipeline.config.mining import MiningConfig
    t0 = time.perf_counter()
    try:
        (MiningConfig.from_yaml if sys.argv[2] == "mining" else check)(sys.argv[1])
    except ValueError as exc:
        print(f"{time.perf_counter() - t0:.3f} {exc}")
"""


@pytest.mark.parametrize("name", YAML_BOMBS)
@pytest.mark.parametrize("loader", ["harvest", "mining"])   # `train`/`demo`/`run --config`, `mine --config`
def test_yaml_bombs_fail_in_one_line_fast_and_small(tmp_path, name, loader):
    """In a process of its own: the check's seconds, and the whole process's peak RSS (interpreter, yaml and the
    config modules are about 30 MB of it)."""
    text, expected = YAML_BOMBS[name]
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    rc, out, err, _, peak = run([sys.executable, "-c", PROBE, str(path), loader], tmp_path, timeout=60)
    assert (rc, err) == (0, []) and len(out) == 1, (rc, out, err)
    seconds, message = out[0].split(" ", 1)
    assert expected in message, message
    assert_one_line(message, float(seconds), path)
    assert peak < 100e6, peak


def test_a_plain_top_level_list_is_still_named_as_such(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"\(top level\) = \['a', 'b'\]: must be a mapping"):
        read_yaml(path)


def test_many_unknown_keys_are_named_in_a_short_line(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("".join(f"key{k}: 1\n" for k in range(3000)))
    message, seconds = timed_check(path)
    assert "unknown key(s) key0, key1, " in message and "and 2,990 more" in message
    assert_one_line(message, seconds, path)


def test_shipped_configs_are_far_below_the_bounds():
    for path in (REPO / "configs").glob("*.yaml"):
        assert path.stat().st_size < 20_000
        assert read_yaml(path)


@pytest.mark.parametrize("name", INIT_CASES)
def test_init_that_is_not_our_weights_fails_in_one_line(tmp_path, name):
    path = tmp_path / "w" / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"init": init_value(tmp_path / "w", name)}}))
    message, seconds = timed_check(path)
    assert message.startswith(f"config {path}: model.init = "), message
    assert INIT_CASES[name][1] in message, message
    assert_one_line(message, seconds, path)


def test_the_shipped_weights_pass(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump({"model": {"init": str(SHIPPED_WEIGHTS), "arch": "resnet18"}}))
    check(path)


def test_load_init_fails_in_one_line(tmp_path):
    """The loader's own check, for weights that changed after the config was checked."""
    torch = pytest.importorskip("torch")
    from pipeline.training.weights import load_init
    init_value(tmp_path, "random bytes")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x02}q\x00.")          # a legacy (non-zip) torch file
    with zipfile.ZipFile(tmp_path / "garbage.pt", "w") as z:          # passes the cheap check, not torch.load
        z.writestr("archive/data.pkl", b"\x80\x02X\x15\x00\x00\x00cxr-harvest-weights/1\xff\xfe")
    for init in ["random.pt", "truncated.pt", "foreign.pt", "plain.zip", "pickle.pt", "garbage.pt"]:
        with pytest.raises(ValueError) as err:
            load_init(torch.nn.Linear(1, 1), tmp_path / init, "resnet18")
        assert str(err.value).startswith(f"model.init {tmp_path / init}: ") and "\n" not in str(err.value)
    assert "cannot be loaded" in str(err.value)


@pytest.mark.parametrize("name", MAGNITUDES)
def test_absurd_magnitudes_fail_in_one_line_naming_the_bound(tmp_path, name):
    text, key = MAGNITUDES[name]
    path = tmp_path / "big.yaml"
    path.write_text(text)
    message, seconds = timed_check(path)
    assert message.startswith(f"config {path}: {key} = "), message
    assert "at most" in message or "in [" in message or "Exceeds the limit" in message, message
    assert_one_line(message, seconds, path)


@pytest.mark.parametrize("section, key, value", [
    ({"train": {"epochs": 10**9}}, "train.epochs", 10**9),
    ({"train": {"batch_size": 10**9}}, "train.batch_size", 10**9),
    ({"predict": {"per_finding": 10**6}}, "predict.per_finding", 10**6),
    ({"predict": {"max_detections": 10**12}}, "predict.max_detections", 10**12),
    ({"model": {"rpn_top_n": [10**9, 10]}}, "model.rpn_top_n", 10**9),
    ({"boxes": {"ranks": [10**9]}}, "boxes.ranks", [10**9]),
    ({"seed": 10**20}, "seed", 10**20),
])
def test_detector_counts_are_bounded(section, key, value):
    from pipeline.config.detector import DetectorConfig
    with pytest.raises(ValueError, match=rf"^{re.escape(f'{key} = {value!r}: must be ')}.*(at most|in \[)"):
        DetectorConfig.from_dict(section)


# ------------------------------------------------------------------ through the CLI, in a subprocess

# Linux counts a forked child's peak RSS from before its exec (the parent's, pytest with torch: ~900 MB), so the
# command is started by a small launcher, and its own peak read from the launcher's RUSAGE_CHILDREN. Its data
# segments are capped at 2 GiB: a regression fails with MemoryError instead of eating the machine.
LAUNCHER = """if True:
    import resource, subprocess, sys
    cap = lambda: resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))
    rc = subprocess.call(sys.argv[2:], preexec_fn=cap)
    with open(sys.argv[1], "w") as f:
        f.write(f"{rc} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}")
"""


def run(argv: list[str], cwd: Path, timeout: float) -> tuple[int, list[str], list[str], float, int]:
    """Run `argv` from the repository: exit code, stdout and stderr lines, seconds and the command's peak RSS in
    bytes; killed after `timeout` seconds (a hang or a runaway allocation fails, not a stuck suite)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    report = cwd / "rusage.txt"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(report), *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the launcher and the command
        proc.communicate()
        pytest.fail(f"{' '.join(argv[-5:])}: still running after {timeout} s")
    seconds = time.perf_counter() - t0
    rc, peak = map(int, report.read_text().split())
    return rc, out.splitlines(), err.splitlines(), seconds, peak


CLI_CASES = {   # name -> (verb, config text or a weights case, expected text)
    "train: laughs in a top-level list": ("train", laughs("list"), "once its aliases are expanded"),
    "train: merge keys": ("train", merge_bomb(), "once its aliases are expanded"),
    "train: init is /etc/passwd": ("train", "passwd by traversal", "is not a weights file"),
    "train: init is truncated weights": ("train", "a truncated weights file", "is not a weights file"),
    "train: am.steps 10**23": ("train", MAGNITUDES["am.steps"][0], "must be at most 20"),
    "mine: laughs in a top-level list": ("mine", laughs("list"), "once its aliases are expanded"),
    "demo: laughs in a top-level list": ("demo", laughs("list"), "once its aliases are expanded"),
}


@pytest.mark.parametrize("name", CLI_CASES)
def test_the_cli_fails_in_one_line_with_bounded_memory(tmp_path, name):
    verb, text, expected = CLI_CASES[name]
    path = tmp_path / "w" / "bad.yaml"
    (tmp_path / "w").mkdir()
    init = init_value(tmp_path / "w", text) if text in INIT_CASES else None
    path.write_text(yaml.safe_dump({"model": {"init": init}}) if init else text)
    rc, _, err, seconds, peak = run([sys.executable, "-m", "flows.cli", verb, "--config", str(path),
                                     "--home", str(tmp_path / "home")], tmp_path, timeout=300)
    assert rc == 1, (rc, err)
    assert len(err) == 1 and err[0].startswith(f"harvest {verb}: error: config {path}: "), err
    assert expected in err[0], err
    assert peak < 300e6, peak                # the whole process, interpreter and imports included (~100-150 MB)
    assert not (tmp_path / "home").exists()  # nothing ran
    assert seconds < 300, seconds            # imports dominate: seconds idle, 100 s (Prefect) on a loaded 2-core box
