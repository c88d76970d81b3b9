"""Shared test helpers: run nanokv's model over its own cache, and transformers' greedy loop."""

import math

import torch

from nanokv.cache import PagedKVCache
from nanokv.engine.attention import StepAttention
from nanokv.kernels.reference import attention_by_position


def held_positions(cache, seq_id: int) -> list[list[list[int]]]:
    """[layer][kv-head] -> the sorted positions of the tokens that head of the sequence holds."""
    s = cache.seqs[seq_id]
    return [[sorted(cache.pool.pos.view(-1)[cache.flat_slots(s.tables[layer, head],
                                                              torch.arange(int(s.lengths[layer, head])))].tolist())
             for head in range(s.lengths.shape[1])] for layer in range(s.lengths.shape[0])]


def generate_holding(llm, prompt, steps: int):
    """One prompt's greedy tokens through the engine (EOS ignored), and the positions each (layer,
    head) holds when it finishes, flattened layer by layer -> (token ids, [L * H] sorted lists)."""
    from nanokv import SamplingParams

    held, finish = [], llm.scheduler.finish

    def capture(seq):
        held.extend(h for layer in held_positions(llm.cache, seq.id) for h in layer)
        finish(seq)

    llm.scheduler.finish = capture
    try:
        [out] = llm.generate([prompt], SamplingParams(max_tokens=steps, ignore_eos=True))
    finally:
        del llm.scheduler.finish
    return out.token_ids, held


def assert_preemption_repeats(make_llm, prompts, params, blocks: int, roomy=None):
    """The same requests through a roomy engine and through one whose pool holds `blocks` of its
    blocks (make_llm(**kwargs) builds either; `roomy`: one already built): the tight one must
    preempt, and recompute to the same tokens. -> (the tight engine, its outputs)."""
    roomy = roomy or make_llm()
    tight = make_llm(kv_cache_memory=blocks * roomy.cache.pool.bytes_per_block)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    got = tight.generate(prompts, params)
    assert tight.stats["preemptions"] > 0
    assert [o.token_ids for o in got] == expected
    return tight, got


def single_sequence_cache(cfg, dtype=torch.float32, block_size=16):
    cache = PagedKVCache.from_memory(cfg, 32 << 20, block_size, dtype)
    cache.add(0)
    return cache


def nanokv_forward(model, cache, ids):
    """One forward pass of sequence 0 over the paged cache, new tokens after those cached."""
    start = int(cache.seqs[0].lengths[0, 0])
    positions = torch.arange(start, start + len(ids))
    attention = StepAttention(cache, [0], [len(ids)], positions)
    return model.compute_logits(model(torch.as_tensor(ids), positions, attention))


class DenseLayers:
    """A method stated plainly, as the model's attention callable (restated_greedy): every layer
    keeps all its keys; the prompt attends densely; a decode step calls `decode(layer, q, keys,
    values)`, which picks what each kv-head attends over (`attend`) or attends densely (`dense`)."""

    def __init__(self):
        self.layers = {}

    def __call__(self, layer, q, k, v, sliding_window):
        keys, values = self.layers.get(layer, (k[:0], v[:0]))
        keys, values = torch.cat([keys, k]), torch.cat([values, v])
        self.layers[layer] = (keys, values)
        if len(q) > 1:
            return self.dense(q, keys, values)
        return self.decode(layer, q, keys, values)

    def dense(self, q, keys, values):
        return attention_by_position(q, keys, values, self.positions, torch.arange(len(keys)))

    def attend(self, q, keys, values, chosen):
        """q [1, Hq, D] over each kv-head's `chosen` positions (a list of index tensors)."""
        group = q.shape[1] // keys.shape[1]
        return torch.cat([attention_by_position(q[:, h * group:(h + 1) * group], keys[index, h:h + 1],
                                                values[index, h:h + 1], self.positions, index)
                          for h, index in enumerate(chosen)], dim=1)


class DenseOffloaded(DenseLayers):
    """An Offloader (methods/base.py) stated plainly: a decode step holding n tokens (its own
    included) reads each kv-head's device part, the newest 1 + window + (n - 1 - window) % block of
    them (the window and the part block behind it: whole blocks move to the host), and the `k` older
    ones that `rank(q [group, D], keys [n, D]) -> [n]` scores highest (subclasses may override `older`
    to pick otherwise). `prompt_len` is not needed (kept for callers that pass it)."""

    def __init__(self, prompt_len, window, k, rank=None, block=16):
        super().__init__()
        self.prompt_len, self.window, self.k, self.rank, self.block = prompt_len, window, k, rank, block

    def older(self, layer, h, q, keys):
        """Which of the older tokens keys [n, D] kv-head h reads (q [group, D]) -> indices."""
        return self.rank(q, keys).topk(min(self.k, len(keys))).indices

    def decode(self, layer, q, keys, values):
        n, H = keys.shape[:2]
        before = n - 1  # what the device held after the previous step
        hot = 1 + (before if before < self.window else self.window + (before - self.window) % self.block)
        group = q.shape[1] // H
        chosen = [torch.cat([self.older(layer, h, q[0, h * group:(h + 1) * group].float(), keys[:n - hot, h].float()),
                             torch.arange(n - hot, n)]).sort().values for h in range(H)]
        return self.attend(q, keys, values, chosen)


@torch.inference_mode()
def restated_greedy(model, attention, prompt, steps):
    """Greedy tokens of `model` over `attention`, a plain restatement of a method called as the
    model's attention callable (it reads the step's positions from `attention.positions`)."""
    tokens, ids = [], prompt
    for _ in range(steps):
        start = len(prompt) + len(tokens) - len(ids)
        attention.positions = torch.arange(start, start + len(ids))
        hidden = model(torch.tensor(ids), attention.positions, attention)
        tokens.append(int(model.compute_logits(hidden[-1:])[0].argmax()))
        ids = tokens[-1:]
    return tokens


@torch.no_grad()
def nanokv_logits(model, cfg, ids, dtype=torch.float32):
    return nanokv_forward(model, single_sequence_cache(cfg, dtype), ids)


@torch.no_grad()
def nanokv_greedy(model, cfg, ids, steps, dtype=torch.float32):
    cache = single_sequence_cache(cfg, dtype)
    logits = nanokv_forward(model, cache, ids)[-1]
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = nanokv_forward(model, cache, [out[-1]])[-1]
    return out


@torch.no_grad()
def hf_greedy(hf, ids, steps):
    """transformers' own incremental decode (its KV cache), returning the tokens and the
    logits each token was chosen from."""
    out = hf(torch.as_tensor(ids, device=hf.device)[None], use_cache=True)
    tokens, chosen_from = [], []
    for _ in range(steps):
        logits = out.logits[0, -1].float()
        tokens.append(int(logits.argmax()))
        chosen_from.append(logits)
        out = hf(torch.tensor([[tokens[-1]]], device=hf.device), use_cache=True, **_hf_cache_kwarg(hf, out))
    return tokens, chosen_from


def assert_same_greedy(ours, theirs, their_logits, tie=1e-4):
    """Identical greedy tokens, except that a first divergence is allowed where transformers'
    own top-2 logits differ by less than `tie` (a near tie that float rounding may flip)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            top2 = their_logits[i].topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < tie, f"greedy tokens diverge at step {i} ({a} vs {b}) where the top-2 gap is {gap:.2e}"
            return i
    assert len(ours) == len(theirs)
    return None


def _hf_cache_kwarg(hf, out):
    """transformers 5.2x renamed `past_key_values` to `cache`; accept either."""
    import inspect

    if "cache" in inspect.signature(hf.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def paged_layout(gen, heads, num_blocks, block_size, d, garbage, dtype=torch.float32, spare_columns=0):
    """Scatter per-(sequence, kv-head) keys into randomly permuted blocks of a fresh pool.

    heads: [B][Hkv] of (k [S, D], v [S, D], pos [S]). Returns the pool tensors, tables
    [B, Hkv, nb + spare_columns] (-1 past each head's blocks) and lengths [B, Hkv]. Slots nobody
    wrote hold zero, or with `garbage` large finite values that must not leak into an output
    (the pool guarantees finite values there: it zeroes blocks as it hands them out); their
    position is 0, visible to every query unless the length masks it."""
    fill = 1e4 if garbage else 0.0
    k_pool = torch.full((num_blocks, block_size, d), fill, dtype=dtype)
    v_pool = torch.full((num_blocks, block_size, d), fill, dtype=dtype)
    pos_pool = torch.zeros(num_blocks, block_size, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    nb = max(math.ceil(len(p) / block_size) for row in heads for _, _, p in row) + spare_columns
    tables = torch.full((len(heads), len(heads[0]), nb), -1, dtype=torch.int64)
    lengths = torch.zeros(len(heads), len(heads[0]), dtype=torch.int64)
    for b, row in enumerate(heads):
        for h, (k, v, pos) in enumerate(row):
            lengths[b, h] = len(pos)
            for j in range(math.ceil(len(pos) / block_size)):
                block = order.pop()
                tables[b, h, j] = block
                part = slice(j * block_size, (j + 1) * block_size)
                n = len(pos[part])
                k_pool[block, :n], v_pool[block, :n], pos_pool[block, :n] = k[part], v[part], pos[part]
    assert order, "leave some blocks unused"
    return k_pool, v_pool, pos_pool, tables, lengths


def byte_tokenizer_json() -> str:
    """A byte-level tokenizer.json of 256 tokens (one per byte, no merges): what a tiny random
    model saved for LLM needs beside its weights."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = BackendTokenizer(models.BPE(vocab={b: i for i, b in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend.to_str()


def keep_released_states(llm) -> list:
    """Each sequence's reader state as it leaves the engine (LLM.step releases it when the sequence
    finishes), in the order they leave: a test reads it after generate() returns."""
    kept, release = [], llm.runner.release
    llm.runner.release = lambda seq_id: kept.append(llm.runner.read_states.get(seq_id)) or release(seq_id)
    return kept
