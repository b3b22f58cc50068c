"""Resolve once, connect once (#20 item 2): how often each verb opens the warehouse, counted with
$HARVEST_TRACE_CONNECT (`warehouse.db.connect` appends pid, mode and openers per open). The verbs run in this
process through `flows.cli.main` on a copy of the flow tests' phantom home, mining on the module's Dask workers,
whose trace goes to the same file: a worker opens the warehouse zero times."""
from __future__ import annotations

import os
import shutil

import pytest
import yaml

from flows.cli import main
from tests.conftest import scratch
from tests.flows.test_harvest import TINY
from warehouse import db

TRACE = "HARVEST_TRACE_CONNECT"
STAGES = 3   # base, msa_init, end_to_end: TINY without its AM stages, to keep this file short
# verb -> most opens, the CLI's checks and the run record's start and finish included (docs/architecture.md,
# Connections: train 4 + one per stage, was 4 + 4 per stage + 1)
MOST = {"train": 4 + STAGES, "mine": 4, "evaluate": 6, "export": 4, "status": 1}


@pytest.fixture(scope="module")
def opens(mining_base_home, prefect_api, dask_cluster, tmp_path_factory) -> dict[str, list[list[str]]]:
    """verb -> its trace lines [pid, mode, openers], for train, mine, evaluate, export and status run in turn (tune
    opens 4 times, as before #20 item 2; this home has no tuning set)."""
    from distributed import Client

    phantom = mining_base_home.parent / "phantom"
    out = {}
    with (scratch(tmp_path_factory, "connections") as tmp, Client(dask_cluster) as client,
          pytest.MonkeyPatch.context() as mp):
        home = str(shutil.copytree(mining_base_home, tmp / "home"))
        config = tmp / "tiny.yaml"
        config.write_text(yaml.safe_dump({**TINY, "am": {"steps": 0}}))

        def run(verb: str, *args: str) -> None:
            path = str(tmp / f"{verb}.tsv")
            mp.setenv(TRACE, path)
            client.run(os.environ.__setitem__, TRACE, path)   # the workers started before: tell them too
            try:
                assert main(["--home", home, verb, *args]) == 0
            finally:
                mp.delenv(TRACE)
                client.run(os.environ.pop, TRACE, None)
            out[verb] = [line.split("\t") for line in open(path).read().splitlines()] if os.path.exists(path) else []

        run("train", "--config", str(config))
        run("mine", "--split", "all", "--shard-size", "20", "--dask-address", dask_cluster.scheduler_address)
        with db.reading(home) as con:
            [(mining,)] = con.execute("SELECT run_id FROM runs WHERE flow = 'mine'").fetchall()
        run("evaluate", "--run", mining, "--no-report")
        run("export", "--run", mining, "--format", "coco", "--all", "--image-root", str(phantom))
        run("status")
    return out


@pytest.mark.parametrize("verb", MOST)
def test_a_verb_opens_the_warehouse_at_most_so_often(opens, verb):
    lines = opens[verb]
    assert 0 < len(lines) <= MOST[verb], "\n".join("\t".join(line) for line in lines)


def test_no_mining_worker_opens_the_warehouse(opens):
    lines = opens["mine"]
    assert all(pid == str(os.getpid()) for pid, _, _ in lines), lines   # the flow's process only
    assert not [line for line in lines if "mine_shard" in line[2]], lines


def test_training_reads_its_data_once_and_registers_each_stage(opens):
    lines = opens["train"]
    assert [opener.split(" < ")[0] for _, mode, opener in lines if mode == "ro"] == \
        ["stages.train", "checkpoint.lineage"], lines   # image sets, digest and cache index; the summary's lineage
    assert sum("register_model" in opener for _, _, opener in lines) == STAGES


def test_an_evaluation_reads_on_one_connection_and_writes_on_one(opens):
    inside = [(mode, opener) for _, mode, opener in opens["evaluate"] if "evaluate_run" in opener]
    assert [mode for mode, _ in inside] == ["rw", "rw"], inside   # reads (and trust's store), then the results
