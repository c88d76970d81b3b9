"""LLM: the front door, in the spirit of vLLM and nano-vllm.

    llm = LLM("smollm2-135m", kv_cache_memory=2 << 30)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=64))
    LLM("llama3-8b", load_format="dummy")  # that shape with random weights: nothing downloaded

Under `torchrun --nproc-per-node N` (tensor_parallel_size: WORLD_SIZE by default) each process is
one rank (nanokv/distributed.py): it holds its share of the heads, a KV pool of its own heads'
blocks (kv_cache_memory bytes on each rank), and runs this same loop, in step with the others.

Requests go to the Scheduler; each step the ModelRunner runs one prefill or one decode
batch over the paged cache, and every sequence takes its sampled token. `stream` runs the
same loop for one prompt and yields its text as it becomes final.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
from tqdm import tqdm

from nanokv.kernels import KERNELS, kernels_for
from nanokv.cache.build import build_cache
from nanokv.cache.device_tables import DeviceTables
from nanokv.distributed import TensorParallel
from nanokv.engine.cuda_graphs import DecodeGraphs, eager_reason, most_table_bytes
from nanokv.engine.prefix_sharing import PrefixSharing
from nanokv.engine.request_methods import RequestMethods, method_key
from nanokv.engine.runner import ModelRunner
from nanokv.engine.scheduler import Scheduler
from nanokv.engine.sequence import RequestOutput, Sequence
from nanokv.hub import DEFAULT_MODEL, resolve_model
from nanokv.hardware import resolve_device, resolve_dtype
from nanokv.loading import LOAD_FORMATS, available_memory, load_dummy, load_model
from nanokv.methods import make_method
from nanokv.sampling import SamplingParams
from nanokv.tokenizer import Tokenizer


def kv_cache_bytes(kv_cache_memory: int | float | None, device: str, tables: int = 0) -> int:
    """Bytes as given, a fraction (0, 1] of the memory available now, or the default:
    90% of free GPU memory (after the weights are loaded) less `tables`, the most the decode tables
    can take beside the pool (table_bytes); 25% of free RAM (at most 4 GiB) on CPU."""
    if kv_cache_memory is None:
        if str(device).startswith("cuda"):
            return int(0.9 * available_memory(device)) - tables
        return min(4 << 30, available_memory(device) // 4)
    if isinstance(kv_cache_memory, float) and 0 < kv_cache_memory <= 1:
        return int(kv_cache_memory * available_memory(device))
    if kv_cache_memory <= 0:
        raise ValueError(f"kv_cache_memory must be a byte count > 0 or a fraction in (0, 1], got {kv_cache_memory!r}")
    return int(kv_cache_memory)


def context_blocks(cfg, block_size: int) -> int:
    """The most blocks a head's table holds: the model's context in blocks."""
    return -(-cfg.max_position_embeddings // block_size)


def table_bytes(request, cfg, block_size: int, max_num_seqs: int, graphs: bool) -> int:
    """The most bytes the decode tables take beside the KV pool: the device mirror of every running
    sequence's tables at the model's context, one a tier of the block kind (cache/device_tables.py),
    and with CUDA graphs their tables buffers (engine/cuda_graphs.py). At the 1B shape with a 128k
    context and 256 sequences: 1.1 GB of mirror and 0.3 GB of graph tables."""
    columns = context_blocks(cfg, block_size)
    mirrors = request.table_tiers() * DeviceTables.most_bytes(cfg.num_layers, cfg.num_kv_heads, max_num_seqs + 1,
                                                              columns)
    return mirrors + (most_table_bytes(cfg.num_layers, cfg.num_kv_heads, max_num_seqs, block_size) if graphs else 0)


def host_cache_bytes(host_cache_memory: int | float | None, kv_cache_memory: int) -> int:
    """Bytes for the host tier's pool: as given (bytes, or a fraction of free host memory), else
    four times the device pool, up to half of free host memory."""
    free = available_memory("cpu")
    if host_cache_memory is None:
        return int(min(4 * kv_cache_memory, free // 2))
    if isinstance(host_cache_memory, float) and 0 < host_cache_memory <= 1:
        return int(host_cache_memory * free)
    if host_cache_memory <= 0:
        raise ValueError(f"host_cache_memory must be a byte count > 0 or a fraction in (0, 1], got {host_cache_memory!r}")
    return int(host_cache_memory)


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str | None = None,
                 method: str = "full", compression: float = 0.0, budget: int | None = None,
                 kv_cache_memory: int | float | None = None, host_cache_memory: int | float | None = None,
                 block_size: int = 16, max_num_seqs: int = 256, max_num_batched_tokens: int = 4096,
                 kernels: str | None = None, load_format: str = "auto", enforce_eager: bool = False,
                 enable_prefix_caching: bool = False, tensor_parallel_size: int | None = None, **method_options):
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if kernels is not None and kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r}; valid: {', '.join(KERNELS)} "
                             "(default: triton on CUDA, cpu elsewhere)")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"unknown load_format {load_format!r}; valid: {', '.join(LOAD_FORMATS)}")
        self.model_name = model  # as given: a short name, a path, a repo id
        self.method = make_method(method, compression, budget, **method_options)
        self.device = str(resolve_device(device))
        self.dtype = resolve_dtype(dtype, self.device)  # "auto": what this device computes fastest
        # this process's rank of torchrun's group (one process: every collective the identity)
        self.tp = TensorParallel.from_env(self.device, tensor_parallel_size)
        self.device = self.tp.device if self.tp.size > 1 else self.device  # cuda:LOCAL_RANK under NCCL
        if load_format == "dummy":  # random weights of a shipped shape, no download (nanokv/loading.py)
            self.source = None
            self.model, self.config = load_dummy(model, self.dtype, self.device, tp=self.tp)
            self.tokenizer = Tokenizer.from_bytes(self.config.vocab_size)
        else:
            self.source = resolve_model(model)
            self.model, self.config = load_model(self.source.kind, self.source.path, self.dtype, self.device,
                                                 tp=self.tp)
            # from_gguf reads the metadata the weights loader already parsed (read_gguf is cached)
            make_tokenizer = Tokenizer.from_gguf if self.source.kind == "gguf" else Tokenizer.from_dir
            self.tokenizer = make_tokenizer(self.source.path)
        self.bind_method(self.method)
        # the block kind the method asks for (methods/base.py: cache_request), built by the cache for
        # the heads this rank holds (model.cfg: the whole model's config at tp=1)
        request = self.method.cache_request(self.config.num_layers, self.config.head_dim)
        graphs_may_run = torch.device(self.device).type == "cuda" and not enforce_eager
        memory = kv_cache_bytes(kv_cache_memory, self.device,
                                table_bytes(request, self.model.cfg, block_size, max_num_seqs, graphs_may_run))
        # a method that offloads (methods/base.py: Offloader) keeps older tokens in host memory
        host_memory = host_cache_bytes(host_cache_memory, memory) if self.method.offloads else 0
        self.cache = build_cache(request, self.model.cfg, memory, block_size, self.dtype, self.device,
                                 self.model.inv_freq, host_memory)
        # the mirror grows to what table_bytes set aside, no further
        self.cache.bound_tables(max_num_seqs + 1, context_blocks(self.model.cfg, block_size))
        self.cache.kernels = kernels_for(self.device, kernels, self.cache.workspace)
        # prefix caching (engine/prefix_sharing.py): what this method may share, and why not where it may not
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}")
        self.prefix_sharing = PrefixSharing(self.cache, self.method) if enable_prefix_caching else None
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens, self.method, self.prefix_sharing,
                                   self.tp)
        # decode steps as CUDA graphs where they can be (engine/cuda_graphs.py), else eagerly, and why
        self.eager_reason = eager_reason(self.method, self.cache, self.cache.kernels.name, self.device, enforce_eager)
        if self.tp.size > 1 and self.eager_reason is None:  # the all-reduces are not captured (not yet tried)
            self.eager_reason = "tensor parallelism (its all-reduces run eagerly)"
        graphs = DecodeGraphs(self.model, self.cache, max_num_seqs) if self.eager_reason is None else None
        self.runner = ModelRunner(self.model, self.cache, self.device, self.method, graphs,
                                  self.tp if self.tp.size > 1 else None)
        self.runner.sharing = self.prefix_sharing
        # the methods requests may name besides the engine's own, on the same pool (request_methods.py)
        self.methods = RequestMethods(self.method, method_key(method, compression, budget, **method_options),
                                      self.cache, self.bind_method)
        self.stats: dict = {}
        self.tally = new_tally()  # what the steps since the last generate()/stream() began did (step)
        self._busy = False  # one generate/stream at a time: they share the scheduler

    def bind_method(self, method):
        """Give a method what it reads from the model: its per-head calibration profile, made by
        python -m nanokv.calibrate (methods/base.py), and what each token id reads as."""
        if self.tp.size > 1 and method.tensor_parallel_reason:
            raise ValueError(f"method {method.name!r} cannot run under tensor parallelism: "
                             f"{method.tensor_parallel_reason}")
        if method.calibration:
            from nanokv.artifacts import load_calibration, rank_share
            artifact = load_calibration(method.calibration, self.model_name, self.config.num_layers,
                                        self.config.num_kv_heads, method.calibration_file or None,
                                        self.config.head_dim)
            # under tensor parallelism, this rank's heads of its per-head tables (artifacts.py)
            method.bind_calibration(rank_share(artifact, self.tp.rank, self.tp.size))
        if method.needs_vocabulary:
            method.bind_vocabulary([self.tokenizer.decode([i], skip_special_tokens=False)
                                    for i in range(self.tokenizer.vocab_size)])

    def request_method(self, spec):
        """A request's method from `spec`: None (the engine's), a method name, or a dict
        {"method": name, "compression": ..., "budget": ..., any method option} (the server's
        `kv_compression` field)."""
        if spec is None:
            return self.method
        if isinstance(spec, str):
            spec = {"method": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
            raise ValueError(f"a request's method must be a name or a dict with a 'method' name, got {spec!r}")
        options = dict(spec)
        name = options.pop("method")
        return self.methods.get(name, options.pop("compression", 0.0), options.pop("budget", None), **options)

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
        if any(not (isinstance(i, int) and 0 <= i < self.config.vocab_size) for i in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.config.vocab_size})")
        return ids

    def encode_with_question(self, context: str, question: str, chat: bool = True,
                             answer_prefix: str = "") -> tuple[list[int], int]:
        """(ids, n): `context` then `question` as one user turn (and `answer_prefix` as the start
        of the reply), and how many leading ids come before the question. A method compresses
        those n without seeing the question (the query-agnostic setting of kvpress); the question
        then attends over them compressed."""
        if not context.strip() or not question.strip():
            raise ValueError("prompt is empty: context and question must both hold text")
        if chat and self.tokenizer.has_chat_template:
            marker = "\x00question\x00"
            head, tail = self.tokenizer.apply_chat_template([{"role": "user", "content": context + marker}]).split(marker)
            first = self.tokenizer.encode(head, add_special_tokens=False)
            rest = self.tokenizer.encode(question + tail + answer_prefix, add_special_tokens=False)
            return first + rest, len(first)
        first = self.tokenizer.encode(context)
        return first + self.tokenizer.encode(question + answer_prefix, add_special_tokens=False), len(first)

    def _sequence(self, prompt, params: SamplingParams, chat: bool, method=None) -> Sequence:
        """method: the request's own (request_method), or None: the engine's."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        compress_len = None
        if isinstance(prompt, tuple):
            if len(prompt) != 2 or not (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
                raise ValueError("a prompt tuple must be (context, question): two strings or two token-id lists")
            if isinstance(prompt[0], str):
                ids, compress_len = self.encode_with_question(*prompt, chat)
            else:
                ids, compress_len = self.encode(prompt[0] + prompt[1]), len(prompt[0])
        else:
            ids = self.encode(prompt, chat)
        templated = isinstance(prompt[0] if isinstance(prompt, tuple) else prompt, str)  # text, not token ids
        limit = self.config.max_position_embeddings
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {limit}")
        seq = Sequence(ids, params, self.tokenizer.stop_token_ids, self.tokenizer.stream_decoder().push, limit)
        if compress_len is not None:
            seq.compress_len = compress_len
        seq.method = method = method if method is not None else self.method
        if method.compresses:  # a method's own scoring passes over the prompt (methods/base.py)
            seq.scoring_passes = method.scoring_passes(
                ids[:seq.compress_len], lambda text: self.tokenizer.encode(text, add_special_tokens=False),
                self.reply_prefix(chat and templated))
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        return seq

    def reply_prefix(self, chat: bool) -> str:
        """The text that opens the assistant's reply after a user turn: the chat template's tail
        (end of the user turn, the assistant header) for a prompt written through the template,
        else a newline (token ids are taken as they are)."""
        return self.tokenizer.user_turn()[1] if chat and self.tokenizer.has_chat_template else "\n"

    # --- generation -------------------------------------------------------------------

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = True, use_tqdm: bool | None = None, method=None) -> list[RequestOutput]:
        """Outputs in the order of `prompts`: strings, token-id lists, or (context, question)
        pairs whose context a method compresses before the question is read. `method`: the
        requests' own method instead of the engine's (see request_method), one for all or a list."""
        if isinstance(prompts, (str, tuple)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        if not prompts:
            raise ValueError("prompts is empty")
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        methods = method if isinstance(method, list) else [method] * len(prompts)
        if len(methods) != len(prompts):
            raise ValueError(f"got {len(methods)} methods for {len(prompts)} prompts")
        seqs = [self._sequence(p, sp, chat, self.request_method(m)) for p, sp, m in zip(prompts, params, methods)]
        bar = tqdm(total=len(seqs), desc="generating", unit="req",
                   disable=not (use_tqdm if use_tqdm is not None else len(seqs) > 1))
        for seq, _ in self._run(seqs):
            if seq.finished:
                bar.update(1)
        bar.close()
        return [seq.output() for seq in seqs]

    def stream(self, prompt, params: SamplingParams | None = None, chat: bool = True, method=None) -> "TextStream":
        """Generate for one prompt, yielding text pieces as they become final. The stream's
        `result` holds the RequestOutput once it is exhausted."""
        return TextStream(self, self._sequence(prompt, params or SamplingParams(), chat, self.request_method(method)))

    # --- the step loop, for a caller that runs it itself (nanokv/serve) ----------------

    def add_request(self, prompt, params: SamplingParams | None = None, chat: bool = True, method=None) -> Sequence:
        """Queue one request (see generate for `prompt` and `method`) -> its Sequence, which `step`
        advances; a ValueError, and nothing queued, when it is bad or could never fit."""
        seq = self._sequence(prompt, params or SamplingParams(), chat, self.request_method(method))
        self._queue([seq])
        return seq

    def _queue(self, seqs: list[Sequence]):
        self.scheduler.add(seqs)  # refuses them all if one could never fit
        for seq in seqs:
            seq.arrival_time = time.perf_counter()

    def has_unfinished(self) -> bool:
        return not self.scheduler.finished

    def abort(self, seq: Sequence):
        """Drop a request that is not finished (its caller went away): its blocks go back at once."""
        if not seq.finished:
            self.scheduler.abort(seq)
            self.runner.release(seq.id)

    def step(self) -> list[tuple[Sequence, str]]:
        """One engine step, a prefill or a decode -> (sequence, new text) for each sequence that took a
        token (a finished one has `finished` set and its blocks back in the pool). Adds to `tally`."""
        batch, is_prefill = self.scheduler.schedule()
        if not batch:  # everything running was preempted; the next step re-admits it
            return []
        tally, kind = self.tally, "prefill" if is_prefill else "decode"
        start = time.perf_counter()
        with torch.profiler.record_function(f"nanokv.{kind}_step"):  # a span in a profiler's trace
            tokens = self.runner.step(batch, is_prefill)
        now = time.perf_counter()
        tally[f"{kind}_tokens"] += sum(len(s) for s in batch) if is_prefill else len(batch)
        tally[f"{kind}_s"] += now - start
        tally[f"{kind}_steps"] += 1
        if is_prefill:  # prompt tokens the prefix cache served, and those the model ran
            hit = sum(s.prefix_cached for s in batch)
            tally["prefix_cache_hit_tokens"] += hit
            tally["prefill_tokens_computed"] += sum(len(s) for s in batch) - hit
        else:
            tally["decode_kv_bytes_read"] += int(self.runner.last_bytes_read)
            tally["decode_kv_bytes_moved"] += int(self.runner.last_bytes_moved)
        tally["peak_running"] = max(tally["peak_running"], len(self.scheduler.running))
        tally["peak_kv_bytes"] = max(tally["peak_kv_bytes"], self.cache.used_bytes)
        tally["peak_host_kv_bytes"] = max(tally["peak_host_kv_bytes"], self.cache.host_used_bytes)
        out = []
        for seq, token in zip(batch, tokens):
            if seq.first_token_time is None:
                seq.first_token_time = now
            piece = seq.append(token)
            if seq.finished:
                seq.finish_time = now
                self.scheduler.finish(seq)
                self.runner.release(seq.id)
                tally["finished_requests"] += 1
            out.append((seq, piece))
        return out

    def _run(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, str]]:
        """Run the engine until `seqs` are done, yielding (sequence, new text) after every token."""
        if self._busy:
            raise ValueError("this LLM is still running another generate() or stream(); finish it first")
        self._queue(seqs)
        self._busy = True
        replayed, eager = self.runner.graph_steps, self.runner.eager_steps
        flops_before = (self.runner.prefill_flops, self.runner.dense_prefill_flops)
        captured_s = self.runner.graphs.capture_s if self.runner.graphs else 0.0
        self.tally = stats = new_tally()
        try:
            while not self.scheduler.finished:
                yield from self.step()
        finally:  # a stream abandoned half-way must not leave its request in the engine
            self._busy = False
            for seq in seqs:
                self.abort(seq)
        stats["preemptions"] = sum(s.num_preemptions for s in seqs)
        # prompt tokens served from the prefix cache / prompt tokens prefilled (recomputes included)
        stats["prefix_cache_hit_rate"] = stats["prefix_cache_hit_tokens"] / max(1, stats["prefill_tokens"])
        if self.prefix_sharing is not None:
            stats["prefix_cache"] = {"sharing": self.prefix_sharing.kind, "why": self.prefix_sharing.reason}
        # decode steps replayed as CUDA graphs and run eagerly (with why, when none can be captured)
        runner = self.runner
        stats["decode_graphs"] = {"replayed_steps": runner.graph_steps - replayed, "eager_steps": runner.eager_steps - eager,
                                  "graphs": len(runner.graphs.steps) if runner.graphs else 0,
                                  "capture_s": (runner.graphs.capture_s if runner.graphs else 0.0) - captured_s,
                                  "eager_reason": self.eager_reason or (runner.graphs and runner.graphs.failure)}
        # what one decode token costs in KV reads (all layers): falls with a Quest budget
        stats["kv_bytes_read_per_decode_token"] = stats["decode_kv_bytes_read"] / max(1, stats["decode_tokens"])
        # what one decode token recalls from a host tier (an Offloader's: shadowkv, arkvale, ...)
        stats["kv_bytes_moved_per_decode_token"] = stats["decode_kv_bytes_moved"] / max(1, stats["decode_tokens"])
        # the prompt attention's FLOPs (scoring passes, chunks and filter passes included), and what a
        # dense prefill of the same tokens computes (full's): sparse and multi-pass prefills differ
        stats["prefill_attention_flops"], stats["prefill_attention_flops_dense"] = (
            int(now) - before for now, before in zip((runner.prefill_flops, runner.dense_prefill_flops), flops_before))
        self.stats = stats


def new_tally() -> dict:
    """What LLM.step adds up: tokens, seconds and steps of each kind, finished requests, prompt
    tokens the prefix cache served, and the peaks of running sequences and KV bytes."""
    return {"prefill_tokens": 0, "prefill_s": 0.0, "prefill_steps": 0, "decode_tokens": 0, "decode_s": 0.0,
            "decode_steps": 0, "finished_requests": 0, "peak_running": 0, "peak_kv_bytes": 0,
            "decode_kv_bytes_read": 0, "peak_host_kv_bytes": 0, "decode_kv_bytes_moved": 0,
            "prefix_cache_hit_tokens": 0, "prefill_tokens_computed": 0}


class TextStream:
    """An iterator of one request's text pieces; `.result` is its RequestOutput at the end."""

    def __init__(self, llm: LLM, seq: Sequence):
        self.result: RequestOutput | None = None
        self._llm, self._seq = llm, seq

    def __iter__(self):
        for seq, piece in self._llm._run([self._seq]):
            if piece:
                yield piece
        self.result = self._seq.output()
