"""`harvest`: the one command-line door. Each verb lives in `flows/<verb>.py` and defines `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Prefect's telemetry cannot reach the internet from lab machines; switching it off also halves server start-up.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

VERBS = ["flows.ingest", "flows.query", "flows.phantom", "flows.train", "flows.mine", "flows.tune",
         "flows.evaluate", "flows.ablate", "flows.export", "flows.harvest", "flows.serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harvest", description="Mine boxes of thoracic disease from image-level labels "
                                    "(Cai et al., MICCAI 2018: attention mining + knowledge preservation).")
    parser.add_argument("--home", default=None,
                        help="home folder for the warehouse, cache, checkpoints, exports and reports "
                             "(default: $HARVEST_HOME, else ./harvest-data)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERBS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:   # verb not built in this checkout
                continue
            raise
        module.register(sub)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"harvest {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
