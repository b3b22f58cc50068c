"""`process_started` without psutil (a bare GPU host) reads /proc with psutil's formula: the same start times."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from pipeline.base.lifeline import proc_started

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc only")


def test_proc_and_psutil_agree_on_live_processes_and_on_a_dead_one():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for pid in (os.getpid(), child.pid, 1):
            assert proc_started(pid) == pytest.approx(psutil.Process(pid).create_time(), abs=0.02), pid
    finally:
        child.kill()
        child.wait()
    assert proc_started(child.pid) is None   # reaped: gone
