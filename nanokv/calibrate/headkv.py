"""HeadKV's head profiles (see the package docstring): Retrieval Head scores from a teacher-forced
needle copy probe (profile copy, HeadKV-R), and retrieval-reasoning scores from a teacher-forced
"who is older" probe (profile reason, HeadKV-R2). Both probes share one haystack builder. The
retrieval_head calibration runs the same copy probe, scored as the Retrieval Head paper does
(retrieval_head_scores)."""

from __future__ import annotations

import math
import random

import torch

from nanokv.calibrate.dense import run_dense


def copy_hits(attention: torch.Tensor, token_ids: torch.Tensor, targets: torch.Tensor,
              needle: tuple[int, int]) -> torch.Tensor:
    """attention [Hq, m, S]: the attention (probabilities or logits) of the m queries that predict
    the answer tokens `targets` [m] over the S tokens `token_ids` [S]; needle: its [start, end) slots.
    -> [Hq]: per query head, the share of answer tokens whose query's argmax lands inside the
    needle on a token equal to the one predicted."""
    top = attention.argmax(dim=-1)                                          # [Hq, m]
    start, end = needle
    copied = (top >= start) & (top < end) & (token_ids.to(top.device)[top] == targets.to(top.device)[None, :])
    return copied.float().mean(dim=1)


def copy_scores(attention: torch.Tensor, token_ids: torch.Tensor, targets: torch.Tensor,
                needle: tuple[int, int], num_kv_heads: int) -> torch.Tensor:
    """copy_hits averaged over each kv-head's query heads -> [H]."""
    return copy_hits(attention, token_ids, targets, needle).view(num_kv_heads, -1).mean(dim=1)


def reason_hits(probs: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """probs [Hq, m, S]: the softmax attention of the m queries that predict the answer tokens;
    span: the answer sentence's [start, end) slots in the needle. -> [Hq]: per query head, the
    official R2 score (retrieval_head_detection_r2.py, retrieval_calculate): for each query, its
    k = span-length most attended slots, the probability of each one inside the span / k, summed
    over the queries."""
    start, end = span
    top = probs.topk(end - start, dim=-1)                                   # [Hq, m, k]
    inside = (top.indices >= start) & (top.indices < end)
    return (top.values * inside).sum(dim=(1, 2)) / (end - start)


def reason_scores(probs: torch.Tensor, span: tuple[int, int], num_kv_heads: int) -> torch.Tensor:
    """reason_hits averaged over each kv-head's query heads -> [H]."""
    return reason_hits(probs, span).view(num_kv_heads, -1).mean(dim=1)


def fold_query_heads(scores: torch.Tensor, num_kv_heads: int, fold: str) -> torch.Tensor:
    """[L, Hq] per query head -> [L, H] per kv-head: the mean over each kv-head's query heads
    (HeadKV: a budget shared by the group) or their max (retrieval_head: a kv-head whose cache
    any of its query heads retrieves from is a retrieval head)."""
    grouped = scores.view(scores.shape[0], num_kv_heads, -1)
    return grouped.amax(dim=-1) if fold == "max" else grouped.mean(dim=-1)


def haystack_prompt(tokenizer, rng: random.Random, length: int, depth: float, intro: str, pieces: list[str],
                    question: str, answer_prefix: str, probe: str):
    """A prompt of `length` tokens: `intro`, prose filler with the needle (`pieces`, in order) at
    `depth`, the question, the start of the reply (the user turn closed first for a chat model).
    The pieces are tokenized one by one, so their slots are known exactly -> (prompt ids, the
    slot each piece starts at, then the needle's end)."""
    from nanokv.haystack import prose_sentences

    if tokenizer.has_chat_template:
        head, tail = tokenizer.user_turn()
        first = tokenizer.encode(head + intro, add_special_tokens=False)
    else:
        tail = ""
        first = tokenizer.encode(intro)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    needle = [encode(piece) for piece in pieces]
    last = encode(question + tail + answer_prefix)
    fill = length - len(first) - sum(map(len, needle)) - len(last)
    if fill < 16:
        raise ValueError(f"--length {length} is too short for the {probe} probe: it needs at least "
                         f"{length - fill + 16} tokens with this tokenizer")
    sentences = prose_sentences(rng, max(8, fill // 8))
    filler = encode(" ".join(sentences))
    while len(filler) < fill:
        sentences += prose_sentences(rng, max(8, fill // 8))
        filler = encode(" ".join(sentences))
    split = round(depth * fill)
    prompt = first + filler[:split]
    starts = []
    for ids in needle:
        starts.append(len(prompt))
        prompt += ids
    return prompt + filler[split:fill] + last, starts + [len(prompt)]


def needle_probe(tokenizer, length: int, seed: int, index: int, span: str = "needle"):
    """One teacher-forced copy probe of about `length` prompt tokens ->
    (ids: prompt then answer, [start, end) slots, prompt length). The answer fed as the reply is
    the needle value's own tokens; the slots are the whole needle sentence's (span="needle",
    HeadKV's) or the value's alone (span="value": the official Retrieval Head probe's real_needle,
    the answer's own span)."""
    from nanokv.haystack import DEPTHS, key_word, value_of

    rng = random.Random(f"calibrate/probe/{seed}/{index}")
    kind = ("number", "word", "uuid")[index % 3]
    depth = DEPTHS[index % len(DEPTHS)]
    key, value = key_word(rng), value_of(kind, rng)
    intro = (f"Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
             f"I will quiz you about the {kind}s afterwards.\n")
    question = f"\n\nWhat is the special magic {kind} for {key} mentioned in the provided text?"
    answer_prefix = f"The special magic {kind} for {key} mentioned in the provided text is"
    pieces = [f" One of the special magic {kind}s for {key} is:", f" {value}", ". "]
    prompt, at = haystack_prompt(tokenizer, rng, length, depth, intro, pieces, question, answer_prefix, "copy")
    slots = (at[1], at[2]) if span == "value" else (at[0], at[3])
    return prompt + prompt[at[1]:at[2]], slots, len(prompt)


def reason_probe(tokenizer, length: int, seed: int, index: int):
    """One teacher-forced retrieval-reasoning probe (HeadKV-R2's, Important_Head/haystack_for_detect_r2):
    the needle gives two people's favorite things and their ages, the question asks for the older
    one's (even index) or the younger one's (odd), in the official template -> (ids: prompt then
    answer, the correct sentence's [start, end) slots, prompt length). As officially, the answer is
    that sentence itself, so its tokens are fed as the reply; names, pastimes, ages and the order
    of the sentences are drawn per probe, depths 0, 0.25, .., 1 in turn."""
    from nanokv.haystack import DEPTHS, PASTIMES, PEOPLE

    rng = random.Random(f"calibrate/reason/{seed}/{index}")
    which = ("older", "younger")[index % 2]
    depth = DEPTHS[index // 2 % len(DEPTHS)]
    people = rng.sample(PEOPLE, 2)                              # the order their sentences come in
    ages = dict(zip(people, rng.sample(range(8, 80), 2)))
    pick = (max if which == "older" else min)(people, key=ages.get)
    facts = [f" {name}'s favorite thing is {pastime}." for name, pastime in zip(people, rng.sample(PASTIMES, 2))]
    told = " " + " ".join(f"{name} is {ages[name]} years old." for name in rng.sample(people, 2))
    asked = " and ".join(rng.sample(people, 2))
    question = f"\n\nBased on the content of the text, Question: What is the favorite thing of the {which} one " \
               f"between {asked}?\n"
    prompt, at = haystack_prompt(tokenizer, rng, length, depth, "", facts + [told], question, "Answer:", "reason")
    i = people.index(pick)
    return prompt + prompt[at[i]:at[i + 1]], (at[i], at[i + 1]), len(prompt)


def headkv_scores(model, config, probes, profile: str = "copy", progress=None, fold: str = "mean") -> torch.Tensor:
    """[L, H] head scores over `probes`, each (ids, span, prompt length): profile copy, the
    Retrieval Head copy score of needle_probe's; reason, the R2 score of reason_probe's. Each query
    head's score is its mean over the probes, then `fold` ("mean" or "max") over a kv-head's."""
    scores = None                                                # [L, Hq], once the first layer shows Hq
    for ids, span, n in probes:
        device = model.inv_freq.device
        tokens = torch.tensor(ids, device=device)
        targets = tokens[n:]                                     # the answer tokens
        rows = torch.arange(n - 1, len(ids) - 1, device=device)  # the queries that predict them
        fed = ids[:-1]                                           # the last answer token predicts nothing here

        def record(layer, q, k, sliding_window):
            nonlocal scores
            Hq, D = q.shape[1:]
            if scores is None:
                scores = torch.zeros(config.num_layers, Hq, dtype=torch.float64)
            keys = k.float().repeat_interleave(Hq // k.shape[1], dim=1)            # [S, Hq, D]
            logits = torch.einsum("mhd,shd->hms", q[rows].float(), keys) / math.sqrt(D)
            slots = torch.arange(len(fed), device=device)
            allowed = slots[None, :] <= rows[:, None]
            if sliding_window is not None:
                allowed &= rows[:, None] - slots[None, :] < sliding_window
            logits = logits.masked_fill(~allowed[None], float("-inf"))
            if profile == "reason":   # attention mass, so probabilities
                part = reason_hits(logits.softmax(dim=-1), span)
            else:                     # an argmax: the logits do
                part = copy_hits(logits, tokens[:len(fed)], targets, span)
            scores[layer] += part.double().cpu() / len(probes)

        run_dense(model, fed, record)
        if progress:
            progress()
    if scores is None:
        return torch.zeros(config.num_layers, config.num_kv_heads, dtype=torch.float64)
    return fold_query_heads(scores, config.num_kv_heads, fold)


def retrieval_head_scores(model, config, probes, progress=None) -> torch.Tensor:
    """[L, H] Retrieval Head scores (Wu et al., arXiv 2404.15574; nightdessert/Retrieval_Head
    retrieval_head_detection.py, retrieval_calculate) over needle_probe(..., span="value")'s:
    per query head, the copies (argmax inside the answer's span on the token predicted) / the
    span's length, averaged over the probes; a kv-head scores its query heads' max."""
    return headkv_scores(model, config, probes, "copy", progress, fold="max")
