"""The command line: python -m nanokv.calibrate METHOD --model NAME (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanokv.calibrate import FORMAT, PROFILES, artifact_path, model_key, write_artifact
from nanokv.calibrate.dense import calibration_texts
from nanokv.calibrate.duoattention import Q_LEN, duoattention_scores
from nanokv.calibrate.eckvh import activation_bases
from nanokv.calibrate.headkv import headkv_scores, needle_probe, reason_probe, retrieval_head_scores
from nanokv.calibrate.kvsharer import kvsharer_pairs
from nanokv.calibrate.kvtuner import kvtuner_errors
from nanokv.calibrate.wkvquant import QUERIES, wkvquant_parameters
from nanokv.calibrate.lowrank import default_group, fisher_information, weight_bases, whitened_bases
from nanokv.calibrate.razorattention import REPEATS, razor_scores, repeated_random_tokens

# methods whose calibration runs a probe made of words (needles, repeated ordinary tokens): they need
# the model's tokenizer, so not --load-format dummy
PROBES = ("headkv", "headkv_r2", "retrieval_head", "razorattention")

# --samples, --length by default: kvpress's on-the-fly scoring reads 50 samples; KVSharer's
# official script 30 of 64 tokens; Palu's 256 of 2048 (whitening) and 2048 of 1024 (Fisher) scaled
# down for a CPU; LoRC reads no text; retrieval_head as headkv (the official probe runs 3 needles x
# 20 lengths up to 50K x 10 depths); razorattention's random sequences are nanokv's choice
DEFAULTS = {"duoattention": {"samples": 50, "length": 1024}, "headkv": {"samples": 50, "length": 1024},
            "headkv_r2": {"samples": 50, "length": 1024},
            "kvsharer": {"samples": 30, "length": 64}, "palu": {"samples": 32, "length": 1024},
            "lorc": {"samples": 0, "length": 0},
            "retrieval_head": {"samples": 50, "length": 1024}, "razorattention": {"samples": 8, "length": 1024},
            "eckvh": {"samples": 32, "length": 1024},  # eckvh: as palu's (the paper's calibration set unread)
            "kvtuner": {"samples": 8, "length": 1024}, "wkvquant": {"samples": 4, "length": 512},
            # KVQuant's official 16 samples of 2,048 tokens, SKVQ's 256 of 4,096, scaled down for a CPU
            "kvquant": {"samples": 16, "length": 1024}, "skvq": {"samples": 16, "length": 1024},
            # Loki's official PCA reads WikiText-2, Double Sparsity's 256 Pile samples in blocks of 512
            "loki": {"samples": 8, "length": 1024}, "double_sparsity": {"samples": 8, "length": 1024},
            # squeezed_attention: the official calibrates on each fixed context itself; these texts stand
            # for the contexts to come (nanokv's choice)
            "squeezed_attention": {"samples": 16, "length": 1024},
            # minference: the paper's search reads one sample
            "minference": {"samples": 1, "length": 1024}}


def calibrate(method: str, model: str, samples: int | None = None, length: int | None = None, seed: int = 0,
              out: str | Path | None = None, dtype: str = "float32", device: str | None = None,
              quiet: bool = False, share_layers: int | None = None, threshold: float = 0.5,
              group: int | None = None, clusters: float | None = None, window: int | None = None,
              load_format: str = "auto") -> Path:
    """Make and write the artifact of `method` for `model` -> its path. kvsharer: at most
    `share_layers` (default: half the layers) pairs, each kept above `threshold`. lorc, palu: bases
    per `group` consecutive kv-heads (lorc: all of a layer's; palu, eckvh: 4, or the largest divisor of
    the kv-heads below 4). squeezed_attention: `clusters` centroids per clustered key and the newest
    `window` tokens of each text as the sample queries (default: the method's, 0.05 and 100).
    load_format "dummy": the random weights `--load-format dummy` runs (loading.load_dummy, on this
    device) read random token ids, for a profile of the right shape that times a method on a machine
    without weights; it says nothing of a real model, so it is written only where `out` says."""
    import torch
    from tqdm import tqdm

    from nanokv.config import ModelConfig
    from nanokv.hardware import resolve_device, resolve_dtype
    from nanokv.hub import config_file, resolve_model
    from nanokv.loading import LOAD_FORMATS, load_dummy, load_model, read_config
    from nanokv.tokenizer import Tokenizer

    if method not in DEFAULTS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(DEFAULTS)}")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; valid: {', '.join(LOAD_FORMATS)}")
    dummy = load_format == "dummy"
    if dummy and method in PROBES:
        raise ValueError(f"{method} calibrates with a probe of words (needles, repeated tokens) that random weights "
                         f"without a tokenizer cannot run; --load-format dummy serves: "
                         f"{', '.join(m for m in DEFAULTS if m not in PROBES)}")
    if dummy and out is None:
        raise ValueError("--load-format dummy needs --out: a profile of random weights must not stand in the cache "
                         f"for {model}'s real one")
    samples = DEFAULTS[method]["samples"] if samples is None else samples
    length = DEFAULTS[method]["length"] if length is None else length
    if method == "lorc":  # from the weights alone
        samples = length = 0
    elif not isinstance(samples, int) or samples <= 0:
        raise ValueError(f"--samples must be a positive integer, got {samples!r}")
    device = str(resolve_device(device))
    torch_dtype = resolve_dtype(dtype, device)
    dtype = str(torch_dtype).removeprefix("torch.")  # the artifact records what ran, not "auto"
    source = None if dummy else resolve_model(model)
    shape = ModelConfig.from_json_file(config_file(model)) if dummy else read_config(source.kind, source.path)
    limit = shape.max_position_embeddings
    if method != "lorc" and (not isinstance(length, int) or not 32 <= length < limit):
        raise ValueError(f"--length must be in [32, {limit}) for {model} (its context is {limit}), got {length!r}")
    if not dummy:
        make_tokenizer = Tokenizer.from_gguf if source.kind == "gguf" else Tokenizer.from_dir
        tokenizer = make_tokenizer(source.path)

    def texts() -> list[list[int]]:
        if dummy:  # no tokenizer, and random weights read nothing in prose anyway
            gen = torch.Generator().manual_seed(seed)
            return [torch.randint(0, shape.vocab_size, (length,), generator=gen).tolist() for _ in range(samples)]
        return calibration_texts(tokenizer, samples, length, seed)

    settings = {"samples": samples, "length": length, "seed": seed, "dtype": dtype}
    if method == "squeezed_attention":
        from nanokv.methods.squeezed_attention import SqueezedAttention

        defaults = SqueezedAttention.options
        clusters = defaults["clusters"][1] if clusters is None else clusters
        window = defaults["window"][1] if window is None else window
        if not (isinstance(clusters, (int, float)) and 0 < clusters <= 1):
            raise ValueError(f"--clusters must be in (0, 1] (centroids per clustered key), got {clusters!r}")
        if not (isinstance(window, int) and 1 <= window < length):
            raise ValueError(f"--window must be in [1, {length}) (below --length {length}), got {window!r}")
        inputs = texts()
        settings.update(clusters=float(clusters), window=window,
                        text="prose haystack (nanokv/haystack.py), length tokens each",
                        score="per layer and kv-head, k-means of all but the last window keys (directions); the "
                              "centroid estimate S of each cluster, mean over the kv-head's query heads and the last "
                              "window queries, handed to its keys; the quantiles 0, 0.01, .., 1 over all keys (and "
                              "per layer)")
    elif method == "minference":
        from nanokv.methods.minference import MInference, PATTERNS

        inputs = texts()
        settings.update(budget=length // 4, tile_size=MInference.options["tile_size"][1],
                        last_q=MInference.options["last_q"][1], patterns=list(PATTERNS),
                        text="prose haystack (nanokv/haystack.py), length tokens each",
                        score="per layer and query head, each pattern's attention recall (the dense softmax mass "
                              "inside its tiles, mean over the later half of the queries) at budget keys per row; "
                              "the best pattern (nanokv/calibrate/minference.py)")
    elif method in ("kvquant", "skvq"):
        inputs = texts()
        settings.update(text="prose haystack (nanokv/haystack.py), length tokens each",
                        fit="per layer, k-means codebooks (2 and 4 bits) of the pre-RoPE keys and the values, "
                            "normalized per block as the codec does (nanokv/calibrate/kvquant.py)" if method == "kvquant"
                            else "per layer and kv-head, channels clustered by their min/max; per layer, clip "
                                 "ratios of least error (nanokv/calibrate/skvq.py)")
    elif method in ("loki", "double_sparsity"):
        inputs = texts()
        settings.update(text="prose haystack (nanokv/haystack.py), length tokens each",
                        fit="per layer and kv-head, principal directions of the post-RoPE keys (eigenvectors of "
                            "their covariance) and their variances (nanokv/calibrate/loki.py)" if method == "loki"
                            else "per layer and head, each channel's mean |q k| (post-RoPE), |q| and |k| (pre-RoPE) "
                                 "(nanokv/calibrate/double_sparsity.py)")
    elif method in ("lorc", "palu", "eckvh"):
        inputs = texts() if samples else []
        settings.update(text="prose haystack (nanokv/haystack.py), length tokens each" if samples else "none",
                        bases="SVD of each group's W_k, W_v rows" if method == "lorc" else
                              "right singular vectors of each group's stacked pre-RoPE keys and values (from their "
                              "Gram matrices)" if method == "eckvh" else
                              "eigenvectors of the pre-RoPE keys' and the values' second moments (the whitened "
                              "SVD's left singular vectors); Fisher: RMS over samples of the LM loss gradient")
    elif method == "duoattention":
        inputs = texts()
        settings.update(q_len=Q_LEN, text="prose haystack (nanokv/haystack.py), length tokens each",
                        score="kvpress duo_attention_on_the_fly: area under the cumulative attention of the "
                              "mean pre-RoPE query over the mean key at positions 0..q_len-1")
    elif method == "kvsharer":
        inputs = texts()
        settings.update(threshold=threshold, text="prose haystack (nanokv/haystack.py), length tokens each",
                        score="pairs most dissimilar first (mean KV distance), kept while the final hidden "
                              "states' cosine similarity to the unshared model's stays above threshold")
    elif method == "retrieval_head":
        inputs = [needle_probe(tokenizer, length, seed, i, span="value") for i in range(samples)]
        settings.update(probe="teacher-forced needle copy: value kinds number/word/uuid and depths 0..1 in turn, "
                              "prose haystack, the value's tokens fed as the reply",
                        score="per query head, copies (argmax on the value's span, on the token predicted) / the "
                              "value's length (Retrieval Head), mean over samples; a kv-head's max over its query heads")
    elif method == "razorattention":
        vocab = min(tokenizer.backend.get_vocab_size(), read_config(source.kind, source.path).vocab_size)
        inputs = [repeated_random_tokens(tokenizer, vocab, length, seed, i) for i in range(samples)]
        settings.update(probe=f"random ordinary token ids, distinct within a segment, repeated {REPEATS} times",
                        score="per query head, mean attention of the queries in copies 2.. on the previous "
                              "occurrence of their token (echo) and on the token after it (induction), mean over "
                              "samples; a kv-head's max over its query heads")
    elif method == "kvtuner":
        inputs = texts()
        settings.update(text="prose haystack (nanokv/haystack.py), length tokens each",
                        score="per layer and (K bits, V bits) pair, the relative error of the layer's attention output "
                              "with its keys and values alone quantized by KIVI (group 32, blocks of 32 tokens)")
    elif method == "wkvquant":
        inputs = texts()
        settings.update(text="prose haystack (nanokv/haystack.py), length tokens each",
                        score=f"per layer, K and V apart: channel centre and radius over all tokens and kv-heads; "
                              f"per bit width, alpha then the clip ratio on a grid, by the squared error of the "
                              f"attention output of the last {QUERIES} queries of each sample")
    elif method == "headkv":
        inputs = [needle_probe(tokenizer, length, seed, i) for i in range(samples)]
        settings.update(probe="teacher-forced needle copy: value kinds number/word/uuid and depths 0..1 in turn, "
                              "prose haystack, answer tokens fed as the reply",
                        score="share of answer tokens whose predicting query's argmax attention lands in the needle "
                              "on the same token (Retrieval Head), mean over query heads and samples")
    else:
        inputs = [reason_probe(tokenizer, length, seed, i) for i in range(samples)]
        settings.update(probe="teacher-forced retrieval-reasoning: two people's favorite things and ages, the older's "
                              "or younger's in turn, depths 0..1, prose haystack, the answer sentence fed as the reply",
                        score="per answer token, the attention of the predicting query's top-k slots (k = answer "
                              "length) inside the answer sentence / k, summed (HeadKV-R2); mean over query heads and "
                              "samples, no success filter")
    if dummy:
        net, config = load_dummy(model, torch_dtype, device, pack=False)
        settings.update(weights="random (--load-format dummy, loading.load_dummy seed 0): for timing only",
                        text="random token ids")
    else:
        net, config = load_model(source.kind, source.path, torch_dtype, device, pack=False)  # weights read as such
    artifact = {"format": FORMAT, "method": method, "model": model_key(model), "num_layers": config.num_layers,
                "num_kv_heads": config.num_kv_heads}
    if method == "squeezed_attention":
        from nanokv.calibrate.squeezed_attention import squeezed_thresholds

        bar = tqdm(total=samples, desc="calibrating squeezed_attention", unit="sample", file=sys.stderr, disable=quiet)
        thresholds, layer_thresholds = squeezed_thresholds(net, config, inputs, clusters, window, lambda: bar.update(1))
        bar.close()
        artifact.update(thresholds=thresholds, layer_thresholds=layer_thresholds, settings=settings)
    elif method == "minference":
        from nanokv.calibrate.minference import minference_patterns

        bar = tqdm(total=samples, desc="calibrating minference", unit="sample", file=sys.stderr, disable=quiet)
        patterns, recalls = minference_patterns(net, config, inputs, settings["budget"], settings["tile_size"],
                                                settings["last_q"], lambda: bar.update(1))
        bar.close()
        artifact.update(patterns=patterns, recalls=recalls, settings=settings)
    elif method in ("kvquant", "skvq"):
        bar = tqdm(total=samples, desc=f"calibrating {method}", unit="sample", file=sys.stderr, disable=quiet)
        if method == "kvquant":
            from nanokv.calibrate.kvquant import kvquant_codebooks
            tensors = kvquant_codebooks(net, config, inputs, seed=seed, progress=lambda: bar.update(1))
        else:
            from nanokv.calibrate.skvq import skvq_calibration
            tensors = skvq_calibration(net, config, inputs, seed=seed, progress=lambda: bar.update(1))
        bar.close()
        artifact.update(head_dim=config.head_dim, settings=settings, tensors=tensors)
    elif method in ("loki", "double_sparsity"):
        bar = tqdm(total=samples, desc=f"calibrating {method}", unit="sample", file=sys.stderr, disable=quiet)
        if method == "loki":
            from nanokv.calibrate.loki import loki_bases
            tensors = loki_bases(net, config, inputs, progress=lambda: bar.update(1))
        else:
            from nanokv.calibrate.double_sparsity import channel_magnitudes
            tensors = channel_magnitudes(net, config, inputs, progress=lambda: bar.update(1))
        bar.close()
        artifact.update(head_dim=config.head_dim, settings=settings, tensors=tensors)
    elif method in ("lorc", "palu", "eckvh"):
        heads = config.num_kv_heads
        group = (heads if method == "lorc" else default_group(heads)) if group is None else group
        if not isinstance(group, int) or group <= 0 or heads % group:
            raise ValueError(f"--group must divide the model's {heads} kv-heads, got {group!r}")
        if method == "lorc":
            tensors = weight_bases(net, config, group)
        elif method == "eckvh":
            bar = tqdm(total=samples, desc="calibrating eckvh", unit="sample", file=sys.stderr, disable=quiet)
            tensors = activation_bases(net, config, inputs, group, lambda: bar.update(1))
            bar.close()
        else:
            bar = tqdm(total=2 * samples, desc="calibrating palu", unit="pass", file=sys.stderr, disable=quiet)
            tensors = {**whitened_bases(net, config, inputs, group, lambda: bar.update(1)),
                       **fisher_information(net, config, inputs, lambda: bar.update(1))}
            bar.close()
        artifact.update(group=group, head_dim=config.head_dim, settings={**settings, "group": group},
                        tensors=tensors)
    elif method == "kvsharer":
        share_layers = config.num_layers // 2 if share_layers is None else share_layers
        if not isinstance(share_layers, int) or not 1 <= share_layers < config.num_layers:
            raise ValueError(f"--share-layers must be in [1, {config.num_layers}), got {share_layers!r}")
        bar = tqdm(desc="calibrating kvsharer", unit="try", file=sys.stderr, disable=quiet)
        pairs, similarities = kvsharer_pairs(net, config, inputs, share_layers, threshold, lambda: bar.update(1))
        bar.close()
        artifact.update(pairs=pairs, similarities=similarities, settings={**settings, "share_layers": share_layers})
    elif method == "kvtuner":
        from nanokv.methods.kvtuner import PAIRS

        bar = tqdm(total=samples, desc="calibrating kvtuner", unit="sample", file=sys.stderr, disable=quiet)
        errors = kvtuner_errors(net, config, inputs, progress=lambda: bar.update(1))
        bar.close()
        artifact.update(pairs=[list(p) for p in PAIRS], layer_errors=[[float(e) for e in row] for row in errors.tolist()],
                        settings=settings)
    elif method == "wkvquant":
        bar = tqdm(total=samples, desc="calibrating wkvquant", unit="sample", file=sys.stderr, disable=quiet)
        artifact.update(head_dim=config.head_dim, **wkvquant_parameters(net, config, inputs, lambda: bar.update(1)),
                        settings=settings)
        bar.close()
    else:
        bar = tqdm(total=samples, desc=f"calibrating {method}", unit="sample", file=sys.stderr, disable=quiet)
        if method == "duoattention":
            scores = duoattention_scores(net, config, inputs, progress=lambda: bar.update(1))
        elif method == "retrieval_head":
            scores = retrieval_head_scores(net, config, inputs, progress=lambda: bar.update(1))
        elif method == "razorattention":  # head_scores: induction (the checked field); echo beside it
            echo, scores = razor_scores(net, config, inputs, progress=lambda: bar.update(1))
            artifact["echo_scores"] = [[float(s) for s in row] for row in echo.tolist()]
        else:  # headkv, headkv_r2: the artifact says which profile it holds
            scores = headkv_scores(net, config, inputs, PROFILES[method], progress=lambda: bar.update(1))
            artifact["profile"] = PROFILES[method]
        bar.close()
        artifact.update(head_scores=[[float(s) for s in row] for row in scores.tolist()], settings=settings)
    path = Path(out).expanduser() if out is not None else artifact_path(method, model)
    write_artifact(path, artifact)
    return path


def parse_args(argv=None):
    from nanokv.loading import LOAD_FORMATS

    p = argparse.ArgumentParser(prog="python -m nanokv.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("method", metavar="METHOD", help=f"one of: {', '.join(DEFAULTS)}")
    p.add_argument("--model", default=None,
                   help="short name, local path or Hugging Face repo id (default: smollm2-135m)")
    p.add_argument("--samples", type=int, default=None,
                   help="calibration samples (default: 50; kvsharer 30, palu and eckvh 32, kvquant, skvq and "
                        "squeezed_attention 16, razorattention, kvtuner, loki and double_sparsity 8, wkvquant 4, "
                        "minference 1; "
                        "lorc reads none)")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: 1024; kvsharer 64, wkvquant 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="float32 (default: the statistics are sums over many tokens), auto, bfloat16 or float16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--share-layers", type=int, default=None,
                   help="kvsharer: most layers that may share (default: half of them)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="kvsharer: least cosine similarity of the final hidden states (default: 0.5)")
    p.add_argument("--group", type=int, default=None,
                   help="lorc, palu, eckvh: consecutive kv-heads that share one latent (default: lorc all of a "
                        "layer's, palu and eckvh 4 or the largest divisor of the kv-heads below it)")
    p.add_argument("--clusters", type=float, default=None,
                   help="squeezed_attention: centroids per clustered key (default: 0.05)")
    p.add_argument("--window", type=int, default=None,
                   help="squeezed_attention: each text's newest tokens, left unclustered, as the sample queries "
                        "(default: 100)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the artifact (default: the nanokv cache, where LLM looks)")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="auto: the model's weights; dummy: the random weights bench.py --load-format dummy runs, "
                        "over random token ids (a profile to time a method with, not to use; needs --out)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from nanokv.hub import DEFAULT_MODEL

    args = parse_args(argv)
    model = args.model or DEFAULT_MODEL
    try:
        path = calibrate(args.method, model, args.samples, args.length, args.seed, args.out, args.dtype, args.device,
                         share_layers=args.share_layers, threshold=args.threshold, group=args.group,
                         clusters=args.clusters, window=args.window, load_format=args.load_format)
    except ValueError as e:  # ModelNotFoundError and ModelLoadError are ValueErrors with one-line messages
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
