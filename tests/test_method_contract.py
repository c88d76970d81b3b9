"""The contract between the engine and a method is what nanokv/methods/base.py declares: every
hook or attribute the engine reads of a method is declared on `Method` or one of its roles, and
the cache reads none
(it is storage; the engine hands it data)."""

import ast
from pathlib import Path

from nanokv.methods.base import DecodeEvictor, Merger, Method, PageReader, PrefillSelector, SparsePrefill

PACKAGE = Path(__file__).resolve().parent.parent / "nanokv"
METHOD_NAMES = {"method", "selector", "evictor", "pair_merger"}  # what the engine calls a method object
ROLES = (Method, PrefillSelector, DecodeEvictor, Merger, PageReader, SparsePrefill)


def method_reads(path: Path) -> set[tuple[str, int]]:
    """(attribute, line) for every `method.x`, `self.method.x`, `self.selector.x` in a file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
        if name in METHOD_NAMES:
            found.add((node.attr, node.lineno))
    return found


def test_base_declares_every_hook_the_engine_reads():
    files = sorted((PACKAGE / "engine").glob("*.py"))
    reads = {(f.name, attr, line) for f in files for attr, line in method_reads(f)}
    assert len({attr for _, attr, _ in reads}) > 30  # the walk sees the engine's calls
    undeclared = sorted((f, attr, line) for f, attr, line in reads if not any(hasattr(r, attr) for r in ROLES))
    assert not undeclared, f"read by the engine but not declared in methods/base.py: {undeclared}"


def test_the_cache_reads_nothing_of_a_method():
    reads = {(f.name, attr, line) for f in sorted((PACKAGE / "cache").glob("*.py")) for attr, line in method_reads(f)}
    assert not reads, f"the cache calls method hooks: {sorted(reads)}"
