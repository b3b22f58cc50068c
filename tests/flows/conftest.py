"""Fixtures of the flow tests: one real Prefect server per session, a real Dask cluster (scheduler + 2 worker
processes on loopback) per module, and a small ingested home with a tiny registered model."""
from __future__ import annotations

import shutil

import pytest

from tests.conftest import register_tiny_model
from tests.flows.prefect_server import session_server

N_IMAGES, CACHE_SIZE = 40, 64


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    with session_server(tmp_path_factory.mktemp("prefect")) as server:
        yield server


@pytest.fixture(scope="module")
def dask_cluster(prefect_api):
    """Scheduler and 2 single-threaded worker processes; they inherit PREFECT_API_URL from the environment."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def mining_base_home(tmp_path_factory):
    """Phantom images ingested into a 64 px cache, and a tiny ResNet-18 checkpoint registered as a model."""
    from pipeline.ingest.nih import ingest_nih
    from pipeline.phantom import generate

    base = tmp_path_factory.mktemp("mine")
    generate(base / "phantom", n=N_IMAGES, seed=0, size=128, workers=1, progress=False)
    home = base / "home"
    ingest_nih(home, base / "phantom", sizes=(CACHE_SIZE,))
    register_tiny_model(home, "tiny-r18", neck="baseline", input_size=CACHE_SIZE)
    return home


@pytest.fixture
def mining_home(mining_base_home, tmp_path):
    """A fresh copy of the base home, so each test mines from nothing."""
    return shutil.copytree(mining_base_home, tmp_path / "home")
