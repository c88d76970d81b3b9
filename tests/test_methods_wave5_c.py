"""Mustafar, MiniKV, LeanKV and BitDecoding (issue 28, wave 5 group c): codecs on the tiered cache.
Each codec on hand-built blocks whose stored fields and read-back values are worked out by hand,
its bytes as stored, and the engine's greedy tokens against a plain restatement of the method
(the cold tokens rewritten in plain torch, attended with the dense residual)."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from helpers import restated_greedy
from nanokv.kernels.reference import attention_by_position
from nanokv.methods import make_method

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama with heads of 64 and a byte tokenizer, for LLM(...)."""
    from tiny_model import save_tiny_llama

    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


class DenseCoded:
    """A plain statement of the tiered cache as the model's attention callable: per layer the cold
    K/V (rewritten by `coder` as the codec would store them) and the dense residual; each step
    attends over both, then every whole `residual` tokens of the residual go cold, oldest first.
    coder(k, v) gets k, v [R, H, D] and returns them as read back. `keep(layer, q, k)` (optional):
    at prefill, the [H, T] bool mask of the prompt tokens each head keeps (a restated eviction; all
    heads then hold the same count, or per head where `per_head`)."""

    def __init__(self, residual, coder):
        self.residual, self.coder, self.layers = residual, coder, {}

    def __call__(self, layer, q, k, v, sliding_window):
        kc, vc, kf, vf = self.layers.get(layer, (k[:0], v[:0], k[:0], v[:0]))
        kf, vf = torch.cat([kf, k]), torch.cat([vf, v])
        keys, values = torch.cat([kc, kf]), torch.cat([vc, vf])
        out = attention_by_position(q, keys, values, self.positions, torch.arange(len(keys)))
        cut = len(kf) // self.residual * self.residual
        for s in range(0, cut, self.residual):
            k_read, v_read = self.coder(kf[s:s + self.residual], vf[s:s + self.residual])
            kc, vc = torch.cat([kc, k_read]), torch.cat([vc, v_read])
        self.layers[layer] = (kc, vc, kf[cut:], vf[cut:])
        return out


def engine_tokens(path, method, prompt, steps, **options):
    from nanokv import LLM, SamplingParams

    llm = LLM(path, dtype="float32", method=method, **options)
    [out] = llm.generate([prompt], SamplingParams(max_tokens=steps, ignore_eos=True))
    return llm, out


PROMPT = [(j * 37 + 11) % 256 for j in range(40)]


# --- mustafar -------------------------------------------------------------------------------

def test_mustafar_keeps_each_tokens_largest_magnitudes_as_a_bitmap_and_float16_numbers():
    from nanokv.methods.mustafar import SparseCodec

    # D = 16, sparsity 0.5: each token keeps 16 - 8 = 8 entries. Token 0: x_c = (c + 1) * (-1)^c,
    # so the 8 largest magnitudes are channels 8..15: bitmap bytes 0b00000000, 0b11111111 (bit c of
    # byte c // 8, lowest first) and the numbers 9, -10, 11, ..., -16 in channel order. Token 1:
    # only channels 1, 3, 5, 7, 9, 11, 13, 15 are large (0.5 elsewhere): bitmap 0b10101010 twice.
    D = 16
    t0 = torch.tensor([(c + 1) * (-1.0) ** c for c in range(D)])
    t1 = torch.tensor([100.0 + c if c % 2 else 0.5 for c in range(D)])
    k = torch.stack([t0, t1])[None]  # [1 block, R = 2, D]
    codec = SparseCodec(0.5, 0.5, block_size=2)
    fields = codec.encode(k, k.clone(), 0, None)
    assert fields["k_bitmap"].tolist() == [[[0b00000000, 0b11111111], [0b10101010, 0b10101010]]]
    assert fields["k_values"][0, 0].tolist() == [9, -10, 11, -12, 13, -14, 15, -16]
    assert fields["k_values"][0, 1].tolist() == [101, 103, 105, 107, 109, 111, 113, 115]
    assert fields["k_values"].dtype == torch.float16
    k_read, v_read = codec.decode(fields, 0)
    expected = torch.stack([torch.where(torch.arange(D) >= 8, t0, 0.0), torch.where(torch.arange(D) % 2 == 1, t1, 0.0)])
    assert torch.equal(k_read[0], expected) and torch.equal(v_read[0], expected)
    # the pool's zero block (padded table entries) has no bit set: it reads back as zeros
    zero = {name: torch.zeros(1, *shape, dtype=dtype) for name, (dtype, shape) in codec.field_shapes(D).items()}
    assert torch.equal(codec.decode(zero, 0)[0], torch.zeros(1, 2, D))


def test_mustafar_keys_and_values_prune_to_their_own_sparsity():
    from nanokv.methods.mustafar import SparseCodec

    # D = 64: k_sparsity 0.7 keeps 64 - floor(44.8) = 20, v_sparsity 0.25 keeps 64 - 16 = 48
    codec = make_method("mustafar", k_sparsity=0.7, v_sparsity=0.25, residual_length=4).quantization
    assert isinstance(codec, SparseCodec)
    shapes = codec.field_shapes(64)
    assert shapes["k_values"] == (torch.float16, (4, 20)) and shapes["v_values"] == (torch.float16, (4, 48))
    x = torch.randn(3, 4, 64)
    k_read, v_read = codec.decode(codec.encode(x, x, 0, None), 0)
    assert (k_read != 0).sum(-1).eq(20).all() and (v_read != 0).sum(-1).eq(48).all()
    # what survives is the largest: the smallest kept magnitude >= the largest pruned one
    kept = k_read != 0
    assert (x.abs().masked_fill(~kept, math.inf).amin(-1) >= x.abs().masked_fill(kept, 0).amax(-1)).all()


def test_mustafar_bytes_per_token_as_stored():
    # defaults (sparsity 0.5, R = 128) at D = 64: per token K 64 / 8 bitmap bytes + 32 float16 = 72, V 72
    codec = make_method("mustafar").quantization
    assert codec.quantized_bytes(64) == 128 * (2 * (8 + 32 * 2))
    assert codec.quantized_bytes(64) / 128 < 2 * 64 * 2  # below K and V in float16 (256 bytes)


def test_mustafar_engine_matches_a_plain_restatement(tiny_llama):
    R, steps = 16, 30   # 40-token prompt: two blocks at prefill, more during decode

    def prune(x, sparsity=0.5):
        order = x.abs().argsort(dim=-1, descending=True)
        keep = x.shape[-1] - int(sparsity * x.shape[-1])
        mask = torch.zeros_like(x, dtype=torch.bool).scatter(-1, order[..., :keep], True)
        return torch.where(mask, x.half().float(), 0.0)

    llm, out = engine_tokens(tiny_llama, "mustafar", PROMPT, steps, residual_length=R)
    assert out.token_ids == restated_greedy(llm.model, DenseCoded(R, lambda k, v: (prune(k), prune(v))), PROMPT, steps)
    # the bytes: whole blocks at 144 bytes per token per (layer, head), the residual dense
    held = len(PROMPT) + steps - 1
    assert out.metrics["kv_cache_bytes_theory"] == 2 * 1 * (held // R * R * 144 + held % R * (2 * 64 * 4 + 4))
    _, full = engine_tokens(tiny_llama, "full", PROMPT, steps)
    assert out.metrics["kv_cache_bytes"] < full.metrics["kv_cache_bytes"]


def test_snapkv_then_mustafar_holds_snapkvs_tokens_in_fewer_bytes(tiny_llama):
    _, alone = engine_tokens(tiny_llama, "snapkv", PROMPT, 8, compression=0.5, window_size=4)
    _, both = engine_tokens(tiny_llama, "snapkv+mustafar", PROMPT, 8, compression=0.5, window_size=4,
                            residual_length=16)
    assert both.metrics["kv_cache_tokens"] == alone.metrics["kv_cache_tokens"]
    assert both.metrics["kv_cache_bytes_theory"] < alone.metrics["kv_cache_bytes_theory"]


@pytest.mark.parametrize("option,value,valid", [("k_sparsity", 1.0, "[0, 1)"), ("v_sparsity", -0.1, "[0, 1)"),
                                                ("residual_length", 0, "positive")])
def test_mustafar_bad_options_name_the_value_and_the_range(option, value, valid):
    with pytest.raises(ValueError, match=rf"{option}={value}.*{re.escape(valid)}"):
        make_method("mustafar", **{option: value})
