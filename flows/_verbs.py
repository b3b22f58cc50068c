"""What a verb module needs before it pays for Prefect: lazy Prefect decorators and input checks.

`flows/cli.py` imports the chosen verb's module to register it, and Prefect (torch too, for some verbs) takes
seconds to import. A verb module that takes `flow`, `task` and the artifact functions from here imports in a
fraction of a second: its flows and tasks become real Prefect objects on first use (a call or an attribute such
as `.fn` or `.with_options`). So its CLI function can check the inputs first (:func:`require_run`) and fail in
one line, before Prefect is imported or a server starts.

Inside :func:`plain` the same flows and tasks run as the plain functions they wrap and the artifact functions do
nothing: a small verb that needs no flow history runs without importing Prefect or starting a server
(`flows._runtime.flow_api`); the warehouse's `runs` table records the run either way.
"""
from __future__ import annotations

import contextvars
import functools
import importlib
import sys
from contextlib import contextmanager

from pipeline.base.home import Home
from warehouse import db

_PLAIN = contextvars.ContextVar("harvest_plain_flows", default=False)
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
        return self._fn(*args, **kwargs) if _PLAIN.get() else self.prefect(*args, **kwargs)

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


@contextmanager
def plain():
    """Within: flows and tasks of this module are plain calls, artifacts are skipped, Prefect is not imported."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def in_plain() -> bool:
    return _PLAIN.get()


def _artifact_function(name: str):
    def call(*args, **kwargs):
        if _PLAIN.get():
            return None
        return getattr(importlib.import_module("prefect.artifacts"), name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`prefect.artifacts.{name}`, imported on first call."
    return call


create_link_artifact = _artifact_function("create_link_artifact")
create_markdown_artifact = _artifact_function("create_markdown_artifact")
create_table_artifact = _artifact_function("create_table_artifact")


class UnknownRun(ValueError):
    """A run id that is not in the warehouse (a ValueError: the CLI prints its message as one line)."""


def require_run(home, run_id: str, verb: str, con=None) -> None:
    """Raise :class:`UnknownRun` unless `run_id` is in `runs` or has mined boxes; fast (no Prefect, no torch), on
    `con` or a read-only connection of its own. A home without a warehouse raises FileNotFoundError."""
    home = Home.resolve(home)
    with db.reading(home, con) as con:
        known = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] or \
            con.execute("SELECT count(*) FROM (SELECT 1 FROM mined_boxes WHERE run_id = ? LIMIT 1)",
                        [run_id]).fetchone()[0]
    if not known:
        raise UnknownRun(f"no run {run_id!r} in {home.warehouse}; {LIST_RUNS}, and pass a mining run to "
                         f"`harvest {verb} --run`")


def check_findings(names) -> list[str] | None:
    """`--findings` in their official spelling (None stays None), or one line naming the unknown one and the 14
    known (a ValueError), before Prefect is imported or the warehouse is opened."""
    from pipeline.base.vocab import normalize_finding
    return None if names is None else [normalize_finding(name) for name in names]


def name_flow_run(run_id: str) -> None:
    """Name the current Prefect flow run after the warehouse run it records (`runs.run_id`), in the UI and on the
    console; nothing outside a flow run or in :func:`plain`."""
    if _PLAIN.get() or "prefect" not in sys.modules:
        return
    from prefect.context import FlowRunContext
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow_run.name == run_id:
        return
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        client.update_flow_run(ctx.flow_run.id, name=run_id)
    ctx.flow_run.name = run_id   # the run's later log lines say it too


@contextmanager
def recorded_run(home, flow: str, params: dict, model_id: str | None = None, run_id: str | None = None):
    """`pipeline.runs.record.recorded_run`, the current flow run named after the run id (:func:`name_flow_run`)."""
    from pipeline.runs.record import recorded_run as record
    with record(home, flow, params, model_id, run_id) as recorded:
        name_flow_run(recorded)
        yield recorded
