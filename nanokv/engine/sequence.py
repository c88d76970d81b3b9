"""Sequence: one request's tokens, text and stopping state.

Text is produced incrementally so it can be streamed; stop strings are checked on the
text, and any tail that could still grow into a stop string is held back until it can't.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from nanokv.sampling import SamplingParams

_ids = itertools.count()


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str            # "stop" (EOS or a stop string) or "length"
    metrics: dict = field(default_factory=dict)


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, stop_token_ids: set[int],
                 decoder, max_length: int):
        self.id = next(_ids)
        self.prompt_token_ids = list(prompt_token_ids)
        # the leading prompt tokens a compression method compresses; the rest (a question asked
        # after a compressed context, as kvpress does) attends over them uncompressed
        self.compress_len = len(self.prompt_token_ids)
        # a method's scoring passes over the compressed part, each fed after it and dropped (KVzip)
        self.scoring_passes: list[list[int]] = []
        # how far its positions fall behind its tokens: a prompt re-prefilled from the tokens a filter
        # pass kept (GemFilter) sits at positions 0 .. k - 1, and what follows it from k on
        self.position_shift = 0
        # its own compression method (engine/request_methods.py), or None: the engine's
        self.method = None
        self.output_token_ids: list[int] = []
        self.params = params
        self.stop_token_ids = set() if params.ignore_eos else stop_token_ids
        self.max_length = max_length  # the model's context: generation ends there too
        self._decoder = decoder        # token id -> text piece (see Tokenizer.stream_decoder)
        self.text = ""                 # text of the output so far, stop string excluded
        self._emitted = 0              # how much of self.text has been handed out
        self.finish_reason: str | None = None
        # timings (time.perf_counter) and the KV bytes held when it finished, for the stats
        self.arrival_time = self.first_token_time = self.finish_time = None
        self.kv_bytes = 0
        self.kv_bytes_uncompressed = 0  # what `full` would hold for the same tokens
        self.kv_bytes_theory = 0        # the tokens held with no block rounding (packed + scales + residual)
        self.num_cached = 0             # tokens that have gone through the model
        # leading tokens whose K/V the prefix cache served at its last admission (engine/prefix_sharing.py):
        # its prefill computes only what follows them
        self.prefix_cached = 0
        self.generator = None  # a seeded torch.Generator when params.seed is set
        self.num_preemptions = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self):
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def append(self, token_id: int) -> str:
        """Record a sampled token; return the text that is now safe to show."""
        if token_id in self.stop_token_ids:
            self.finish_reason = "stop"
            return self._flush()
        self.output_token_ids.append(token_id)
        self.text += self._decoder(token_id)
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, self._emitted - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return self._flush()
        if len(self.output_token_ids) >= self.params.max_tokens or len(self) >= self.max_length:
            self.finish_reason = "length"
            return self._flush()
        safe = len(self.text) - self._held_back()
        piece, self._emitted = self.text[self._emitted:safe], max(self._emitted, safe)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        longest = 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _flush(self) -> str:
        piece, self._emitted = self.text[self._emitted:], len(self.text)
        return piece

    def output(self) -> RequestOutput:
        n_out, n_in = len(self.output_token_ids), len(self.prompt_token_ids)
        ttft = self.first_token_time - self.arrival_time
        decode_time = self.finish_time - self.first_token_time
        metrics = {
            "prompt_tokens": n_in,
            "generated_tokens": n_out,
            "ttft_s": ttft,
            "prefill_tokens_per_s": n_in / ttft if ttft > 0 else 0.0,
            # the first token comes from the prefill; the rest from decode steps
            "decode_tokens_per_s": (n_out - 1) / decode_time if n_out > 1 and decode_time > 0 else 0.0,
            "kv_cache_bytes": self.kv_bytes,
            "kv_cache_bytes_uncompressed": self.kv_bytes_uncompressed,
            "kv_cache_bytes_theory": self.kv_bytes_theory,
            "kv_cache_tokens": self.num_cached,
            "preemptions": self.num_preemptions,
        }
        return RequestOutput(self.prompt_token_ids, list(self.output_token_ids), self.text,
                             self.finish_reason or "length", metrics)
