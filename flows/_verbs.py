"""What a verb module needs before it pays for Prefect: lazy Prefect decorators and input checks.

`flows/cli.py` imports the chosen verb's module to register it, and Prefect (torch too, for some verbs) takes
seconds to import. A verb module that takes `flow`, `task` and the artifact functions from here imports in a
fraction of a second: its flows and tasks become real Prefect objects on first use (a call or an attribute such
as `.fn` or `.with_options`). So its CLI function can check the inputs first (:func:`require_run`) and fail in
one line, before Prefect is imported or a server starts.
"""
from __future__ import annotations

import functools
import importlib

from pipeline.base.home import Home
from warehouse import db

LIST_RUNS = 'list runs with `harvest status` or `harvest sql "SELECT run_id, flow, status FROM runs"`'


class _Lazy:
    """A Prefect flow or task, built from `fn` by `prefect.<kind>(**options)` on first use."""

    def __init__(self, kind: str, options: dict, fn):
        self._kind, self._options, self._fn = kind, options, fn
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def prefect(self):
        return getattr(importlib.import_module("prefect"), self._kind)(**self._options)(self._fn)

    def __call__(self, *args, **kwargs):
        return self.prefect(*args, **kwargs)

    def __getattr__(self, name: str):   # only names the proxy lacks: .fn, .submit, .with_options, .name, ...
        if name.startswith("__") or name in ("_kind", "_options", "_fn", "prefect"):
            raise AttributeError(name)
        return getattr(self.prefect, name)


def flow(**options):
    """`prefect.flow(**options)`, applied on first use."""
    return lambda fn: _Lazy("flow", options, fn)


def task(**options):
    """`prefect.task(**options)`, applied on first use."""
    return lambda fn: _Lazy("task", options, fn)


def _artifact_function(name: str):
    def call(*args, **kwargs):
        return getattr(importlib.import_module("prefect.artifacts"), name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`prefect.artifacts.{name}`, imported on first call."
    return call


create_link_artifact = _artifact_function("create_link_artifact")
create_markdown_artifact = _artifact_function("create_markdown_artifact")
create_table_artifact = _artifact_function("create_table_artifact")


class UnknownRun(ValueError):
    """A run id that is not in the warehouse (a ValueError: the CLI prints its message as one line)."""


def require_run(home, run_id: str, verb: str) -> None:
    """Raise :class:`UnknownRun` unless `run_id` is in `runs` or has mined boxes; read-only and fast (no
    Prefect, no torch). A home without a warehouse raises FileNotFoundError (from `db.connect`)."""
    home = Home.resolve(home)
    con = db.connect(home, read_only=True)
    try:
        known = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] or \
            con.execute("SELECT count(*) FROM (SELECT 1 FROM mined_boxes WHERE run_id = ? LIMIT 1)",
                        [run_id]).fetchone()[0]
    finally:
        con.close()
    if not known:
        raise UnknownRun(f"no run {run_id!r} in {home.warehouse}; {LIST_RUNS}, and pass a mining run to "
                         f"`harvest {verb} --run`")
