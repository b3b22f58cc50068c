"""Shared runtime of the flows: which Prefect API a flow uses (`prefect_api`), and a Dask cluster sized to the
machine. The server processes themselves are `flows._prefect_server` (start, stop) and `flows._home_server` (one
per home)."""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import ExitStack, contextmanager

from flows._home_server import home_prefect_server, running_home_server
from flows._prefect_server import OFFLINE_ENV, use_prefect_api


@contextmanager
def prefect_api(home=None):
    """Use `$PREFECT_API_URL` when set (a user's long-lived server, docker compose); else the home's own
    loopback server, whose database keeps every run's history (`flows._home_server`), shared by the flow,
    its Dask workers and any other command on the same home. Without a home (library use), or when the home's
    server runs on another host (a shared file system), a temporary home's server, removed afterwards."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    with ExitStack() as stack:
        url = stack.enter_context(home_prefect_server(home)) if home is not None else None
        if url is None:
            temporary = stack.enter_context(tempfile.TemporaryDirectory(prefix="harvest-home-"))
            url = stack.enter_context(home_prefect_server(temporary))
        with use_prefect_api(url):
            yield url


@contextmanager
def flow_api(home):
    """For the verbs that need no flow history (export, evaluate, tune): `$PREFECT_API_URL` when set, else the
    home's server when one runs (joined, as `prefect_api` would): the flow run lands in the home's history. Else
    no server starts and Prefect is not imported: the flows and tasks run as plain functions (`flows._verbs.plain`)
    and yield None; the warehouse's `runs` table records the run either way."""
    from flows._verbs import plain

    url = os.environ.get("PREFECT_API_URL")
    with ExitStack() as stack:
        url = url or stack.enter_context(running_home_server(home))
        if url is None:
            stack.enter_context(plain())
        elif not os.environ.get("PREFECT_API_URL"):
            stack.enter_context(use_prefect_api(url))
        yield url


def local_cluster_kwargs(n_workers: int | None = None, api_url: str | None = None) -> dict:
    """`distributed.LocalCluster` kwargs sized to the machine's devices: one worker process per GPU, else 2
    (1 on a one-core machine). Each worker runs one task at a time; torch gets the cores divided among the
    workers (OMP_NUM_THREADS, which overrides the nanny's default of 1). Workers report to `api_url`."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = os.cpu_count() or 1
    n = n_workers or gpus or min(2, cores)
    threads = str(max(1, cores // n))
    env = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_") or k in OFFLINE_ENV}
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **({"PREFECT_API_URL": api_url} if api_url else {}))
    return dict(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address=":0", env=env)   # dashboard on any free port: no clash with other clusters


def dask_task_runner(address: str | None = None, n_workers: int | None = None, api_url: str | None = None):
    """prefect-dask runner on the scheduler at `address`, or on a fresh LocalCluster sized to the devices
    whose workers report to `api_url`. Workers of an existing cluster need no Prefect environment: each task
    carries the flow's settings, PREFECT_API_URL included, so run the flow against a real server
    (`prefect_api()`), never an ephemeral one."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs=local_cluster_kwargs(n_workers, api_url))


DASK_ADDRESS_ENV = "HARVEST_DASK_ADDRESS"


def add_dask_address(parser) -> None:
    """`--dask-address`, defaulting to $HARVEST_DASK_ADDRESS (set by docker/compose.yaml)."""
    parser.add_argument("--dask-address", metavar="tcp://HOST:PORT", default=os.environ.get(DASK_ADDRESS_ENV) or None,
                        help=f"use this Dask scheduler (default ${DASK_ADDRESS_ENV} if set, else a LocalCluster: "
                             "one worker per GPU, or 2 on CPU)")


def gpu_index(worker_name, n_gpus: int) -> int:
    """The GPU of a Dask worker by its name: the trailing number modulo the visible GPUs. LocalCluster names
    workers 0..n-1; `dask worker --nworkers N --name w` names them w-0..w-(N-1); a name without a number (or a
    worker named by its address, whose digits are a port) gets GPU 0, right for one GPU per worker host."""
    name = str(worker_name)
    match = None if "://" in name else re.search(r"(\d+)$", name)
    return int(match.group(1)) % n_gpus if match and n_gpus else 0


def worker_device() -> str:
    """The torch device of this Dask worker (`gpu_index`), so one worker per GPU; else CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    try:
        from distributed import get_worker
        name = get_worker().name
    except (ValueError, ImportError):   # not inside a worker
        name = 0
    return f"cuda:{gpu_index(name, torch.cuda.device_count())}"
