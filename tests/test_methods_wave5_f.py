"""ECKVH (nanokv/methods/eckvh.py, nanokv/calibrate/eckvh.py): groups of kv-heads kept as fewer
heads' worth of latents, in the SVD of their activations on calibration text.

The ranks by hand; the calibration's bases against an SVD of the activations gathered here; two
identical kv-heads merged into one losslessly (the engine's tokens equal full's); the engine
against a plain restatement of the model with projected keys (before RoPE) and values, on a tiny
Qwen2 (biases) and on SmolLM2 (slow); the bytes held; the command; bad input."""

import math

import pytest
import torch

from helpers import byte_tokenizer_json, restated_greedy
from nanokv.calibrate import write_artifact
from nanokv.calibrate.eckvh import activation_bases
from nanokv.kernels.reference import attention_by_position
from nanokv.methods import make_method
from nanokv.models.rope import apply_rope, rope_cos_sin

D = 64


def tiny_model(tmp_path, arch: str, duplicate: bool = False):
    """A random 2-layer model (4 query heads over 2 kv-heads of 64) saved for LLM; with
    `duplicate`, kv-head 1's key and value projections copied from kv-head 0's in every layer."""
    import transformers as T

    shapes = dict(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
    torch.manual_seed(0)
    config = T.LlamaConfig(**shapes) if arch == "llama" else T.Qwen2Config(**shapes)
    hf = T.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:  # Qwen2's, zeros at init: some, so a bias is there to leave out
                    proj.bias.normal_(0, 0.5)
                if duplicate:
                    proj.weight[D:] = proj.weight[:D]
                    if proj.bias is not None:
                        proj.bias[D:] = proj.bias[:D]
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(byte_tokenizer_json())
    return tmp_path


def texts(n=2, length=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=gen).tolist() for _ in range(n)]


def calibrate_tiny(path, group=2):
    """An eckvh artifact for the tiny model at `path` -> (its file, the loaded model, config)."""
    from nanokv.artifacts import model_key
    from nanokv.loading import load_model

    model, cfg = load_model("hf_dir", path, torch.float32, pack=False)
    tensors = activation_bases(model, cfg, texts(), group)
    out = path.parent / f"{path.name}-eckvh.safetensors"  # beside the model: its folder is read as weights
    write_artifact(out, {"format": 1, "method": "eckvh", "model": model_key(str(path)), "num_layers": cfg.num_layers,
                         "num_kv_heads": cfg.num_kv_heads, "group": group, "head_dim": cfg.head_dim, "settings": {},
                         "tensors": tensors})
    return out, model, cfg


def rotate(x, positions, inv_freq, inverse=False):
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32)
    return apply_rope(x.float(), cos, -sin if inverse else sin)


class Recorder:
    """Plain causal attention that keeps every layer's pre-RoPE keys and values [T, H, D]."""

    def __init__(self, inv_freq):
        self.inv_freq, self.k, self.v = inv_freq, {}, {}

    def __call__(self, layer, q, k, v, sliding_window):
        self.k.setdefault(layer, []).append(rotate(k, self.positions, self.inv_freq, inverse=True))
        self.v.setdefault(layer, []).append(v.float())
        return attention_by_position(q, k, v, self.positions, self.positions, sliding_window)


class Projected:
    """The restatement: the model's attention over every token so far, each layer's keys (before
    RoPE) and values replaced by k_g Psi_r Psi_r^T (around the projection's bias), Psi_r the first r
    columns of the artifact's bases of the token's head group."""

    def __init__(self, tensors, rank, inv_freq):
        self.t, self.rank, self.inv_freq, self.kv = tensors, rank, inv_freq, {}

    def project(self, x, basis, bias):
        T, H, _ = x.shape
        G = basis.shape[0]
        x = x.reshape(T, G, -1) - bias
        psi = basis[..., :self.rank]
        return ((x @ psi) @ psi.transpose(-1, -2) + bias).reshape(T, H, D)

    def __call__(self, layer, q, k, v, sliding_window):
        k_pre = rotate(k, self.positions, self.inv_freq, inverse=True)
        k = rotate(self.project(k_pre, self.t["k_basis"][layer], self.t["k_bias"][layer]), self.positions,
                   self.inv_freq)
        v = self.project(v.float(), self.t["v_basis"][layer], self.t["v_bias"][layer])
        keys, values, pos = self.kv.get(layer, (k[:0], v[:0], self.positions[:0]))
        keys, values, pos = torch.cat([keys, k]), torch.cat([values, v]), torch.cat([pos, self.positions])
        self.kv[layer] = keys, values, pos
        return attention_by_position(q, keys, values, self.positions, pos, sliding_window)


# --- ranks and bad input -------------------------------------------------------------------


@pytest.mark.parametrize("compression, group_dim, rank", [
    (0.5, 128, 64),    # the paper's 50%: 2 heads of 64 -> 1
    (0.75, 256, 64),   # the paper's 75%: 4 heads -> 1
    (0.5, 256, 128),   # 4 heads -> 2
    (0.5, 192, 96),    # 3 heads -> 1.5 heads' worth (SmolLM2's one group of 3)
    (0.9, 64, 16),     # never below one step of 16
])
def test_every_layer_keeps_the_same_share_of_its_group(compression, group_dim, rank):
    artifact = {"tensors": {"k_basis": torch.zeros(3, 2, group_dim, group_dim)}}
    assert make_method("eckvh", compression=compression).ranks(artifact) == ([rank] * 3, [rank] * 3)


def test_bad_settings_are_clear_errors(tmp_path):
    from nanokv.calibrate.cli import main

    with pytest.raises(ValueError, match="not budget"):
        make_method("eckvh", budget=64)
    with pytest.raises(ValueError, match=r"compression must be in \[0, 1\).*got 1.5"):
        make_method("eckvh", compression=1.5)
    with pytest.raises(ValueError, match=r"method 'snapkv\+eckvh': combine an eviction method with a quantization"):
        make_method("snapkv+eckvh", compression=0.5)  # every token kept as latents: nothing to evict into
    with pytest.raises(ValueError, match=r"unknown calibration method 'eckhv'; valid: .*eckvh"):
        from nanokv.calibrate.cli import calibrate
        calibrate("eckhv", "smollm2-135m")


# --- calibration: the SVD of the activations ----------------------------------------------------


@torch.inference_mode()
def test_the_bases_are_the_right_singular_vectors_of_the_stacked_activations(tmp_path):
    path = tiny_model(tmp_path, "qwen2")
    _, model, cfg = calibrate_tiny(path)
    t = activation_bases(model, cfg, texts(), 2)
    record = Recorder(model.inv_freq)
    for ids in texts():
        record.positions = torch.arange(len(ids))
        model(torch.tensor(ids), record.positions, record)
    b_k = model.layers[1].self_attn.qkv_proj.bias[cfg.q_size:cfg.q_size + cfg.kv_size].float()
    assert b_k.abs().max() > 0  # Qwen2's key bias, which the stored latents leave out
    for kind, bias in (("k", b_k), ("v", None)):
        stacked = torch.cat(getattr(record, kind)[1]).reshape(-1, 2 * D).double()   # [N, g D], one group
        stacked = stacked - (bias.double() if bias is not None else t["v_bias"][1, 0].double())
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        torch.testing.assert_close(t[f"{kind}_spectrum"][1, 0].double(), s, rtol=1e-4, atol=1e-3)
        for r in (D, D // 2):   # the kept subspace, whatever the signs of its vectors
            ours = t[f"{kind}_basis"][1, 0, :, :r].double()
            torch.testing.assert_close(ours @ ours.T, vh[:r].T @ vh[:r], atol=1e-4, rtol=0)
            # Eckart-Young: what a rank-r latent misses is the dropped spectrum
            missed = ((stacked - stacked @ ours @ ours.T) ** 2).sum()
            assert float(missed) == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-5)


# --- the engine ---------------------------------------------------------------------------------


@torch.inference_mode()
def test_two_identical_kv_heads_merge_into_one_without_loss(tmp_path):
    # Both heads of a group see the same keys and values, so the group's 128 numbers span at most 64
    # directions: keeping one head's worth (compression 0.5) loses nothing, as the paper's MHA -> GQA
    # merge of redundant heads; the tokens must be full's.
    from nanokv import LLM, SamplingParams

    path = tiny_model(tmp_path, "llama", duplicate=True)
    artifact, _, _ = calibrate_tiny(path)
    prompts = texts(2, 50, seed=3)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    full = LLM(str(path), dtype="float32").generate(prompts, params)
    eckvh = LLM(str(path), dtype="float32", method="eckvh", compression=0.5, calibration_file=str(artifact))
    assert [l.ranks for l in eckvh.method.latent_layers] == [(64, 64)] * 2
    outs = eckvh.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in full]
    for o, f in zip(outs, full):  # half the numbers: one head's keys and values where full keeps two
        held = 50 + 7
        assert o.metrics["kv_cache_bytes_theory"] == held * 2 * ((64 + 64) * 4 + 4)
        assert f.metrics["kv_cache_bytes_theory"] == held * 2 * 2 * (2 * 64 * 4 + 4)


@torch.inference_mode()
def test_the_engine_equals_the_model_with_projected_keys_and_values(tmp_path):
    from nanokv import LLM, SamplingParams

    path = tiny_model(tmp_path, "qwen2")
    artifact, model, _ = calibrate_tiny(path)
    from nanokv.artifacts import read_artifact

    tensors = read_artifact(artifact, "eckvh")["tensors"]
    llm = LLM(str(path), dtype="float32", method="eckvh", compression=0.75, calibration_file=str(artifact))
    prompts = texts(2, 40, seed=5) + [texts(1, 7, seed=6)[0]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [l.ranks for l in llm.method.latent_layers] == [(32, 32)] * 2
    per_block = llm.cache.pool.bytes_per_block
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == restated_greedy(model, Projected(tensors, 32, model.inv_freq), prompt, 6)
        held = len(prompt) + 5
        # a token of a layer takes ceil((32 + 32) / 32) = 2 slots of 16-channel k and v fields;
        # blocks of 16 slots, one group
        assert out.metrics["kv_cache_bytes"] == 2 * math.ceil(held * 2 / 16) * per_block
        assert out.metrics["kv_cache_bytes_theory"] == 2 * held * ((32 + 32) * 4 + 4)


# --- SmolLM2 (slow) ---------------------------------------------------------------------------------


@pytest.mark.slow
@torch.inference_mode()
def test_smollm2_engine_equals_the_restatement_and_the_command_writes_what_it_reads(smollm2_gguf, tmp_path):
    from nanokv import LLM, SamplingParams
    from nanokv.calibrate import load_calibration
    from nanokv.calibrate.cli import main

    out = tmp_path / "eckvh.safetensors"
    assert main(["eckvh", "--model", "smollm2-135m", "--samples", "2", "--length", "128", "--out", str(out)]) == 0
    artifact = load_calibration("eckvh", "smollm2-135m", 30, 3, out, 64)
    assert artifact["group"] == 3 and artifact["settings"]["samples"] == 2  # SmolLM2's 3 kv-heads: one group
    basis = artifact["tensors"]["k_basis"][7, 0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(192), atol=1e-4, rtol=0)
    llm = LLM(str(smollm2_gguf), dtype="float32", method="eckvh", compression=0.5, calibration_file=str(out),
              max_num_seqs=2)
    assert {l.ranks for l in llm.method.latent_layers} == {(96, 96)}
    prompts = [[100 + (i * 7 + j * 13) % 5000 for j in range(n)] for i, n in enumerate((60, 25))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    for prompt, o in zip(prompts, outs):
        assert o.token_ids == restated_greedy(llm.model, Projected(artifact["tensors"], 96, llm.model.inv_freq),
                                              prompt, 5)
        held = len(prompt) + 4
        assert o.metrics["kv_cache_bytes_theory"] == held * 30 * ((96 + 96) * 4 + 4)
        assert o.metrics["kv_cache_bytes_theory"] / o.metrics["kv_cache_bytes_uncompressed"] < 0.55
    assert main(["eckvh", "--model", "smollm2-135m", "--group", "2", "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(ValueError, match="made for method 'eckvh', not 'palu'"):
        load_calibration("palu", "smollm2-135m", 30, 3, out, 64)
