"""Model definitions. They know nothing of KV caches or compression: see nanokv/models/llama.py."""

from nanokv.models.llama import LlamaModel

# One decoder covers every supported family; the differences are ModelConfig switches.
MODEL_CLASSES = {"llama": LlamaModel, "mistral": LlamaModel, "qwen2": LlamaModel, "qwen3": LlamaModel}
