"""A tiny random Llama saved as a Hugging Face checkpoint (config.json, model.safetensors and a
byte-level tokenizer.json), for tests that go through nanokv's front doors (LLM, generate.py)
without downloading a model. Random weights: its text is noise, its tokens are reproducible."""

from pathlib import Path

import torch


def save_tiny_llama(path: Path, num_layers: int = 2) -> Path:
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
                           num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2,
                           max_position_embeddings=256)   # heads of 64, as SmolLM2's
    T.AutoModelForCausalLM.from_config(config).float().save_pretrained(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())   # 256 tokens: one per byte
    backend = Tokenizer(models.BPE(vocab={b: i for i, b in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    (path / "tokenizer.json").write_text(backend.to_str())
    return path
