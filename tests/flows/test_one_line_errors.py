"""One line, not a traceback (#21 item 7): a full disk names the path and the space left, Ctrl-C ends in one
line, and Prefect's console shows a failed run as one line with no link to a server gone at exit."""
from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from flows.cli import disk_full

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except type(exc):
            exc_info = sys.exc_info()
    return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, msg, None, exc_info)


def formatter():
    from flows._logging import OneLineFormatter
    return OneLineFormatter("%(levelname)s | %(message)s")


def test_a_failed_run_is_one_line_and_the_record_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("HARVEST_TRACEBACKS", raising=False)
    r = record("Task run failed with exception", OSError(errno.ENOSPC, "No space left on device"))
    line = formatter().format(r)
    assert "\n" not in line and "Traceback" not in line
    assert line.endswith("(OSError: [Errno 28] No space left on device)")
    assert r.exc_info is not None                       # the API's handler still gets the whole record
    assert "Traceback" in logging.Formatter().format(r)
    monkeypatch.setenv("HARVEST_TRACEBACKS", "1")
    assert "Traceback" in formatter().format(record("again", ValueError("x")))


def test_links_to_a_loopback_server_point_at_harvest_ui():
    line = formatter().format(record("View at http://127.0.0.1:59413/runs/flow-run/af3c9431-3489"))
    assert "127.0.0.1" not in line and "harvest ui" in line
    kept = formatter().format(record("View at http://prefect.lab.example:4200/runs/flow-run/1"))
    assert "prefect.lab.example" in kept                 # a user's own long-lived server stays linked


def test_disk_full_is_read_from_the_exception_chain(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "part.parquet"))
        except OSError as inner:
            raise RuntimeError("writing the part failed") from inner
    except RuntimeError as exc:
        line = disk_full(exc)
    assert line.startswith(f"no space left on the device writing {tmp_path / 'part.parquet'}") and "MiB free" in line
    assert disk_full(ValueError("bad value")) is None


@pytest.fixture
def small_disk(tmp_path):
    """`<home>/cache` on a 64 KiB tmpfs (root and mount rights needed, else skipped)."""
    cache = tmp_path / "home" / "cache"
    cache.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield tmp_path
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_ingest_and_phantom_check_the_free_space_first(small_disk):
    env = {**os.environ, "PYTHONPATH": REPO}
    phantom = small_disk / "phantom"
    subprocess.run([sys.executable, "-m", "flows.cli", "phantom", "--out", str(phantom), "--n", "24", "--size", "256",
                    "--quiet"], check=True, capture_output=True, env=env, cwd=REPO)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(small_disk / "home"), "ingest", "nih",
                          "--root", str(phantom), "--sizes", "256"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        f"harvest ingest: error: the image cache of 24 images at 256 px needs about 2 MiB in "
        f"{small_disk / 'home' / 'cache'}, and 0 MiB are free there; free some space or choose another folder"]
    assert not (small_disk / "home" / "prefect").exists()              # failed before any server started
    out = subprocess.run([sys.executable, "-m", "flows.cli", "phantom", "--out", str(small_disk / "home" / "cache" / "p"),
                          "--n", "24", "--size", "256"], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith(
        "harvest phantom: error: a phantom of 24 images at 256 px needs about 1 MiB in")


def test_ctrl_c_ends_in_one_line(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "flows.cli", "phantom", "--out", str(tmp_path / "p"), "--n", "3000",
                          "--size", "512"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "p" / "images").is_dir() and time.monotonic() < deadline:   # rendering has begun
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)          # a terminal's Ctrl-C reaches the whole foreground group
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out[-2000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert out.strip().splitlines()[-1] == "harvest phantom: interrupted; rerun the same command to resume"
