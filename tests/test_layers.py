"""The house holds: every import of the shipped code (top-level and inside functions, read with `ast`) runs
down the layers of docs/architecture.md#layout or stays in its own layer, and no import chain comes back to where
it started. A failure names the file, the line and the import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("warehouse", "models", "pipeline", "flows", "bench")
# Bottom to top: a module may import from its own layer and the layers below it, never from one above.
LAYERS = (
    ("warehouse",),                                  # storage: DuckDB and Parquet, nothing of the pipeline
    ("models",),                                     # pure torch
    ("pipeline", "pipeline.base"),                   # home, lifeline, amp, files, vocab, coords
    ("pipeline.runs",),                              # the runs table, mined parts on disk
    ("pipeline.config",),                            # every config schema and check, no torch
    ("pipeline.images",),                            # data in: decoding, cache, dataset, rejects
    ("pipeline.ingest", "pipeline.phantom"),
    ("pipeline.training",),                          # learning
    ("pipeline.mining",),                            # harvest
    ("pipeline.evaluation",),                        # judging
    ("pipeline.export",),                            # data out, and the review loop's way back
    ("pipeline.detector",),
    ("pipeline.integrity",),                          # `harvest check`: verifies everything, rebuilds with all of the above
    ("flows",),
    ("bench",),
)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def layer(module: str) -> int:
    """The index in LAYERS of the longest prefix naming `module`."""
    best, found = -1, None
    for k, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), k
    if found is None:
        raise LookupError(f"{module} is in no layer: add its package to LAYERS in tests/test_layers.py")
    return found


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module imported) for each import of one of our modules, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            out += [(node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base) for a in node.names]
    return [(line, name) for line, name in out if name.split(".")[0] in PACKAGES]


def edges() -> list[tuple[str, int, str]]:
    """(importer, line, imported) between our modules."""
    out = []
    for module, path in MODULES.items():
        for line, name in imports(module, path):
            while name not in MODULES and "." in name:   # `import a.b.c` where c is a name in a.b
                name = name.rpartition(".")[0]
            if name in MODULES and name != module and (module, line, name) not in out:
                out.append((module, line, name))
    return out


EDGES = edges()


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_import_goes_up_a_layer():
    up = [f"{where(a, line)}: {a} (layer {layer(a)}, {LAYERS[layer(a)][0]}) imports {b} (layer {layer(b)}, "
          f"{LAYERS[layer(b)][0]})" for a, line, b in EDGES if layer(b) > layer(a)]
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for a, _, b in EDGES:
        graph.setdefault(a, set()).add(b)
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    lines = []
    for cycle in cycles:
        members = set(cycle)
        lines.append(" <-> ".join(sorted(cycle)) + ":")
        lines += [f"  {where(a, line)}: {a} imports {b}" for a, line, b in EDGES if a in members and b in members]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(component)
    return out


def test_pipeline_has_no_loose_modules():
    loose = sorted(p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules directly in pipeline/ (give each a package): {loose}"


@pytest.mark.parametrize("package", ["warehouse", "models", "pipeline"])
def test_nothing_below_flows_imports_prefect_or_dask(package):
    found = []
    for module, path in MODULES.items():
        if module.split(".")[0] != package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{where(module, node.lineno)}: {n}" for n in names
                      if n.split(".")[0] in ("prefect", "prefect_dask", "dask", "distributed")]
    assert not found, "Prefect or Dask below flows/:\n" + "\n".join(found)


def test_the_checker_sees_lazy_imports_and_cycles():
    """The checker itself: an import inside a function counts, and a two-module loop is found."""
    tree = ast.parse("def f():\n    from pipeline.runs.record import writer\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))
    assert sorted(map(sorted, strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}))) == [["a", "b"], ["c"]]
