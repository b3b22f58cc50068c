"""Flow 2: staged training (base -> MSA init -> end-to-end -> AM/KP stages), a thin wrapper of
`pipeline.training`. `harvest train --config configs/demo.yaml`. Prefect and torch load only once the config
has passed its checks (`flows._verbs`)."""
from __future__ import annotations

import logging
from contextlib import contextmanager

from flows._runtime import prefect_api
from flows._verbs import create_table_artifact, flow, recorded_run, task
from pipeline.base.home import Home
from pipeline.config.train import load_config


@contextmanager
def forward_logs(name: str, target: logging.LoggerAdapter):
    """Send the records of logger `name` (epoch summaries) to `target`: the terminal and the Prefect UI."""
    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            target.log(record.levelno, record.getMessage())
    source, handler = logging.getLogger(name), Forward(logging.INFO)
    saved = source.level, source.propagate
    source.level, source.propagate = logging.INFO, False     # once, through the run logger
    source.addHandler(handler)
    try:
        yield
    finally:
        source.removeHandler(handler)
        source.level, source.propagate = saved


@task(name="train-stages")
def train_task(home: str, config_path: str, nproc: int, resume: bool) -> str:
    from prefect import get_run_logger

    from pipeline.training import train_distributed
    with forward_logs("pipeline.training", get_run_logger()):
        return train_distributed(home, config_path, nproc, resume=resume)


@flow(name="train", log_prints=True)
def train_flow(home: str, config_path: str, resume: bool = True, nproc: int | None = None) -> str:
    from pipeline.training import default_nproc, lineage
    nproc = nproc or default_nproc()
    params = {"config": config_path, "resume": resume, "nproc": nproc}
    with recorded_run(home, "train", params) as run_id:
        model_id = train_task(home, config_path, nproc, resume)
    rows = [{"stage": r["stage"], "model_id": r["model_id"], "parent_id": r["parent_id"],
             "metrics": r["metrics"]} for r in lineage(home, model_id)]
    create_table_artifact(key="train-summary", table=rows,
                          description=f"Training run {run_id} from {config_path}: final model {model_id}")
    print(f"train: final model {model_id} ({len(rows)} stages)")
    return model_id


def _run(args) -> int:
    load_config(args.config)   # a bad config fails here, in one line, before a Prefect server starts
    home = str(Home.resolve(args.home).make().root)
    with prefect_api(home):   # the home's Prefect server, unless $PREFECT_API_URL is set
        train_flow(home, args.config, resume=args.resume, nproc=args.nproc)
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train the ResNet-MSA classifier with attention mining and KP",
                       description="Run the staged schedule of the config (sec. 3.1). Each stage writes a "
                                   "checkpoint registered in the `models` table; finished stages are reused "
                                   "and an interrupted one resumes from its last checkpoint.")
    p.add_argument("--config", required=True, help="training config YAML, e.g. configs/demo.yaml")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="reuse finished stages and resume the unfinished one (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="retrain every stage from scratch")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes (DDP under torchrun); default: one per visible GPU, else 1")
    p.set_defaults(func=_run)
