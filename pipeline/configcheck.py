"""The one-line config error, and the small checks every config loader shares.

Every bad value is reported before anything runs, as one line naming the dotted key, the value and what is
allowed: `config configs/x.yaml: runtime.batch_size = -4: must be a positive integer`.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import yaml


def invalid(path: str, value, allowed: str) -> ValueError:
    """`runtime.batch_size = -4: must be a positive integer`."""
    return ValueError(f"{path} = {value!r}: {allowed}")


def require(ok: bool, path: str, value, allowed: str) -> None:
    if not ok:
        raise invalid(path, value, allowed)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_section(path: str, value) -> dict:
    """A section (`runtime:`) must be a mapping; an empty one (`runtime:` alone, YAML null) is `{}`."""
    require(value is None or isinstance(value, dict), path, value, "must be a section (a mapping of keys)")
    return dict(value or {})


def check_keys(path: str, data: dict, valid) -> None:
    """Unknown keys are errors: a typo must not silently fall back to a default."""
    unknown = sorted(set(data) - set(valid), key=str)
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
                         f"valid{' in ' + path if path else ''}: {', '.join(sorted(valid))}")


def read_yaml(path) -> dict:
    """A config file's top-level mapping ({} for an empty file); ValueError (one line) when it is not one."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {' '.join(str(exc).split())}") from None
    require(data is None or isinstance(data, dict), "(top level)", data, "must be a mapping of keys")
    return data or {}


@contextmanager
def config_file(path):
    """Prefix the ValueErrors raised inside with `config PATH: `."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"config {path}: {exc}") from None
