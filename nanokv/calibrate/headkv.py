"""HeadKV's head profile: Retrieval Head scores from a teacher-forced needle copy probe (see the
package docstring)."""

from __future__ import annotations

import math
import random

import torch

from nanokv.calibrate.dense import run_dense


def copy_scores(attention: torch.Tensor, token_ids: torch.Tensor, targets: torch.Tensor,
                needle: tuple[int, int], num_kv_heads: int) -> torch.Tensor:
    """attention [Hq, m, S]: the attention (probabilities or logits) of the m queries that predict
    the answer tokens `targets` [m] over the S tokens `token_ids` [S]; needle: its [start, end) slots.
    -> [H]: per kv-head, the share of answer tokens whose query's argmax lands inside the needle on
    a token equal to the one predicted, averaged over the kv-head's query heads."""
    top = attention.argmax(dim=-1)                                          # [Hq, m]
    start, end = needle
    copied = (top >= start) & (top < end) & (token_ids.to(top.device)[top] == targets.to(top.device)[None, :])
    return copied.float().mean(dim=1).view(num_kv_heads, -1).mean(dim=1)


def needle_probe(tokenizer, length: int, seed: int, index: int):
    """One teacher-forced copy probe of about `length` prompt tokens ->
    (ids: prompt then answer, needle [start, end) slots, prompt length). The pieces are tokenized
    one by one, so the needle's slots and its value's tokens are known exactly; the answer fed as
    the reply is the value's own tokens."""
    from nanokv.haystack import DEPTHS, key_word, prose_sentences, value_of

    rng = random.Random(f"calibrate/probe/{seed}/{index}")
    kind = ("number", "word", "uuid")[index % 3]
    depth = DEPTHS[index % len(DEPTHS)]
    key, value = key_word(rng), value_of(kind, rng)
    intro = (f"Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
             f"I will quiz you about the {kind}s afterwards.\n")
    question = f"\n\nWhat is the special magic {kind} for {key} mentioned in the provided text?"
    answer_prefix = f"The special magic {kind} for {key} mentioned in the provided text is"
    if tokenizer.has_chat_template:
        head, tail = tokenizer.user_turn()
        first = tokenizer.encode(head + intro, add_special_tokens=False)
    else:
        tail = ""
        first = tokenizer.encode(intro)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    needle_head, value_ids, needle_tail = encode(f" One of the special magic {kind}s for {key} is:"), \
        encode(f" {value}"), encode(". ")
    last = encode(question + tail + answer_prefix)
    fill = length - len(first) - len(needle_head) - len(value_ids) - len(needle_tail) - len(last)
    if fill < 16:
        raise ValueError(f"--length {length} is too short for the copy probe: it needs at least "
                         f"{length - fill + 16} tokens with this tokenizer")
    sentences = prose_sentences(rng, max(8, fill // 8))
    filler = encode(" ".join(sentences))
    while len(filler) < fill:
        sentences += prose_sentences(rng, max(8, fill // 8))
        filler = encode(" ".join(sentences))
    split = round(depth * fill)
    before = first + filler[:split]
    prompt = before + needle_head + value_ids + needle_tail + filler[split:fill] + last
    needle = (len(before), len(before) + len(needle_head) + len(value_ids) + len(needle_tail))
    return prompt + value_ids, needle, len(prompt)


def headkv_scores(model, config, probes, progress=None) -> torch.Tensor:
    """[L, H] retrieval (copy) scores over `probes`, each (ids, needle, prompt length) from needle_probe."""
    scores = torch.zeros(config.num_layers, config.num_kv_heads, dtype=torch.float64)
    for ids, needle, n in probes:
        device = model.inv_freq.device
        tokens = torch.tensor(ids, device=device)
        targets = tokens[n:]                                     # the answer tokens
        rows = torch.arange(n - 1, len(ids) - 1, device=device)  # the queries that predict them
        fed = ids[:-1]                                           # the last answer token predicts nothing here

        def record(layer, q, k, sliding_window):
            Hq, D = q.shape[1:]
            keys = k.float().repeat_interleave(Hq // k.shape[1], dim=1)            # [S, Hq, D]
            logits = torch.einsum("mhd,shd->hms", q[rows].float(), keys) / math.sqrt(D)
            slots = torch.arange(len(fed), device=device)
            allowed = slots[None, :] <= rows[:, None]
            if sliding_window is not None:
                allowed &= rows[:, None] - slots[None, :] < sliding_window
            logits = logits.masked_fill(~allowed[None], float("-inf"))
            copies = copy_scores(logits, tokens[:len(fed)], targets, needle, k.shape[1])
            scores[layer] += copies.double().cpu() / len(probes)

        run_dense(model, fed, record)
        if progress:
            progress()
    return scores
