"""Where a decode step's time goes for the block kinds beyond plain paged K/V: latent caches (lorc,
palu), MiniCache's merged pairs and ThinK's slim keys, beside `full` on the same prompts. Each
reads through its own entry of the kernel interface (kernels.latent_attention, paired_attention,
pruned_attention): a Triton decode kernel on CUDA (nanokv/kernels/latent_decode.py,
two_part_decode.py), the plain-torch twin on CPU, which gathers the blocks, rebuilds the K/V
(keys from latents and RoPE; merged slots restored) and attends densely. This measures, in one run
on the same device, the share of decode time spent in that entry, and in what follows it outside
the kernels (a latent cache's outputs through the value basis, `values_out`).

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

KINDS = {"full": "paged", "lorc": "latent", "minicache": "paired", "think": "slim keys"}


class Timer:
    """Seconds per phase (prefill: several queries per sequence; decode: one) in the timed calls."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = {(phase, part): 0.0 for phase in ("prefill", "decode") for part in ("attention", "after")}

    def timed(self, fn, part, queries_per_sequence):
        def wrapped(*args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            phase = "decode" if queries_per_sequence(args) == 1 else "prefill"
            self.seconds[phase, part] += time.perf_counter() - start
            return out
        return wrapped


def instrument(llm: LLM) -> Timer:
    cache = llm.cache
    timer = Timer(cache.pool.device)
    k = cache.kernels
    per_sequence = lambda args: args[0].shape[1]                                # q [B, T, Hq, D]
    cache.kernels = dataclasses.replace(
        k, decode=timer.timed(k.decode, "attention", lambda args: 1),           # q [B, Hq, D]: one query each
        **{name: timer.timed(getattr(k, name), "attention", per_sequence)
           for name in ("pruned_attention", "paired_attention", "latent_attention")})
    if hasattr(cache, "values_out"):                                            # out [B, T, Hq, r_v]
        cache.values_out = timer.timed(cache.values_out, "after", lambda args: args[1].shape[1])
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
    print(f"| method | block kind | decode tok/s | decode s | attention (share) | value basis (share) |")
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
        att, after = timer.seconds["decode", "attention"], timer.seconds["decode", "after"]
        print(f"| {method} | {KINDS.get(method, '?')} | {llm.stats['decode_tokens'] / decode_s:.1f} | {decode_s:.2f} "
              f"| {att:.2f} s ({att / decode_s:.0%}) | {after:.2f} s ({after / decode_s:.0%}) |", flush=True)
        llm_kernels = llm.cache.kernels.name
        del llm
    print(f"\n{args.prompts} prompts of {args.input} random tokens, {args.output} out, "
          f"{args.model} with random weights, device {args.device or 'default'}, kernels {llm_kernels}")


if __name__ == "__main__":
    main()
