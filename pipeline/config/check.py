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
import zipfile
from contextlib import contextmanager
from pathlib import Path

import yaml


def invalid(path: str, value, allowed: str) -> ValueError:
    """`runtime.batch_size = -4: must be a positive integer`; a long value is cut short (a hostile file's list)."""
    shown = repr(value)
    if len(shown) > 120:
        shown = f"{shown[:100]}... ({len(shown):,} characters)"
    return ValueError(f"{path} = {shown}: {allowed}")


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
        more = f" and {len(unknown) - 10:,} more" if len(unknown) > 10 else ""
        raise ValueError(f"unknown key(s) {', '.join(f'{where}{k}' for k in unknown[:10])}{more}; "
                         f"valid{' in ' + path if path else ''}: {', '.join(sorted(valid))}")


# A config is a few KB and a few hundred YAML nodes: far larger ones are hostile (a billion-laughs bomb of aliases
# expands a 1 KB file to 10**9 nodes) and fail, in one line, before any Python object is built.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 10_000
# libyaml's parser when installed (PyYAML's wheels have it): fast, and it refuses nesting deeper than 1,000
# levels, which the pure-Python scanner takes quadratic time over (1,000 `[` take seconds).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path) -> dict:
    """A config file's top-level mapping ({} for an empty file); ValueError (one line) when it is not one.

    Bounded whatever the file holds: at most MAX_CONFIG_BYTES are read, and the composed YAML graph must count
    at most MAX_YAML_NODES nodes with every alias expanded (counted on the graph, without expanding it)."""
    with open(path, "rb") as f:     # not stat(): a FIFO or /dev/zero has no size
        text = f.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES:,} bytes: not a config file")
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            expanded_nodes(node, MAX_YAML_NODES)
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ValueError("not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    require(data is None or isinstance(data, dict), "(top level)", data, "must be a mapping of keys")
    return data or {}


def expanded_nodes(root: yaml.Node, limit: int) -> int:
    """The nodes of a composed YAML graph with every alias (and merge key) expanded, counted over its distinct
    nodes (an alias is the node it names); ValueError once past `limit`, or on an alias inside its own anchor."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_ids:
            raise ValueError("not valid YAML for a config: an alias refers to its own anchor (a recursive value)")
        open_ids.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else ()
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise ValueError(f"more than {limit:,} YAML values once its aliases are expanded "
                                 f"(an alias bomb?): not a config file")
        open_ids.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


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


SIZE_RULE = "a multiple of 32 in [64, 4096] (pixels)"


def size_ok(size: int) -> bool:
    return 64 <= size <= 4096 and size % 32 == 0


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


# Upper bounds of counts, shared by the config loaders (each names its own where only it has one)
MAX_SEED = 2**32 - 1
MAX_BATCH = 4096            # images per step: 4,096 images of 512 px are 4 GB of float32 input alone
MAX_EPOCHS = 10_000
MAX_STEPS = 10_000_000      # optimizer steps (warm-up, save and log cadence)
MAX_AM_STEPS = 20           # T, AM stages and erasure steps (sec. 3.2: T=3 works best)
MAX_RANKS = 16              # boxes per (image, finding): one per mining threshold


def at_most(path: str, value, high: int, what: str) -> None:
    """The upper bound of a count: absurd magnitudes (`am.steps: 10**23`) fail here, not after minutes of work."""
    require(value <= high, path, value, f"must be at most {high:,} ({what})")


# `model.init`: a file written by `pipeline.training.weights.export_weights` (torch.save's zip, our format in its pickle)
WEIGHTS_FORMAT = "cxr-harvest-weights/1"
MAX_WEIGHTS_BYTES = 2 << 30     # a ResNet-50 with its neck is about 100 MB in float16
MAX_PICKLE_BYTES = 16 << 20     # the pickle holds the keys and meta; the tensors lie beside it


def weights_problem(path) -> str | None:
    """Why `path` is not a weights file of ours (None: it looks like one), found without torch and without
    reading the tensors: its size, a zip archive whose directory is whole (a truncated file has none), one
    `data.pkl` (torch.save's layout) that names WEIGHTS_FORMAT."""
    path = Path(path)
    if not path.is_file():
        return "must be an existing weights file"
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        return f"must be a weights file of at most {MAX_WEIGHTS_BYTES >> 30} GiB, not {size:,} bytes"
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
            if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
                return "is a zip archive, not a torch.save file"
            head = archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        return f"is not a weights file written by pipeline.training.weights ({' '.join(str(exc).split())})"
    if WEIGHTS_FORMAT.encode() not in head:
        return f"is a torch file but not cxr-harvest weights (format {WEIGHTS_FORMAT}; see pipeline.training.weights)"
    return None
