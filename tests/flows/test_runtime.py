"""Worker-to-GPU mapping and the Dask address default (no cluster needed); the API a flow uses without a home."""
import tempfile

import pytest

from flows import cli
from flows._prefect_server import healthy
from flows._runtime import gpu_index, prefect_api


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


def test_without_a_home_a_temporary_homes_server_serves_and_is_removed(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with prefect_api() as url:
        assert healthy(url)
        (folder,) = tmp_path.glob("harvest-home-*")
        assert (folder / "prefect" / "server.json").is_file()      # the home server's own bookkeeping
    assert not list(tmp_path.glob("harvest-home-*"))
