"""What `pip install` gives a user: a wheel with one top-level package, nanokv (a top-level
`kernels` once shadowed Hugging Face's `kernels`, which transformers imports), every file of it
(the C++ sources too), and the two console scripts; and nanokv importable next to transformers
from any directory."""

import ast
import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import nanokv
from tiny_model import save_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


def source_files() -> list[str]:
    """The checkout's files as a clean clone would have them (tracked, or new and not ignored)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot tell its files from build leftovers")
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the checkout (a build in place would leave build/ behind,
    and an old build/ can slip removed files into the next wheel)."""
    files = source_files()
    copy, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in files:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((ROOT / name).read_bytes())
    pytest.importorskip("setuptools")  # torch depends on it; without build isolation pip needs no network
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(copy), "--no-deps", "--no-build-isolation",
                             "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [built] = out.glob("nanokv-*.whl")
    return built


def test_the_wheel_holds_nanokv_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"nanokv"}
    [top_level] = [name for name in names if name.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["nanokv"]


def test_the_wheel_holds_every_file_of_nanokv_the_cpp_sources_too(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {name for name in source_files() if name.startswith("nanokv/")}
    assert "nanokv/kernels/cpu_decode.cpp" in wanted
    # missing, e.g.: a data file setup.py's package_data does not name, a folder without __init__.py
    assert sorted(wanted - names) == []


def test_the_wheel_declares_the_console_scripts(wheel):
    [entry_points] = [name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    assert dict(parser["console_scripts"]) == {"nanokv-generate": "nanokv.cli.generate:main",
                                               "nanokv-bench": "nanokv.cli.bench:main",
                                               "nanokv-serve": "nanokv.serve.cli:main"}


def test_the_installed_wheel_runs_its_console_script_outside_the_checkout(wheel, tmp_path):
    """Installed on its own (dependencies from this environment), away from the checkout: the
    nanokv that answers is the wheel's."""
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                             str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    found = subprocess.run([sys.executable, "-c", "import nanokv; print(nanokv.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=120)
    assert Path(found.stdout.strip()).resolve() == (target / "nanokv" / "__init__.py").resolve(), found.stderr
    listed = subprocess.run([str(target / "bin" / "nanokv-generate"), "--list-methods"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "snapkv" in listed.stdout and "streaming_llm" in listed.stdout


@pytest.mark.parametrize("where", ["outside", "checkout"])
def test_nanokv_imports_beside_transformers_and_its_kernels(tmp_path, where):
    """From any directory, `kernels` is Hugging Face's package (transformers needs it), not ours."""
    code = ("import nanokv, nanokv.kernels, transformers, kernels; from transformers import LlamaConfig; "
            "assert hasattr(kernels, 'get_kernel'), kernels.__file__; print(nanokv.__file__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path if where == "outside" else ROOT)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == Path(nanokv.__file__).resolve()   # the nanokv under test


def test_a_script_outside_the_checkout_generates_with_llm(tmp_path):
    model = save_tiny_llama(tmp_path / "tiny")
    script = tmp_path / "use_nanokv.py"
    script.write_text(
        "import sys\n"
        "from nanokv import LLM, SamplingParams\n"
        "llm = LLM(sys.argv[1], dtype='float32', kv_cache_memory=16 << 20)\n"
        "[out] = llm.generate([[5, 9, 33]], SamplingParams(max_tokens=4, ignore_eos=True))\n"
        "print(out.token_ids)\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, str(script), str(model)], capture_output=True, text=True, timeout=300,
                            cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    tokens = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert len(tokens) == 4 and all(0 <= t < 256 for t in tokens)
