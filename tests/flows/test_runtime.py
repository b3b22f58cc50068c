"""Worker-to-GPU mapping and the Dask address default (no cluster needed)."""
import pytest

from flows import cli
import os
import subprocess
import sys

from flows._prefect_server import sweep_stale_prefect_homes
from flows._runtime import gpu_index


@pytest.mark.parametrize("name, gpus, expected", [
    (0, 4, 0), (3, 4, 3), (5, 4, 1), ("7", 8, 7),   # LocalCluster: 0..n-1
    ("w-2", 4, 2), ("node-a-13", 4, 1),              # dask worker --nworkers N --name w
    ("tcp://10.0.0.5:40123", 4, 0),                  # named by address: the digits are a port
    ("gpu-worker", 2, 0), (3, 0, 0),
])
def test_gpu_index(name, gpus, expected):
    assert gpu_index(name, gpus) == expected


@pytest.mark.parametrize("argv", [["mine"], ["run", "--source", "x"], ["serve"]])
def test_dask_address_defaults_to_the_environment(monkeypatch, argv):
    monkeypatch.delenv("HARVEST_DASK_ADDRESS", raising=False)
    assert cli.build_parser().parse_args(argv).dask_address is None
    monkeypatch.setenv("HARVEST_DASK_ADDRESS", "tcp://dask-scheduler:8786")
    assert cli.build_parser().parse_args(argv).dask_address == "tcp://dask-scheduler:8786"
    assert cli.build_parser().parse_args(argv + ["--dask-address", "tcp://h:1"]).dask_address == "tcp://h:1"


def test_sweep_removes_only_folders_of_dead_owners(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folders = {name: tmp_path / f"harvest-prefect-{name}" for name in ("dead", "alive", "unowned")}
    for folder in folders.values():
        folder.mkdir()
    (folders["dead"] / "owner.pid").write_text(dead.stdout.strip())
    (folders["alive"] / "owner.pid").write_text(str(os.getpid()))
    assert sweep_stale_prefect_homes(tmp_path) == [folders["dead"]]
    assert not folders["dead"].exists() and folders["alive"].exists() and folders["unowned"].exists()
