"""Each supported family, as a tiny random transformers model saved with save_pretrained,
must load in nanokv and give transformers' logits and greedy tokens."""

import pytest
import torch
import transformers as T

from helpers import assert_same_greedy, hf_greedy, nanokv_greedy, nanokv_logits
from nanokv.loading import load_model

SIZES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=256)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}

CASES = {
    "llama": (T.LlamaConfig, {}),
    "llama3-rope": (T.LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "mistral-window": (T.MistralConfig, {"sliding_window": 16}),
    "qwen2": (T.Qwen2Config, {}),
    "qwen3": (T.Qwen3Config, {"head_dim": 32}),
    "qwen3-tied": (T.Qwen3Config, {"head_dim": 32, "tie_word_embeddings": True}),
}


_built, _saved = {}, {}  # per case: the models; where it was saved


def build(name, tmp_path_factory):
    """(name, transformers model, nanokv model, config), built and saved once per case."""
    if name not in _built:
        config_class, extra = CASES[name]
        torch.manual_seed(0)
        hf = T.AutoModelForCausalLM.from_config(config_class(**SIZES, **extra)).float().eval()
        with torch.no_grad():  # transformers initializes biases (Qwen2's q/k/v) to zero: make them count
            for module in hf.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(std=0.5)
        path = tmp_path_factory.mktemp(name)
        # the plain Llama case is saved in shards, to load through model.safetensors.index.json
        hf.save_pretrained(path, **({"max_shard_size": "200KB"} if name == "llama" else {}))
        model, cfg = load_model("hf_dir", path, torch.float32)
        _built[name] = name, hf, model, cfg
        _saved[name] = path
    return _built[name]


@pytest.fixture(params=list(CASES))
def pair(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


def prompt(n=64, seed=1):
    return torch.randint(0, SIZES["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_match_transformers(pair):
    name, hf, model, cfg = pair
    ids = prompt()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = nanokv_logits(model, cfg, ids)
    assert ref.abs().max() > 0.5  # the comparison must be between non-trivial logits
    assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_matches_transformers(pair):
    name, hf, model, cfg = pair
    ids = prompt(seed=2)
    theirs, their_logits = hf_greedy(hf, ids, 20)
    ours = nanokv_greedy(model, cfg, ids, 20)
    assert_same_greedy(ours, theirs, their_logits)


@pytest.mark.parametrize("name", ["mistral-window", "llama3-rope"])
def test_family_switch_matters(name, tmp_path_factory):
    """The switch a case exists for must change the logits, or the case tests nothing."""
    name, hf, model, cfg = build(name, tmp_path_factory)
    ids = prompt()
    base = nanokv_logits(model, cfg, ids)
    if name == "mistral-window":
        for layer in model.layers:
            layer.self_attn.sliding_window = None
        changed = nanokv_logits(model, cfg, ids)
        for layer in model.layers:
            layer.self_attn.sliding_window = 16
    else:
        from nanokv.models.rope import inverse_frequencies
        saved = model.inv_freq.clone()
        model.inv_freq.copy_(inverse_frequencies(cfg.head_dim, cfg.rope_theta, {}))
        changed = nanokv_logits(model, cfg, ids)
        model.inv_freq.copy_(saved)
    assert (changed - base).abs().max() > 1e-3


def test_config_reads_both_rope_spellings():
    from nanokv.config import ModelConfig

    old = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    cfg = ModelConfig.from_hf_dict(old)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    new = dict(old, rope_parameters={**old.pop("rope_scaling"), "rope_theta": 1e6})
    new.pop("rope_theta")
    assert ModelConfig.from_hf_dict(new).rope_theta == 1e6


def test_qwen2_sliding_layers_follow_layer_types():
    from nanokv.config import ModelConfig

    cfg = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 3, "num_attention_heads": 2, "sliding_window": 4}
    assert ModelConfig.from_hf_dict(cfg).sliding_windows == [None] * 3
    cfg.update(use_sliding_window=True, layer_types=["full_attention", "sliding_attention", "full_attention"])
    assert ModelConfig.from_hf_dict(cfg).sliding_windows == [None, 4, None]


@pytest.mark.parametrize("name", ["qwen2", "qwen3-tied"])  # biases; a tied output head
def test_packed_bfloat16_linears_equal_plain_ones(name, tmp_path_factory):
    """On CPU in bfloat16 the loader packs the linear weights for oneDNN (nanokv/models/cpu_linear.py);
    the logits must be bit-identical to plain F.linear's."""
    from nanokv.models.cpu_linear import PackedLinear, can_pack

    if not can_pack(torch.bfloat16, "cpu"):
        pytest.skip("torch built without oneDNN")
    build(name, tmp_path_factory)
    path = _saved[name]
    packed, cfg = load_model("hf_dir", path, torch.bfloat16)
    plain, _ = load_model("hf_dir", path, torch.bfloat16, pack=False)
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(packed.layers[0].mlp.down_proj, PackedLinear)
    ids = prompt()
    ours, theirs = (nanokv_logits(m, cfg, ids, torch.bfloat16) for m in (packed, plain))
    assert theirs.abs().max() > 0.5
    assert torch.equal(ours, theirs)


def test_cos_and_sin_of_repeating_positions_read_from_their_range_are_the_rows_own():
    """A reader undoes RoPE on every head's copy of its tokens: each position of their range once,
    read per row, must be the same numbers as per row (repeats and a negative range: the table;
    positions spread wider than their count: per row)."""
    from nanokv.models.rope import inverse_frequencies, rope_cos_sin, rope_cos_sin_gathered
    inv_freq = inverse_frequencies(8, 10000.0, {})
    for positions in (torch.tensor([5, 3, 5, 4, 3, 9, 9, 9, 5, 4, 3, 7]), -torch.arange(40).repeat(3),
                      torch.tensor([0, 1000, 70000]), torch.zeros(0, dtype=torch.int64)):
        want = rope_cos_sin(positions, inv_freq, torch.float32)
        got = rope_cos_sin_gathered(positions, inv_freq, torch.float32)
        assert all(torch.allclose(g, w, atol=1e-6, rtol=0) for g, w in zip(got, want))
