"""The layers, read from the source: every import in nanokv/, at module level and inside
functions alike (a lazy import still ties the two modules together; it only hides the tie
until the call), must point down the layers and close no loop.

Layers, lowest first: kernels and models, cache, methods, engine, then the tools (calibrate,
eval, cli, serve, and the kernel benchmark, which lives with the kernels it times but builds a real
quantized pool from cache/ for them). Top-level modules (hub.py, loading.py, ...) sit where their
imports put them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "nanokv"

def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
KERNEL_BENCH = "nanokv.kernels.bench"


def package(module: str) -> str:
    """nanokv.<first part>: a subpackage, or a top-level module as a package of its own."""
    return ".".join(module.split(".")[:2])


def imports(module: str):
    """(line, target module, imported name) for every nanokv import in `module`."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nanokv":
                    # `import a.b.c` runs a.b.c; keep the longest prefix that is one of ours
                    parts = alias.name.split(".")
                    target = next(".".join(parts[:n]) for n in range(len(parts), 0, -1)
                                  if ".".join(parts[:n]) in MODULES)
                    yield node.lineno, target, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "nanokv":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield node.lineno, sub if sub in MODULES else source, alias.name


GRAPH = {m: [(line, t, name) for line, t, name in imports(m) if t in MODULES] for m in MODULES}


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def offenders(modules, forbidden) -> list[str]:
    return [f"{where(m, line)} imports {name} ({t})"
            for m in modules for line, t, name in GRAPH[m]
            if any(t == f or t.startswith(f + ".") for f in forbidden)]


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_imports_in_functions_and_relative_ones():
    assert GRAPH and all(t in MODULES for edges in GRAPH.values() for _, t, _ in edges)
    targets = {t for edges in GRAPH.values() for _, t, _ in edges}
    assert "nanokv.engine.llm" in targets and "nanokv.hardware" in targets


def test_no_import_cycles():
    edges = {m: {t for _, t, _ in GRAPH[m]} for m in MODULES}
    cycles = [c for c in strongly_connected(edges) if len(c) > 1 or c[0] in edges[c[0]]]
    report = []
    for cycle in cycles:
        report.append(" <-> ".join(cycle))
        report += [f"    {where(m, line)} imports {name} ({t})"
                   for m in cycle for line, t, name in GRAPH[m] if t in cycle]
    assert not cycles, "import cycles:\n" + "\n".join(report)


def test_cache_imports_no_method_or_engine():
    cache = [m for m in MODULES if package(m) == "nanokv.cache"]
    bad = offenders(cache, ["nanokv.methods", "nanokv.engine"])
    assert not bad, "nanokv.cache reaches up a layer:\n" + "\n".join(bad)


def test_models_and_kernels_import_no_cache_method_or_engine():
    low = [m for m in MODULES if package(m) in ("nanokv.models", "nanokv.kernels") and m != KERNEL_BENCH]
    bad = offenders(low, ["nanokv.cache", "nanokv.methods", "nanokv.engine"])
    bad += offenders([KERNEL_BENCH], ["nanokv.methods", "nanokv.engine"])  # it times kernels, not the engine
    assert not bad, "nanokv.models / nanokv.kernels reach up a layer:\n" + "\n".join(bad)


def test_no_private_name_from_another_package():
    bad = [f"{where(m, line)} imports {name} ({t})"
           for m in MODULES for line, t, name in GRAPH[m]
           if name.split(".")[-1].startswith("_") and not name.split(".")[-1].startswith("__")
           and package(t) != package(m)]
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


def test_the_library_imports_no_tool():
    """calibrate/, eval/, cli/, serve/ and the kernel benchmark run the library; nothing else imports them (LLM loads a
    calibration artifact through nanokv/artifacts.py, not through the command that writes it)."""
    tools = ("nanokv.calibrate", "nanokv.eval", "nanokv.cli", "nanokv.serve", KERNEL_BENCH)
    library = [m for m in MODULES if package(m) not in tools and m != KERNEL_BENCH]
    bad = offenders(library, list(tools))
    assert not bad, "the library reaches up into a tool:\n" + "\n".join(bad)


def test_the_scripts_import_what_exists():
    """scripts/ and the root scripts run outside the suite (the kvpress parity needs a venv of its
    own): every name they import from nanokv, at any depth, must still be there."""
    import importlib

    root = Path(__file__).resolve().parent.parent
    missing = []
    for path in sorted([*root.glob("scripts/*.py"), *root.glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nanokv":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "nanokv" and importlib.util.find_spec(a.name) is None:
                        missing.append(f"{path.name}: {a.name}")
    assert missing == []
