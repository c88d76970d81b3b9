"""RazorAttention's data-free head profile (see the package docstring): the model reads random
tokens repeated a few times, and each head is scored by where its queries in the repeats look.
An echo head attends to the previous occurrence of the current token; an induction head to the
token right after it (the one to predict). Tang et al., arXiv 2407.15891, Section 3.2 / Figure 3(b)."""

from __future__ import annotations

import math
import random

import torch

from nanokv.calibrate.dense import run_dense
from nanokv.calibrate.headkv import fold_query_heads

REPEATS = 4  # copies of the random segment (nanokv's choice: the paper's count was not checked)


def repeated_random_tokens(tokenizer, vocab_size: int, length: int, seed: int, index: int):
    """One probe of about `length` tokens: what the tokenizer opens a text with (its BOS, if any),
    then a segment of random ordinary token ids repeated REPEATS times -> (ids, the slot the first
    copy starts at, the segment's length R). The segment's ids are distinct, so a token's previous
    occurrence is exactly R slots back."""
    rng = random.Random(f"calibrate/razor/{seed}/{index}")
    first = tokenizer.encode("")
    special = set(tokenizer.backend.get_added_tokens_decoder())
    period = (length - len(first)) // REPEATS
    ordinary = [i for i in range(vocab_size) if i not in special]
    if period < 2 or len(ordinary) < period:
        raise ValueError(f"--length {length} must leave at least 2 tokens per copy and at most the "
                         f"{len(ordinary)} ordinary token ids per copy ({REPEATS} copies)")
    segment = rng.sample(ordinary, period)
    return first + segment * REPEATS, len(first), period


def echo_induction_hits(probs: torch.Tensor, rows: torch.Tensor, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [Hq, m, S]: the softmax attention of the queries at slots `rows` [m] (each in a repeat
    after the first). -> ([Hq], [Hq]): per query head, the mean attention on the previous occurrence
    of the query's token (slot row - R: echo) and on the token after it (row - R + 1: induction)."""
    echo = probs.gather(-1, (rows - period)[None, :, None].expand(len(probs), -1, 1))[..., 0]
    induction = probs.gather(-1, (rows - period + 1)[None, :, None].expand(len(probs), -1, 1))[..., 0]
    return echo.mean(dim=1), induction.mean(dim=1)


def razor_scores(model, config, probes, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """([L, H] echo scores, [L, H] induction scores) over `probes`, each repeated_random_tokens' (ids,
    start, R): per query head the mean over the probes of echo_induction_hits, then a kv-head's max
    over its query heads (it serves any query head that echoes or induces)."""
    echo = induction = None                                          # [L, Hq] once a layer shows Hq
    for ids, start, period in probes:
        device = model.inv_freq.device
        rows = torch.arange(start + period, len(ids), device=device)  # every query in copies 2..

        def record(layer, q, k, sliding_window):
            nonlocal echo, induction
            Hq, D = q.shape[1:]
            if echo is None:
                echo = torch.zeros(config.num_layers, Hq, dtype=torch.float64)
                induction = torch.zeros_like(echo)
            keys = k.float().repeat_interleave(Hq // k.shape[1], dim=1)            # [S, Hq, D]
            logits = torch.einsum("mhd,shd->hms", q[rows].float(), keys) / math.sqrt(D)
            slots = torch.arange(len(ids), device=device)
            allowed = slots[None, :] <= rows[:, None]
            if sliding_window is not None:
                allowed &= rows[:, None] - slots[None, :] < sliding_window
            e, i = echo_induction_hits(logits.masked_fill(~allowed[None], float("-inf")).softmax(dim=-1),
                                       rows, period)
            echo[layer] += e.double().cpu() / len(probes)
            induction[layer] += i.double().cpu() / len(probes)

        run_dense(model, ids, record)
        if progress:
            progress()
    return fold_query_heads(echo, config.num_kv_heads, "max"), fold_query_heads(induction, config.num_kv_heads, "max")
