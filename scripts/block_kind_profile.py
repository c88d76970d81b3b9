"""Where a decode step's time goes for the block kinds no Triton kernel reads yet: latent caches
(lorc, palu), MiniCache's merged pairs and ThinK's slim keys read through plain-torch twins
(kernels.attend, kernels.pruned_attention) on every device. This measures, in one run on the same
device, the share of decode time spent in those twins' attention and in rebuilding the K/V they
attend over (latent: keys from latents, outputs through the value basis; paired: the merged
layer's slots restored), beside `full`'s paged decode kernel on the same prompts.

A Triton kernel for the attention alone can save at most its share; the rebuild is dense torch
(einsum, RoPE, gathers) that a kernel would have to fuse to save more.

    python scripts/block_kind_profile.py                          # SmolLM2 shape, CPU or GPU
    python scripts/block_kind_profile.py --model llama3.2-1b --prompts 16 --input 3500

Timed calls synchronize the GPU around themselves, so decode is a little slower than in bench.py.
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from nanokv import LLM, SamplingParams
from nanokv.artifacts import FORMAT, model_key, write_artifact
from nanokv.calibrate.lowrank import weight_bases
from nanokv.loading import load_dummy

KINDS = {"full": "paged (the Triton/C++ decode)", "lorc": "latent", "minicache": "paired", "think": "slim keys"}


class Timer:
    """Seconds per phase (prefill: several queries per sequence; decode: one) in the timed calls.
    A rebuild is charged to the phase of the attention call that follows it."""

    def __init__(self, device: torch.device):
        self.device, self.pending = device, 0.0
        self.seconds = {(phase, part): 0.0 for phase in ("prefill", "decode") for part in ("attention", "rebuild")}

    def _timed(self, fn, *args, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out, time.perf_counter() - start

    def rebuild(self, fn):
        def wrapped(*args, **kwargs):
            out, seconds = self._timed(fn, *args, **kwargs)
            self.pending += seconds
            return out
        return wrapped

    def attention(self, fn, queries_per_sequence):
        def wrapped(*args, **kwargs):
            out, seconds = self._timed(fn, *args, **kwargs)
            phase = "decode" if queries_per_sequence(args[0]) == 1 else "prefill"
            self.seconds[phase, "attention"] += seconds
            self.seconds[phase, "rebuild"] += self.pending
            self.pending = 0.0
            return out
        return wrapped


def instrument(llm: LLM) -> Timer:
    cache = llm.cache
    timer = Timer(cache.pool.device)
    k = cache.kernels
    cache.kernels = dataclasses.replace(
        k, decode=timer.attention(k.decode, lambda q: 1),                  # q [B, Hq, D]: one query each
        attend=timer.attention(k.attend, lambda q: q.shape[1]),            # q [B, T, Hq, D]
        pruned_attention=timer.attention(k.pruned_attention, lambda q: q.shape[1]))
    for name in ("read", "values_out", "read_second"):  # latent: read, values_out; paired: read_second
        if hasattr(cache, name) and (name != "read" or hasattr(cache, "values_out")):
            setattr(cache, name, timer.rebuild(getattr(cache, name)))
    return timer


def lorc_artifact(model: str, path: str) -> str:
    """A lorc profile from the random weights themselves (`python -m nanokv.calibrate lorc` makes
    one from real weights), all of a layer's kv-heads in one group -> its path."""
    net, config = load_dummy(model, torch.float32, pack=False)  # the SVD reads plain float32 weights
    heads = config.num_kv_heads
    write_artifact(Path(path), {"format": FORMAT, "method": "lorc", "model": model_key(model),
                                "num_layers": config.num_layers, "num_kv_heads": heads, "group": heads,
                                "head_dim": config.head_dim, "settings": {"weights": "dummy"},
                                "tensors": weight_bases(net, config, heads)})
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--input", type=int, default=1000, help="prompt tokens")
    ap.add_argument("--output", type=int, default=32, help="tokens out per prompt")
    ap.add_argument("--methods", default=",".join(KINDS))
    args = ap.parse_args()

    generator = torch.Generator().manual_seed(0)
    print(f"| method | block kind | decode tok/s | decode s | attention (share) | rebuild (share) |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        options = {} if method == "full" else {"compression": 0.5}
        if method == "lorc":
            options["calibration_file"] = lorc_artifact(args.model, f"{tempfile.mkdtemp()}/lorc.safetensors")
        llm = LLM(args.model, device=args.device, method=method, load_format="dummy", **options)
        vocab = llm.config.vocab_size
        prompts = [torch.randint(0, vocab, (args.input,), generator=generator).tolist() for _ in range(args.prompts)]
        params = SamplingParams(max_tokens=args.output, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True), chat=False, use_tqdm=False)  # warm-up
        timer = instrument(llm)
        llm.generate(prompts, params, chat=False, use_tqdm=False)
        decode_s = llm.stats["decode_s"]
        att, rebuild = timer.seconds["decode", "attention"], timer.seconds["decode", "rebuild"]
        print(f"| {method} | {KINDS.get(method, '?')} | {llm.stats['decode_tokens'] / decode_s:.1f} | {decode_s:.2f} "
              f"| {att:.2f} s ({att / decode_s:.0%}) | {rebuild:.2f} s ({rebuild / decode_s:.0%}) |", flush=True)
        del llm
    print(f"\n{args.prompts} prompts of {args.input} random tokens, {args.output} out, "
          f"{args.model} with random weights, device {args.device or 'default'}")


if __name__ == "__main__":
    main()
