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
        keys, values = torch.cat([kc, kf, k]), torch.cat([vc, vf, v])
        out = attention_by_position(q, keys, values, self.positions, torch.arange(len(keys)))
        self.store(layer, k, v)
        return out

    def store(self, layer, k, v):
        """k, v [T, H, D] join the residual; every whole `residual` of it goes cold."""
        kc, vc, kf, vf = self.layers.get(layer, (k[:0], v[:0], k[:0], v[:0]))
        kf, vf = torch.cat([kf, k]), torch.cat([vf, v])
        cut = len(kf) // self.residual * self.residual
        for s in range(0, cut, self.residual):
            k_read, v_read = self.coder(kf[s:s + self.residual], vf[s:s + self.residual])
            kc, vc = torch.cat([kc, k_read]), torch.cat([vc, v_read])
        self.layers[layer] = (kc, vc, kf[cut:], vf[cut:])


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


# --- minikv -----------------------------------------------------------------------------------

def test_minikv_layer_budgets_fall_with_depth_as_the_official_pyramid():
    # n = 100, compression 0.5: B = 50, recent 25, average heavy 25. Over 4 layers the heavy share
    # runs from 2 - 1/7 = 13/7 down to 1/7 in steps of (12/7) / 3 = 4/7: 13/7, 9/7, 5/7, 1/7 of 25
    # -> floor 46.43, 32.14, 17.86, 3.57 = 46, 32, 17, 3 heavy, + 25 recent each.
    minikv = make_method("minikv", compression=0.5)
    assert [minikv.layer_budget(100, layer, 4) for layer in range(4)] == [71, 57, 42, 28]
    uniform = make_method("minikv", compression=0.5, eviction_strategy="uniform")
    assert [uniform.layer_budget(100, layer, 4) for layer in range(4)] == [50] * 4
    # a heavy share past the prompt keeps all of it
    assert make_method("minikv", compression=0.1).layer_budget(100, 0, 4) == 100


def test_minikv_keeps_the_heavy_hitters_and_the_recent_window():
    from nanokv.methods.base import PrefillView

    # S = 10, budget 4, uniform: recent = int(4 * 0.5) = 2 (slots 8, 9), heavy 2 of slots 0..7 by
    # accumulated attention. Head 0's largest sums outside the window are at 3 (0.9) and 6 (0.8)
    # (slot 9's 5.0 is in the window anyway); head 1's at 0 (0.7) and 7 (0.6).
    sums = torch.tensor([[0.1, 0.2, 0.1, 0.9, 0.1, 0.3, 0.8, 0.1, 0.0, 5.0],
                         [0.7, 0.1, 0.1, 0.2, 0.1, 0.3, 0.1, 0.6, 0.0, 0.0]])
    view = PrefillView(0, 1, torch.zeros(10, 2, 8), torch.zeros(2, 10, 8), torch.arange(10), column_sums=sums)
    mask = make_method("minikv", budget=4, eviction_strategy="uniform").keep_mask(view)
    assert [torch.nonzero(m).flatten().tolist() for m in mask] == [[3, 6, 8, 9], [0, 7, 8, 9]]


def test_minikv_stores_kivi_2bit_blocks_of_16_groups():
    codec = make_method("minikv", compression=0.5).quantization
    assert (codec.bits, codec.group_size, codec.block_size, codec.keys_per_channel, codec.packed) == (2, 16, 128, True, True)
    # at D = 64, per 128-token block: K and V codes 2 x 128 x 16 bytes; key scale + zero per channel
    # per 16 tokens 2 x 8 x 64 float16; value scale + zero per token per 16 channels 2 x 128 x 4
    # float16 -> 4096 + 2048 + 2048 = 8192 bytes, 64 per token (full float16: 256)
    assert codec.quantized_bytes(64) == 8192


def restated_column_sums(q, k):
    """[H, T] attention each key gets summed over the causal prompt queries, the group's query
    heads averaged (q [T, Hq, D], k [T, H, D])."""
    T, Hq, D = q.shape
    H = k.shape[1]
    logits = torch.einsum("thd,shd->hts", q.float(), k.float().repeat_interleave(Hq // H, dim=1)) / math.sqrt(D)
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return logits.softmax(-1).sum(1).view(H, Hq // H, T).mean(1)


class EvictThenCode(DenseCoded):
    """DenseCoded whose prompt, right after its prefill attention, keeps per head what `keep(layer,
    q, k)` ([H, T] bool, the same count per head) says, in position order."""

    def __init__(self, residual, coder, keep):
        super().__init__(residual, coder)
        self.keep = keep

    def __call__(self, layer, q, k, v, sliding_window):
        if layer in self.layers or len(k) == 1:
            return super().__call__(layer, q, k, v, sliding_window)
        out = attention_by_position(q, k, v, self.positions, self.positions)
        mask = self.keep(layer, q, k)                                   # [H, T]
        index = torch.stack([torch.nonzero(m).flatten() for m in mask], 1)  # [kept, H], position order
        kept_k = k.gather(0, index[..., None].expand(-1, -1, k.shape[-1]))
        kept_v = v.gather(0, index[..., None].expand(-1, -1, v.shape[-1]))
        self.store(layer, kept_k, kept_v)
        return out


def test_minikv_engine_matches_a_plain_restatement(tiny_llama):
    from test_quant_cache import fake_quant

    R, steps = 16, 30
    # 40 prompt tokens, compression 0.5: B = 20, recent 10, heavy 10 x 13/7 = 18 (layer 0), 10 x 1/7 = 1
    budgets = {0: (18, 10), 1: (1, 10)}

    def keep(layer, q, k):
        heavy, recent = budgets[layer]
        scores = restated_column_sums(q, k)
        scores[:, len(k) - recent:] = math.inf
        top = scores.topk(heavy + recent, dim=-1).indices
        return torch.zeros(scores.shape, dtype=torch.bool).scatter(-1, top, True)

    def coder(k, v):
        return fake_quant(k, 2, 16, 0), fake_quant(v, 2, 16, 2)

    llm, out = engine_tokens(tiny_llama, "minikv", PROMPT, steps, compression=0.5, residual_length=R)
    assert out.token_ids == restated_greedy(llm.model, EvictThenCode(R, coder, keep), PROMPT, steps)
    # held: layer 0 28 + 29 decode tokens = 3 blocks of 16 + 9, layer 1 11 + 29 = 2 blocks + 8; a
    # 2-bit token at D = 64 and groups of 16 takes 8192 / 128 = 64 bytes, a residual one 2 x 64 x 4 + 4
    assert out.metrics["kv_cache_bytes_theory"] == (48 + 32) * 64 + (9 + 8) * (2 * 64 * 4 + 4)
    _, snap = engine_tokens(tiny_llama, "pyramidkv", PROMPT, steps, compression=0.5)
    assert out.metrics["kv_cache_bytes"] < snap.metrics["kv_cache_bytes"]


# --- leankv -----------------------------------------------------------------------------------

def test_leankv_each_head_keeps_tokens_until_they_cover_its_attention_mass():
    from nanokv.methods.base import PrefillView

    # window 2 (slots 6, 7), attention_mass 0.9, budget 6. Head 0 is concentrated: the window holds
    # 0.06 + 0.06 = 0.12, slot 0 brings it to 0.62, slot 3 to 0.92 >= 0.9: it keeps 0, 3, 6, 7.
    # Head 1 is uniform (1/8 each): the window 0.25, each token 0.125 more, 0.9 needs 0.25 + 6 x
    # 0.125 = 1.0, all 8; the budget caps it at 6 (the window and 4 of the tied others).
    shares = torch.tensor([[0.5, 0.02, 0.02, 0.3, 0.02, 0.02, 0.06, 0.06], [0.125] * 8])
    leankv = make_method("leankv", budget=6, window_size=2, attention_mass=0.9)
    leankv.significance = lambda view: shares.clone()
    view = PrefillView(0, 1, torch.zeros(8, 2, 8), torch.zeros(2, 8, 8), torch.arange(8))
    mask = leankv.keep_mask(view)
    assert torch.nonzero(mask[0]).flatten().tolist() == [0, 3, 6, 7]
    assert int(mask[1].sum()) == 6 and bool(mask[1, 6:].all())
    # a budget under the window keeps the newest
    small = make_method("leankv", budget=1, window_size=2)
    small.significance = lambda view: shares.clone()
    assert small.keep_mask(view).nonzero().tolist() == [[0, 7], [1, 7]]


def test_leankv_codec_keys_and_values_in_their_own_bits():
    from nanokv.methods.leankv import HeteroCodec

    # K4V2, numbers on each group's grid read back exactly. Key channel c over the 8 tokens (one
    # group): (0, 1, ..., 6, 15) times (c + 1), min 0, max 15 (c + 1): the 4-bit step is c + 1.
    # Value token t over the 8 channels: (c mod 4) (t + 1), max 3 (t + 1): the 2-bit step is t + 1.
    R = D = G = 8
    t, c = torch.arange(R)[:, None].float(), torch.arange(D)[None, :].float()
    k = (torch.where(t == 7, 15.0, t) * (c + 1))[None]
    v = ((c % 4) * (t + 1))[None]
    codec = HeteroCodec(4, 2, G, R)
    fields = codec.encode(k, v, 0, None)
    assert fields["k_codes"].shape == (1, R, D * 4 // 8) and fields["v_codes"].shape == (1, R, D * 2 // 8) and fields["k_scale"].shape == (1, R // G, D)
    k_read, v_read = codec.decode(fields, 0)
    assert torch.equal(k_read, k) and torch.equal(v_read, v)
    # K8V4 against the plain restatement of KIVI's grid (test_quant_cache.fake_quant)
    from test_quant_cache import fake_quant

    x, y = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
    codec = HeteroCodec(8, 4, 32, 64)
    k_read, v_read = codec.decode(codec.encode(x, y, 0, None), 0)
    assert torch.allclose(k_read, fake_quant(x, 8, 32, 1), atol=1e-6)
    assert torch.allclose(v_read, fake_quant(y, 4, 32, 2), atol=1e-6)


def test_leankv_bytes_per_token_as_stored():
    # D = 64, G = 32, R = 128: K8V4 64 + 32 code bytes + 8 key scale/zero + 8 value scale/zero = 112
    # per token; K4V2 32 + 16 + 8 + 8 = 64; full float16 K and V 256
    assert make_method("leankv", compression=0.5).quantization.quantized_bytes(64) == 128 * 112
    assert make_method("leankv", compression=0.5, k_bits=4, v_bits=2).quantization.quantized_bytes(64) == 128 * 64


def test_leankv_engine_matches_a_plain_restatement(tiny_llama):
    from test_quant_cache import fake_quant

    R, W, steps = 32, 4, 30

    def keep(layer, q, k):
        # the last W queries' causal attention over the prompt, averaged over them and the group
        T, Hq, D = q.shape
        logits = torch.einsum("thd,shd->hts", q[-W:].float(), k.float().repeat_interleave(Hq // k.shape[1], 1))
        logits = logits / math.sqrt(D)
        future = torch.arange(T)[None, :] > torch.arange(T - W, T)[:, None]
        share = logits.masked_fill(future, -math.inf).softmax(-1).mean(1).view(k.shape[1], -1, T).mean(1)
        budget = 20                                         # compression 0.5 of 40
        masks = []
        for head in share:
            kept = list(range(T - W, T))                    # the window
            covered = float(head[kept].sum())
            for j in head[:T - W].argsort(descending=True).tolist():
                if covered >= 0.8 or len(kept) >= budget:
                    break
                kept.append(j)
                covered += float(head[j])
            masks.append(torch.zeros(T, dtype=torch.bool).index_fill(0, torch.tensor(kept), True))
        return torch.stack(masks)

    def coder(k, v):
        return fake_quant(k, 4, 32, 0), fake_quant(v, 2, 32, 2)

    llm, out = engine_tokens(tiny_llama, "leankv", PROMPT, steps, compression=0.5, window_size=W,
                             attention_mass=0.8, k_bits=4, v_bits=2, residual_length=R)
    reference = EvictThenCode(R, coder, keep)
    assert out.token_ids == restated_greedy(llm.model, reference, PROMPT, steps)
    # what each layer keeps of the prompt, by the restatement, is what the engine holds
    held = [len(reference.layers[layer][0]) + len(reference.layers[layer][2]) for layer in (0, 1)]
    per_token = 2 * 64 * 4 + 4
    cold = [h // R * R for h in held]
    assert out.metrics["kv_cache_bytes_theory"] == sum(c * 64 + (h - c) * per_token for c, h in zip(cold, held))
    assert all(h < 20 + steps - 1 for h in held)  # the threshold kept fewer than the budget (13, 10 here)


# --- bitdecoding ------------------------------------------------------------------------------

def words(data):
    """Little-endian 16-bit words from the byte pairs of a words field."""
    pairs = data.to(torch.int64).unflatten(-1, (-1, 2))
    return pairs[..., 0] + 256 * pairs[..., 1]


def test_bitdecoding_packs_4bit_codes_32_apart_in_16bit_words():
    from nanokv.methods.bitdecoding import BitDecodingCodec

    # 4 bits: a block of 32 x 4 = 128 tokens; D = 8, key groups of 128 tokens, value groups of
    # min(128, 8) = 8 channels. Key channel 0 is 0, 5, 10, 15 at tokens 0, 32, 64, 96 and 0
    # elsewhere: min 0, max 15, scale 1, so its codes are the numbers; word (t0 = 0, c = 0) holds
    # tokens 0, 32, 64, 96 from the lowest bits up: 0x0 | 0x5 << 4 | 0xA << 8 | 0xF << 12 = 0xFA50;
    # word (1, 0) holds tokens 1, 33, 65, 97: 0. Value token 0 is (0, 9, 3, 9, 7, 9, 15, 9): scale 1;
    # word (t = 0, n0 = 0) holds channels 0, 2, 4, 6 (stride D / 4 = 2): 0xF730; word (0, 1) the
    # 9s: 0x9999.
    R, D = 128, 8
    k = torch.zeros(1, R, D)
    k[0, [0, 32, 64, 96], 0] = torch.tensor([0.0, 5, 10, 15])
    v = torch.zeros(1, R, D)
    v[0, 0] = torch.tensor([0.0, 9, 3, 9, 7, 9, 15, 9])
    codec = BitDecodingCodec(4, 128)
    assert codec.block_size == R
    fields = codec.encode(k, v, 0, None)
    k_words, v_words = words(fields["k_words"]), words(fields["v_words"])
    assert k_words.shape == (1, 32, D) and v_words.shape == (1, R, 2)
    assert k_words[0, 0, 0] == 0xFA50 and k_words[0, 1, 0] == 0 and k_words[0, 0, 1] == 0
    assert v_words[0, 0].tolist() == [0xF730, 0x9999]
    # params: per key group, the D scales then the D zeros; per value group, the R scales then zeros
    assert fields["k_params"][0, 0, 0] == 1 and fields["k_params"][0, 0, D] == 0
    assert fields["v_params"][0, 0, 0] == 1 and fields["v_params"][0, 0, R] == 0
    k_read, v_read = codec.decode(fields, 0)
    assert torch.equal(k_read, k) and torch.equal(v_read, v)


def test_bitdecoding_packs_2bit_codes_eight_to_a_word():
    from nanokv.methods.bitdecoding import BitDecodingCodec

    # 2 bits: 32 x 8 = 256 tokens. Key channel 0 at token t is (t // 32) mod 4: word (0, 0) holds
    # tokens 0, 32, ..., 224 = 0, 1, 2, 3, 0, 1, 2, 3 (scale 1): 0b11100100 twice = 0xE4E4.
    codec = BitDecodingCodec(2, 128)
    k = torch.zeros(1, 256, 8)
    k[0, :, 0] = (torch.arange(256) // 32 % 4).float()
    fields = codec.encode(k, torch.zeros(1, 256, 8), 0, None)
    assert codec.block_size == 256 and words(fields["k_words"])[0, 0, 0] == 0xE4E4
    assert torch.equal(codec.decode(fields, 0)[0], k)


@pytest.mark.parametrize("bits,group", [(4, 32), (2, 64)])
def test_bitdecoding_decodes_the_numbers_kivis_layout_decodes(bits, group):
    from nanokv.cache.quant_pool import QuantSpec
    from nanokv.methods.bitdecoding import BitDecodingCodec

    codec = BitDecodingCodec(bits, group)
    kivi = QuantSpec(bits, True, group, codec.block_size)
    torch.manual_seed(1)
    k, v = torch.randn(3, codec.block_size, 64) * 3, torch.randn(3, codec.block_size, 64)
    ours, theirs = codec.decode(codec.encode(k, v, 0, None), 0), kivi.decode(kivi.encode(k, v, 0, None), 0)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    # the layout changes, the bytes do not
    assert codec.quantized_bytes(64) == kivi.quantized_bytes(64)


def test_bitdecoding_bytes_per_token_as_stored():
    # D = 64, G = 128 (values: one group of 64). 4 bits, 128 tokens: K words 32 x 128 bytes, K params
    # 1 x 128 float16, V words 128 x 32 bytes, V params 1 x 256 float16: 8960 = 70 a token.
    # 2 bits, 256 tokens: 16 x 128 + 2 x 128 x 2 + 256 x 16 + 512 x 2 = 9728 = 38 a token.
    assert make_method("bitdecoding").quantization.quantized_bytes(64) == 8960
    assert make_method("bitdecoding", bits=2).quantization.quantized_bytes(64) == 9728


@pytest.mark.parametrize("evictor", ["", "snapkv+"])
def test_bitdecoding_gives_kivis_tokens_in_the_engine(tiny_llama, evictor):
    prompt = [(j * 53 + 7) % 256 for j in range(160)]   # one block of 128 goes cold at prefill (144 kept by snapkv)
    options = {"compression": 0.1, "window_size": 4} if evictor else {}
    _, ours = engine_tokens(tiny_llama, evictor + "bitdecoding", prompt, 8, group_size=32, **options)
    _, kivi = engine_tokens(tiny_llama, evictor + "kivi", prompt, 8, bits=4, group_size=32, **options)
    _, full = engine_tokens(tiny_llama, evictor.rstrip("+") or "full", prompt, 8, **options)
    assert ours.token_ids == kivi.token_ids
    assert ours.metrics["kv_cache_bytes_theory"] == kivi.metrics["kv_cache_bytes_theory"]
    assert ours.metrics["kv_cache_bytes_theory"] < full.metrics["kv_cache_bytes_theory"]


# --- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,option,value,valid", [
    ("mustafar", "k_sparsity", 1.0, "[0, 1)"), ("mustafar", "v_sparsity", -0.1, "[0, 1)"),
    ("mustafar", "residual_length", 0, "positive"),
    ("minikv", "eviction_strategy", "steep", "'pyramid' or 'uniform'"), ("minikv", "bits", 3, "2, 4 or 8"),
    ("minikv", "recent_ratio", 1.5, "[0, 1]"),
    ("leankv", "attention_mass", 0.0, "(0, 1]"), ("leankv", "v_bits", 3, "2, 4 or 8"),
    ("leankv", "k_bits", 2, "at least v_bits=4"),
    ("bitdecoding", "bits", 8, "2 or 4"), ("bitdecoding", "group_size", 512, "divide the pack block"),
])
def test_bad_options_name_the_value_and_the_valid_range(method, option, value, valid):
    kwargs = {} if method in ("mustafar", "bitdecoding") else {"compression": 0.5}
    with pytest.raises(ValueError, match=rf"{option}={value!r}.*{re.escape(valid)}|{option}={value}.*{re.escape(valid)}"):
        make_method(method, **{option: value}, **kwargs)


@pytest.mark.parametrize("evictor", ["minikv", "leankv"])
def test_an_evictor_that_quantizes_itself_takes_no_second_quantizer(evictor):
    with pytest.raises(ValueError, match=f"{evictor} quantizes what it keeps itself"):
        make_method(f"{evictor}+kivi", compression=0.5)


def test_bitdecoding_value_params_run_128_tokens_at_a_time():
    from nanokv.methods.bitdecoding import BitDecodingCodec

    # 2 bits, 256 tokens, one value group: per run of 128 tokens, its 128 scales then 128 zeros.
    # Token t's values are (0, 3 (t + 1), 0, ...): scale t + 1, zero 0 (float16-exact up to 2048).
    v = torch.zeros(1, 256, 8)
    v[0, :, 1] = 3 * (torch.arange(256) + 1.0)
    params = BitDecodingCodec(2, 128).encode(torch.zeros(1, 256, 8), v, 0, None)["v_params"][0, 0]
    assert params[:128].tolist() == list(range(1, 129)) and params[128:256].eq(0).all()
    assert params[256:384].tolist() == list(range(129, 257)) and params[384:].eq(0).all()


# --- on real weights --------------------------------------------------------------------------

def restated_snap_share(q, k, window):
    """[H, T]: the last `window` queries' causal attention, averaged over them and the group."""
    T, Hq, D = q.shape
    H = k.shape[1]
    logits = torch.einsum("thd,shd->hts", q[-window:].float(), k.float().repeat_interleave(Hq // H, 1)) / math.sqrt(D)
    future = torch.arange(T)[None, :] > torch.arange(T - window, T)[:, None]
    return logits.masked_fill(future, -math.inf).softmax(-1).mean(1).view(H, -1, T).mean(1)


def minikv_keep(budget, layers):
    def keep(layer, q, k):
        T = len(k)
        recent = budget // 2
        first, last = 2 - 1 / 7, 1 / 7
        heavy = int((budget - recent) * (first + (last - first) * layer / (layers - 1)))
        scores = restated_column_sums(q, k)
        scores[:, T - recent:] = math.inf
        return torch.zeros(scores.shape, dtype=torch.bool).scatter(-1, scores.topk(heavy + recent, -1).indices, True)
    return keep


def leankv_keep(budget, window, mass):
    def keep(layer, q, k):
        T = len(k)
        share = restated_snap_share(q, k, window)
        masks = []
        for head in share:  # the window, then the rest by share, until `mass` is covered
            kept, covered = list(range(T - window, T)), float(head[T - window:].sum())
            for j in head[:T - window].argsort(descending=True).tolist():
                if covered >= mass * float(head.sum()) or len(kept) >= budget:
                    break
                kept.append(j)
                covered += float(head[j])
            masks.append(torch.zeros(T, dtype=torch.bool).index_fill(0, torch.tensor(kept), True))
        return torch.stack(masks)
    return keep


class PerHeadEvictThenCode:
    """EvictThenCode with each kv-head on its own (heads may keep different counts, and so flush at
    different steps): per layer and head a DenseCoded of one head."""

    def __init__(self, residual, coder, keep):
        self.residual, self.coder, self.keep, self.heads = residual, coder, keep, {}

    def __call__(self, layer, q, k, v, sliding_window):
        H, group = k.shape[1], q.shape[1] // k.shape[1]
        if layer not in self.heads:  # prefill: attend over the whole prompt, then keep per head
            out = attention_by_position(q, k, v, self.positions, self.positions)
            mask = self.keep(layer, q, k)
            self.heads[layer] = [DenseCoded(self.residual, self.coder) for _ in range(H)]
            for h, head in enumerate(self.heads[layer]):
                kept = torch.nonzero(mask[h]).flatten()
                head.store(0, k[kept, h:h + 1], v[kept, h:h + 1])
            return out
        outs = []
        for h, head in enumerate(self.heads[layer]):
            head.positions = self.positions
            outs.append(head(0, q[:, h * group:(h + 1) * group], k[:, h:h + 1], v[:, h:h + 1], sliding_window))
        return torch.cat(outs, dim=1)


@pytest.mark.slow
def test_leankv_engine_matches_the_restatement_on_smollm2(smollm2_gguf):
    from test_quant_cache import fake_quant

    prompt, steps = list(range(1000, 1200)), 40   # 200 tokens: budget 100, blocks of 64
    reference = PerHeadEvictThenCode(64, lambda k, v: (fake_quant(k, 8, 32, 0), fake_quant(v, 4, 32, 2)),
                                     leankv_keep(100, 32, 0.95))
    llm, out = engine_tokens(str(smollm2_gguf), "leankv", prompt, steps, compression=0.5, residual_length=64)
    assert out.token_ids == restated_greedy(llm.model, reference, prompt, steps)
    kept = [[int(len(head.layers[0][0]) + len(head.layers[0][2])) for head in heads] for heads in reference.heads.values()]
    assert len({n for layer in kept for n in layer}) > 1  # heads really kept different counts


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mustafar", "minikv", "bitdecoding"])
def test_engine_matches_the_restatement_on_smollm2(smollm2_gguf, method):
    from test_quant_cache import fake_quant

    prompt, steps = list(range(1000, 1200)), 40   # 200 tokens
    if method == "mustafar":
        def prune(x):
            order = x.abs().argsort(dim=-1, descending=True)
            mask = torch.zeros_like(x, dtype=torch.bool).scatter(-1, order[..., :32], True)  # 64 - 32
            return torch.where(mask, x.half().float(), 0.0)
        options, reference = {}, DenseCoded(128, lambda k, v: (prune(k), prune(v)))
    elif method == "minikv":
        options = {"compression": 0.5}
        reference = EvictThenCode(128, lambda k, v: (fake_quant(k, 2, 16, 0), fake_quant(v, 2, 16, 2)),
                                  minikv_keep(100, 30))
    else:  # KIVI's numbers, 4 bits, key groups of 128 tokens, value groups of 64 channels
        options, reference = {}, DenseCoded(128, lambda k, v: (fake_quant(k, 4, 128, 0), fake_quant(v, 4, 64, 2)))
    llm, out = engine_tokens(str(smollm2_gguf), method, prompt, steps, **options)
    assert out.token_ids == restated_greedy(llm.model, reference, prompt, steps)
