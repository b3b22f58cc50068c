"""The one-line config error, the small checks every config loader shares, and the generic typed loader
(`from_dict`: a dataclass from a nested dict, each value checked against its field's type hint).

Every bad value is reported before anything runs, as one line naming the dotted key, the value and what is
allowed: `config configs/x.yaml: runtime.batch_size = -4: must be a positive integer`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
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


def plain(obj):
    """Tuples -> lists, recursively: the form JSON and `torch.load(weights_only=True)` accept."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def from_dict(cls, data: dict | None, path: str = ""):
    """Build dataclass `cls` from a nested dict, each value checked against its field's type hint.

    Unknown keys raise with the valid ones named; a value of the wrong type raises naming its dotted key
    (`runtime.batch_size = 'eight': must be an integer`); `path` is the dotted key of `data` itself. The
    ValueErrors of `cls`'s own checks (`__post_init__`) name keys relative to `cls` and get `path` prefixed.
    A nested section given in part keeps the field's own defaults for the rest: `base: {epochs: 5}` keeps
    the base stage's lr 0.1 (StagesConfig's default), not StageConfig's generic one.
    """
    data = check_section(path or "(top level)", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(path, data, fields)
    kwargs = {}
    for key, value in data.items():
        typ, key_path = hints[key], f"{path}.{key}" if path else key
        if dataclasses.is_dataclass(typ):
            f = fields[key]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else typ()
            section = check_section(key_path, value)
            kwargs[key] = from_dict(typ, merge(plain(dataclasses.asdict(default)), section), key_path)
        else:
            kwargs[key] = _typed(value, typ, key_path)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{path}.{exc}" if path else str(exc)) from None


def _typed(value, typ, path: str):
    """`value` checked against the type hint `typ`; lists become tuples. An int passes as a float unchanged:
    the stored config, and so the stage fingerprints, keep what was written."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):          # `int | None`
        if value is None and type(None) in args:
            return None
        (typ,) = [a for a in args if a is not type(None)]
        return _typed(value, typ, path)
    if origin is tuple:
        variadic = len(args) == 2 and args[1] is Ellipsis
        count = "" if variadic else f"{len(args)} "
        require(isinstance(value, (list, tuple)) and (variadic or len(value) == len(args)), path, value,
                f"must be a list of {count}{_PLURAL[args[0]]}")
        for i, (item, t) in enumerate(zip(value, args[:1] * len(value) if variadic else args)):
            _typed(item, t, f"{path}[{i}]")
        return tuple(value)
    if typ is float and isinstance(value, str) and _EXPONENT_TEXT.fullmatch(value.strip()):
        raise invalid(path, value, f"must be a number (YAML reads {value} as text: write it with a dot, "
                                   f"e.g. 1.0e-4)")
    ok = is_number(value) and math.isfinite(value) if typ is float else \
        is_int(value) if typ is int else isinstance(value, typ)
    require(ok, path, value, f"must be {_SINGULAR[typ]}")
    return value


_SINGULAR = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "a mapping"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
_EXPONENT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


SIZE_RULE = "a multiple of 32, at least 64 (pixels)"


def size_ok(size: int) -> bool:
    return size >= 64 and size % 32 == 0


def device_ok(device: str, auto: bool = False) -> bool:
    """cpu | cuda | cuda:N, and auto where `auto`."""
    return device in ("cpu", "cuda") or (auto and device == "auto") or re.fullmatch(r"cuda:\d+", device) is not None


def one_of(choices) -> str:
    return f"must be one of {', '.join(choices)}"


def merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k] if isinstance(out.get(k), dict) else {}, v) if isinstance(v, dict) else v
    return out


def fingerprint(*parts) -> str:
    """sha256 of canonical JSON: the identity of a stage (its inputs), used to skip finished stages."""
    return hashlib.sha256(json.dumps(plain(parts), sort_keys=True).encode()).hexdigest()
