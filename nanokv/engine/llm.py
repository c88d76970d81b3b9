"""LLM: the front door. `LLM(model).generate(prompts, SamplingParams(...))`.

This first version runs one sequence at a time over a contiguous cache: prefill the
prompt in one forward pass, then decode one token per pass. The batching engine (paged
head-block cache, scheduler) replaces the loop in `stream` without changing this API.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from nanokv.cache import ContiguousKVCache
from nanokv.engine.sequence import RequestOutput, Sequence
from nanokv.hub import DEFAULT_MODEL, resolve_model
from nanokv.loading import DTYPES, load_model, read_gguf
from nanokv.methods import check_method
from nanokv.sampling import SamplingParams, sample
from nanokv.tokenizer import Tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, *, dtype: str = "bfloat16", device: str | None = None,
                 method: str = "full", threads: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        self.method = check_method(method)
        self.device = device or default_device()
        if threads:
            torch.set_num_threads(threads)
        self.dtype = DTYPES[dtype]
        self.source = resolve_model(model)
        self.model_name = model
        self.model, self.config = load_model(self.source.kind, self.source.path, self.dtype, self.device)
        if self.source.kind == "gguf":
            # the weights loader already parsed this file's metadata (read_gguf is cached)
            self.tokenizer = Tokenizer.from_gguf_metadata(read_gguf(self.source.path).metadata, str(self.source.path))
        else:
            self.tokenizer = Tokenizer.from_dir(self.source.path)

    # --- prompts ----------------------------------------------------------------------

    def encode(self, prompt: str | list[int], chat: bool = True) -> list[int]:
        """A string becomes token ids, through the chat template when the model has one and
        `chat` is set; a list of ids passes through unchanged."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            if chat and self.tokenizer.has_chat_template:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if any(not (0 <= i < self.config.vocab_size) for i in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        return ids

    def _check_length(self, prompt_ids: list[int]):
        limit = self.config.max_position_embeddings
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {limit}")

    # --- generation -------------------------------------------------------------------

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty")
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [self.encode(p, chat) for p in prompts]
        for p in ids:
            self._check_length(p)
        outputs = []
        for prompt_ids, p in zip(ids, params):
            events = self.stream(prompt_ids, p)
            for _ in events:
                pass
            outputs.append(events.result)
        return outputs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, chat: bool = True):
        """Generate for one prompt, yielding text pieces as they become final. The iterator's
        `result` holds the RequestOutput (with timings and KV bytes) once it is exhausted."""
        prompt_ids = self.encode(prompt, chat)
        self._check_length(prompt_ids)
        return _Stream(self, prompt_ids, params or SamplingParams())

    @torch.inference_mode()
    def _run(self, prompt_ids: list[int], params: SamplingParams, out: "_Stream") -> Iterator[str]:
        seq = Sequence(prompt_ids, params, self.tokenizer.stop_token_ids,
                       self.tokenizer.stream_decoder().push, self.config.max_position_embeddings)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        cache = ContiguousKVCache(self.config, self.dtype, self.device, capacity=len(prompt_ids) + 64)
        start = time.perf_counter()
        tokens = torch.tensor(prompt_ids, device=self.device)
        positions = torch.arange(len(prompt_ids), device=self.device)
        first_token_at = None
        while not seq.finished:
            cache.begin_forward(positions)
            hidden = self.model(tokens, positions, cache)
            cache.end_forward()
            logits = self.model.compute_logits(hidden[-1:])
            token = int(sample(logits, [params], [generator])[0])
            if first_token_at is None:
                first_token_at = time.perf_counter()
            piece = seq.append(token)
            if piece:
                yield piece
            tokens = torch.tensor([token], device=self.device)
            positions = torch.tensor([len(seq) - 1], device=self.device)
        end = time.perf_counter()
        decoded = max(len(seq.output_token_ids) - 1, 0)  # the first token came from prefill
        out.result = seq.output({
            "prompt_tokens": len(prompt_ids),
            "generated_tokens": len(seq.output_token_ids),
            "ttft_s": first_token_at - start,
            "prefill_tokens_per_s": len(prompt_ids) / (first_token_at - start),
            "decode_tokens_per_s": decoded / (end - first_token_at) if decoded else 0.0,
            "kv_cache_bytes": cache.nbytes,
        })


class _Stream:
    """An iterator of text pieces that keeps the final RequestOutput in `.result`."""

    def __init__(self, llm: LLM, prompt_ids: list[int], params: SamplingParams):
        self.result: RequestOutput | None = None
        self._pieces = llm._run(prompt_ids, params, self)

    def __iter__(self):
        return self._pieces
