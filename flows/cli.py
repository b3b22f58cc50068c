"""`harvest`: the one command-line door. Each verb lives in `flows/<verb>.py` and defines `register(subparsers)`.

Only the chosen verb's module is imported (the others pull in torch and Prefect): `COMMANDS` lists every verb
with its module and one-line help, which is all `harvest --help` needs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Prefect's telemetry cannot reach the internet from lab machines; switching it off also halves server start-up.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# One line per failed task or flow run on the console, and no links to a server gone at exit (flows/_logging.py)
os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", os.path.join(os.path.dirname(__file__), "logging.yml"))

# verb -> (module that registers it, one-line help), in the order `harvest --help` lists them
COMMANDS = {
    "ingest": ("flows.ingest", "ingest an NIH ChestX-ray14 folder or a folder of DICOM files"),
    "sql": ("flows.query", "run a read-only SQL query over the warehouse and print a table"),
    "status": ("flows.query", "counts per table, last runs, rejects by reason"),
    "check": ("flows.check", "verify the warehouse against its files; --repair rebuilds what it can"),
    "phantom": ("flows.phantom", "write a phantom ChestX-ray14 in the NIH layout (exact boxes in truth.csv)"),
    "pretrain": ("flows.pretrain", "make starting weights from a phantom of a seed reserved for pretraining"),
    "train": ("flows.train", "train the ResNet-MSA classifier with attention mining and KP"),
    "mine": ("flows.mine", "mine boxes with a trained model, sharded on Dask"),
    "tune": ("flows.tune", "choose mining box thresholds on the validation split"),
    "evaluate": ("flows.evaluate", "score a mining run against ground-truth boxes (Wang/Cai protocol)"),
    "ablate": ("flows.ablate", "the paper's ablations (MSA necks, AM steps, KP variants) on phantom data"),
    "detector": ("flows.detector", "train a detector on a mining run's boxes, predict, compare on truth"),
    "export": ("flows.export", "export a mining run's boxes as COCO, YOLO or NIH CSV pseudo-labels"),
    "import-review": ("flows.review", "import boxes corrected in Label Studio or CVAT as reviewed ground truth"),
    "demo": ("flows.harvest", "the whole pipeline on the embedded phantom data (about 8 min on 2 cores, 15 at most on AVX2)"),
    "run": ("flows.harvest", "the harvest flow: ingest a folder, train, mine, evaluate, export"),
    "serve": ("flows.serve", "serve the scheduled deployments of prefect.yaml"),
    "ui": ("flows.serve", "open the Prefect UI on the home's flow-run history"),
}
VERBS = list(dict.fromkeys(module for module, _ in COMMANDS.values()))   # the verb modules


def build_parser(modules=VERBS) -> argparse.ArgumentParser:
    """The parser with the verbs of `modules` registered; every other verb is listed with its help only."""
    parser = argparse.ArgumentParser(
        prog="harvest", description="Mine boxes of thoracic disease from image-level labels "
                                    "(Cai et al., MICCAI 2018: attention mining + knowledge preservation).")
    parser.add_argument("--home", default=None,
                        help="home folder for the warehouse, cache, checkpoints, exports and reports "
                             "(default: $HARVEST_HOME, else ./harvest-data)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for module in modules:
        importlib.import_module(module).register(sub)
    for verb, (_, help_line) in COMMANDS.items():
        if verb not in sub.choices:   # a placeholder: takes any arguments, imports nothing
            sub.add_parser(verb, help=help_line, add_help=False)
    for verb_parser in sub.choices.values():
        _add_home(verb_parser)
    return parser


def _add_home(p: argparse.ArgumentParser) -> None:
    if not any("--home" in a.option_strings for a in p._actions):
        p.add_argument("--home", default=argparse.SUPPRESS, help="home folder (overrides the global --home)")
    for action in p._actions:   # nested verbs, e.g. `ingest nih`
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_home(child)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = build_parser(modules=()).parse_known_args(argv)[0].verb
    parser = build_parser(modules=[COMMANDS[verb][0]] if verb else ())
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except BrokenPipeError:   # `harvest status | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"harvest {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        full = disk_full(exc, getattr(args, "home", None))
        if full:
            print(f"harvest {args.verb}: error: {full}", file=sys.stderr)
            return 1
        line = _one_line(exc)
        if line is None:
            raise
        print(f"harvest {args.verb}: error: {line}", file=sys.stderr)
        return 1
    return int(result or 0)


def disk_full(exc: BaseException, home=None) -> str | None:
    """One line for an error caused by a full disk (ENOSPC anywhere in the exception's chain, or a library's
    message saying so), naming the path and the space left; None for any other error."""
    import errno

    from pipeline.base.files import free_bytes
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            path = getattr(e, "filename", None)
            if path is None:   # the library did not say: the fullest of the home's folders
                root = os.path.abspath(home or os.environ.get("HARVEST_HOME") or "harvest-data")
                folders = [root] + [f.path for f in os.scandir(root) if f.is_dir()] if os.path.isdir(root) else [root]
                path = min(folders, key=free_bytes)
            return (f"no space left on the device writing {path} ({free_bytes(path) / 2**20:.0f} MiB free there); "
                    "free some space and rerun the same command: it resumes")
        e = e.__cause__ or e.__context__
    return None


def _one_line(exc: Exception) -> str | None:
    """The message of an error that says it all, else None. Warehouse errors are known only when its module is
    already imported (importing it here would slow the CLI): a busy lock, a query reaching a damaged part."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, ValueError, KeyError)):
        return str(exc)
    db = sys.modules.get("warehouse.db")
    if db is None:
        return None
    return str(exc) if isinstance(exc, db.WarehouseBusy) else db.damaged_part_error(exc)


if __name__ == "__main__":
    sys.exit(main())
