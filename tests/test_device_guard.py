"""A CPU-side guard against the slip that broke every compression method on CUDA: a tensor made
without saying where it lives. On a CPU-only machine such a tensor sits beside the pool and
nothing fails; on a GPU it meets the pool's tensors and torch raises (or, worse, copies to
the device behind our back every step).

Every tensor factory in the layers a decode step runs through (cache, methods, engine,
kernels) names its device: the pool's, or the host on purpose (nanokv/cache/pool.py: HOST,
where block tables and lengths live). `*_like` and `new_*` factories inherit their source's
device and need no name."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "nanokv"
GUARDED = ("cache", "methods", "engine", "kernels")
FACTORIES = {"tensor", "as_tensor", "full", "zeros", "ones", "empty", "arange", "range", "linspace", "logspace",
             "eye", "rand", "randn", "randint", "randperm", "empty_strided", "tril_indices", "triu_indices"}
# (file relative to nanokv/, factory): why it may leave the device unnamed. Keep it short.
ALLOWED: dict[tuple[str, str], str] = {}


def unplaced_factories(source: str, name: str = "<string>") -> list[str]:
    """`torch.<factory>(...)` calls in `source` with no device= keyword, as 'name:line: call'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
                and (name, node.func.attr) not in ALLOWED):
            found.append(f"{name}:{node.lineno}: {ast.unparse(node)[:90]}")
    return found


def guarded_files():
    return sorted(p for folder in GUARDED for p in (ROOT / folder).rglob("*.py"))


def test_every_tensor_factory_names_its_device():
    found = [hit for path in guarded_files()
             for hit in unplaced_factories(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, ("tensors made without device= (name the pool's device, or HOST for bookkeeping kept "
                       "on the host on purpose):\n" + "\n".join(found))


@pytest.mark.parametrize("planted", ["n = torch.arange(n)", "x = torch.zeros(3, dtype=torch.bool)",
                                     "t = torch.tensor([1, 2])", "r = torch.rand(2, 3, generator=g)"])
def test_the_guard_catches_a_planted_factory(planted):
    source = (ROOT / "cache" / "kv_cache.py").read_text() + "\n\ndef planted(n, g):\n    " + planted + "\n"
    assert unplaced_factories(source, "cache/kv_cache.py") == [
        f"cache/kv_cache.py:{len(source.splitlines())}: {planted.split(' = ')[1]}"]


@pytest.mark.parametrize("placed", ["torch.arange(n, device=HOST)", "torch.zeros_like(x)", "x.new_zeros(3)",
                                    "torch.full((2,), 1, device=q.device)"])
def test_the_guard_accepts_a_placed_factory(placed):
    assert unplaced_factories(f"y = {placed}\n") == []


def test_the_guard_covers_the_layers_a_step_runs_through():
    names = {str(p.relative_to(ROOT)) for p in guarded_files()}
    assert {"engine/attention.py", "cache/kv_cache.py", "methods/base.py", "engine/runner.py",
            "kernels/reference.py"} <= names
