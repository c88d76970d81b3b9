"""How much of the true attention each query-aware reader's picks catch, against an oracle's.

For retrieval samples of the eval harness (question after the context), at every decode step of
every layer a reader picks in (from its skip_layers on), this computes the full attention over
the whole cache (the plain-torch twin) and the share of each query head's attention mass that
lands in what the reader picked, next to what an oracle picks at the same budget:

- oracle pages: the budget / block_size pages per kv-head that really receive the most attention
  (the most any page selection of that size could catch; what scripts/quest_diagnosis.py reads),
- oracle tokens: the budget single slots per kv-head that receive the most.

It prints, per method and budget, the mean share (1.0 = nothing lost), the worst head-step, the
share of what the method read against the whole cache (its picks' tokens), and the eval score.
`oracle` as a method makes the engine read the oracle's pages (Quest's path, oracle picks).

    python scripts/reader_diagnosis.py --methods quest,tidaldecode,loki --budgets 64,128,256,512
    python scripts/reader_diagnosis.py --model qwen2.5-coder-0.5b --methods oracle,quest --budgets 256
"""

import argparse
import time
from collections import defaultdict

import torch

from nanokv import LLM, SamplingParams
from nanokv.engine import attention as step_attention
from nanokv.eval.grid import encode
from nanokv.eval.tasks import make_sample, score
from nanokv.kernels.reference import paged_attention, quest_pages

record = defaultdict(list)  # "method", "oracle pages", "oracle tokens", "read": per head-step
oracle_mode = [False]


def true_attention(attention, q, tables, lengths):
    """[b, H, group, S] the full attention of each query head over the held slots (float32)."""
    pool = attention.cache.pool
    far = torch.full((q.shape[0], 1), 1 << 30, device=q.device)
    _, probs = paged_attention(q[:, None], far, pool.k, pool.v, pool.pos, tables, lengths, return_probs=True)
    return probs[:, :, :, 0]


def measure(attention, probs, read, lengths):
    """Record the attention mass `read` [b, H, S] catches, and the two oracles' at its budget."""
    bs = attention.cache.block_size
    budget = attention.selector.budget
    b, H, group, S = probs.shape
    record["method"] += (probs * read[:, :, None]).sum(-1).flatten().tolist()
    page_mass = probs.reshape(b, H, group, -1, bs).sum(-1)                      # [b, H, group, nb]
    pages = page_mass.amax(dim=2).topk(min(max(1, budget // bs), page_mass.shape[-1]), dim=-1).indices
    record["oracle pages"] += page_mass.gather(-1, pages[:, :, None].expand(-1, -1, group, -1)).sum(-1).flatten().tolist()
    tokens = probs.amax(dim=2).topk(min(budget, S), dim=-1).indices
    record["oracle tokens"] += probs.gather(-1, tokens[:, :, None].expand(-1, -1, group, -1)).sum(-1).flatten().tolist()
    record["read"] += (read.sum(-1).float() / lengths.clamp(min=1)).flatten().tolist()


def patch_engine():
    read_picks, selected_pages = step_attention.StepAttention._read_picks, step_attention.StepAttention._selected_pages

    def measured_picks(self, layer, g, members, q, tables, lengths, sliding_window):
        reader, seen = self.selector, {}
        pick = reader.pick

        def kept(step):
            seen["picks"] = picks = pick(step)
            return picks

        reader.pick = kept
        try:
            out = read_picks(self, layer, g, members, q, tables, lengths, sliding_window)
        finally:
            reader.pick = pick
        picks, bs = seen["picks"], self.cache.block_size
        S = tables.shape[-1] * bs
        read = torch.zeros(*lengths.shape, S + 1, dtype=torch.bool, device=q.device)
        if picks.slots is not None:
            read.scatter_(-1, torch.where(picks.slots < 0, S, picks.slots), True)
        else:
            slots = picks.pages[..., None] * bs + torch.arange(bs, device=q.device)
            read.scatter_(-1, torch.where(picks.pages[..., None] < 0, S, slots).flatten(-2), True)
        held = torch.arange(S, device=q.device) < lengths[..., None]
        measure(self, true_attention(self, q, tables, lengths), read[..., :S] & held, lengths)
        return out

    def measured_pages(self, q, tables, lengths):
        bs = self.cache.block_size
        probs = true_attention(self, q, tables, lengths)
        b, H, group, S = probs.shape
        if oracle_mode[0]:
            page_mass = probs.reshape(b, H, group, -1, bs).sum(-1).amax(dim=2)
            reduced = quest_pages(page_mass, tables, lengths, bs, self.selector.pages_to_read(bs))
        else:
            reduced = selected_pages(self, q, tables, lengths)
        picked = (tables[..., :, None] == reduced[0][..., None, :]).any(-1) & (tables >= 0)   # [b, H, nb]
        held = torch.arange(S, device=q.device) < lengths[..., None]
        measure(self, probs, picked.repeat_interleave(bs, dim=-1) & held, lengths)
        return reduced

    step_attention.StepAttention._read_picks = measured_picks
    step_attention.StepAttention._selected_pages = measured_pages


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="quest", help="comma-separated readers (quest, tidaldecode, ...; oracle)")
    p.add_argument("--budgets", default="256", help="comma-separated token budgets")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--tasks", default="niah_number,niah_word,niah_multikey")
    p.add_argument("--samples", type=int, default=3)
    args = p.parse_args()
    patch_engine()
    rows = []
    for budget in map(int, args.budgets.split(",")):  # a budget over every method first: a cut run still compares
        for method in args.methods.split(","):
            oracle_mode[0] = method == "oracle"
            record.clear()
            start = time.perf_counter()
            llm = LLM(args.model, method="quest" if method == "oracle" else method, budget=budget)
            prompts, samples = [], []
            for task in args.tasks.split(","):
                for i in range(args.samples):
                    sample = make_sample(task, args.length, lambda s: len(encode(llm, s)[0]), 0, i)
                    ids, n = encode(llm, sample)
                    prompts.append((ids[:n], ids[n:]))
                    samples.append(sample)
            outs = llm.generate(prompts, [SamplingParams(max_tokens=s.max_tokens) for s in samples], use_tqdm=False)
            scores = [score(o.text, s.answers, s.metric) for o, s in zip(outs, samples)]
            mean = {name: sum(v) / len(v) for name, v in record.items()}
            rows.append((method, budget, mean["method"], min(record["method"]), mean["oracle pages"],
                         mean["oracle tokens"], mean["read"], 100 * sum(scores) / len(scores)))
            print(f"{method} {budget}: {rows[-1][2:]} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\n{args.model}, {args.length} tokens, {len(scores)} samples: attention mass caught per head-step (mean, "
          f"worst), the oracles' at the same budget, the share of the cache read, and the score")
    print(f"{'method':>20} {'budget':>6} {'caught':>7} {'worst':>6} {'oracle pages':>12} {'oracle tokens':>13} "
          f"{'read':>6} {'score':>6}")
    for method, budget, caught, worst, pages, tokens, read, sc in rows:
        print(f"{method:>20} {budget:>6} {caught:7.3f} {worst:6.3f} {pages:12.3f} {tokens:13.3f} {read:6.3f} {sc:6.1f}")


if __name__ == "__main__":
    main()
