"""KeepKV (nanokv/methods/keepkv.py) restated plainly and compared with the engine step by step.

test_methods_wave4_keepkv.py checks the ZIP merge, the output invariance and the score's moving
average each on its own. Here the whole policy runs over many decode steps twice: through the
engine (paged cache, slot fields, the log(c) attention bias in the kernels, swap-into-victim
eviction) and through PlainKeepKV, the module docstring's rules written as Python loops over a
list of tokens per (layer, kv-head): (position, key, value, votes c, score). After every decode
step each head must hold the same positions with the same merged keys, values, votes and scores,
and the greedy tokens must agree. The tiny model has 2 query heads per kv-head, so the group
rules (mean weights, key moved along the mean query) are exercised too.
"""

import math

import pytest
import torch

from helpers import restated_greedy
from nanokv.methods import make_method
from test_methods_decode_wave2 import serve


class PlainKeepKV:
    """KeepKV for one sequence as the model's attention callable (helpers.restated_greedy)."""

    def __init__(self, budget, sink_tokens, recent_ratio, similarity_threshold):
        self.budget, self.sinks, self.threshold = budget, sink_tokens, similarity_threshold
        self.recent = int(budget * recent_ratio)          # the newest tokens never evicted
        self.decay = 1 - 1 / max(self.recent, 1)          # the EMA's horizon is the recent window
        self.heads, self.history = {}, {}                 # layer -> [kv-head] -> [token dicts]
        self.merged = self.dropped = 0

    def __call__(self, layer, q, k, v, sliding_window):
        T, Hq, D = q.shape
        H = k.shape[1]
        g = Hq // H
        heads = self.heads.setdefault(layer, [[] for _ in range(H)])
        out = torch.empty_like(q)
        for h, tokens in enumerate(heads):
            tokens += [dict(pos=int(p), k=k[t, h].float(), v=v[t, h].float(), c=1.0, score=0.0)
                       for t, p in enumerate(self.positions)]
            qh = q[:, h * g:(h + 1) * g].float() / math.sqrt(D)                 # [T, g, D], scaled
            probs = self.attention(qh, tokens)                                  # [T, g, S]
            out[:, h * g:(h + 1) * g] = probs @ torch.stack([t["v"] for t in tokens])
            if T > 1:
                self.prefill(tokens, probs, qh[-1])
            else:
                self.decode(tokens, probs[0], qh[0])
        if T == 1:
            self.history.setdefault(layer, []).append([sorted(map(dict, tokens), key=lambda t: t["pos"])
                                                       for tokens in heads])
        return out

    def attention(self, q, tokens):
        """A slot of c votes weighs as c copies: its logit plus log c; causal by position."""
        logits = torch.einsum("tgd,sd->tgs", q, torch.stack([t["k"] for t in tokens]))
        logits = logits + torch.tensor([math.log(t["c"]) for t in tokens])
        future = torch.tensor([t["pos"] for t in tokens])[None, :] > self.positions[:, None]  # [T, S]
        return logits.masked_fill(future[:, None], float("-inf")).softmax(-1)

    @staticmethod
    def similarity(a, b):
        """Cosine similarity on a grid of 2^-12 (the docstring's tie rule)."""
        return round(float(a["k"] @ b["k"] / (a["k"].norm() * b["k"].norm())) * 4096) / 4096

    def target(self, token, candidates):
        """The candidate most like `token`, the oldest among equals, or None below the threshold."""
        best = max(candidates, key=lambda t: (self.similarity(token, t), -t["pos"]))
        return best if self.similarity(token, best) >= self.threshold else None

    @staticmethod
    def zip_merge(q, members):
        """ZIP: members (the kept token first) become one token that draws, for the group's queries
        q [g, D], the attention and output they drew together (exact for g = 1)."""
        logits = torch.stack([q @ t["k"] + math.log(t["c"]) for t in members], dim=1)  # [g, n]
        w = logits.softmax(-1).mean(0)                                   # the group's mean weights
        c = sum(t["c"] for t in members)
        key = sum(wi * t["k"] for wi, t in zip(w, members))
        # the logit per vote the merged token needs so that c exp(q.k) = sum exp(l_i), mean over g
        need = float((logits.logsumexp(-1) - math.log(c)).mean())
        q_mean = q.mean(0)
        key = key + (need - q_mean @ key) / (q_mean @ q_mean) * q_mean   # moved along the mean query
        into = members[0]
        into.update(k=key, v=sum(wi * t["v"] for wi, t in zip(w, members)), c=c,
                    score=sum(t["c"] * t["score"] for t in members) / c)

    def prefill(self, tokens, probs, q_last):
        n = len(tokens)
        window = min(n, max(1, self.recent))
        # the EMA over the last `window` queries, started at 0: query i of W weighs (1 - d) d^(W-1-i)
        for s, t in enumerate(tokens):
            t["score"] = sum((1 - self.decay) * self.decay ** (window - 1 - i)
                             * float(probs[n - window + i, :, s].mean()) for i in range(window))
        if n <= self.budget:
            return
        protected = [t["pos"] < self.sinks or s >= n - self.recent for s, t in enumerate(tokens)]
        rest = sorted((s for s in range(n) if not protected[s]), key=lambda s: -tokens[s]["score"])
        kept = set(s for s in range(n) if protected[s]) | set(rest[:self.budget - sum(protected)])
        # every dropped token goes at once into its most similar kept one, the last prompt query as q
        into = {s: [] for s in kept}
        for s in sorted(set(range(n)) - kept):
            target = self.target(tokens[s], [tokens[j] for j in kept])
            if target is None:
                self.dropped += 1
            else:
                into[next(j for j in kept if tokens[j] is target)].append(tokens[s])
                self.merged += 1
        for s, members in into.items():
            if members:
                self.zip_merge(q_last, [tokens[s]] + members)
        tokens[:] = [tokens[s] for s in sorted(kept)]

    def decode(self, tokens, p, q):
        now = int(self.positions[-1])
        for s, t in enumerate(tokens):  # the EMA of this query group's attention per vote
            t["score"] = self.decay * t["score"] + (1 - self.decay) * float(p[:, s].mean()) / t["c"]
        if len(tokens) <= self.budget:
            return
        eligible = [t for t in tokens if self.sinks <= t["pos"] <= now - self.recent]
        victim = min(eligible, key=lambda t: (t["score"], t["pos"]))
        tokens.remove(victim)
        target = self.target(victim, tokens)
        if target is None:
            self.dropped += 1
        else:
            self.zip_merge(q, [target, victim])
            self.merged += 1


def engine_snapshots(tiny, method, prompt, steps):
    """The engine's greedy tokens, and after each decode step what every (layer, kv-head) holds:
    [step][layer][head] -> (positions, keys, values, votes, scores) sorted by position."""
    snapshots = []

    def capture(seq, position, cache):
        s, pool = cache.seqs[seq.id], cache.pool
        layers = []
        for layer in range(s.lengths.shape[0]):
            heads = []
            for head in range(s.lengths.shape[1]):
                held = torch.arange(int(s.lengths[layer, head]))
                slots = pool.slot_index(cache.flat_slots(s.tables[layer, head], held))
                field = {name: x[slots] for name, x in pool.fields.items()}
                order = field["pos"].long().argsort()
                heads.append((field["pos"][order].tolist(), field["k"][order], field["v"][order],
                              field["keepkv_log_votes"][order].exp(), field["keepkv_score"][order]))
            layers.append(heads)
        snapshots.append(layers)

    [tokens], _, _, _ = serve(tiny, method, [prompt], 400, steps, on_decode=capture)
    return tokens, snapshots


@pytest.mark.parametrize("prompt_len, options", [
    (30, dict(budget=12, sink_tokens=2, recent_ratio=0.5, similarity_threshold=0.5)),   # merges and drops
    (30, dict(budget=14, sink_tokens=3, recent_ratio=0.3, similarity_threshold=-1.0)),  # every victim merges
    (8, dict(budget=12, sink_tokens=2, recent_ratio=0.5, similarity_threshold=0.5)),    # no prefill eviction
])
def test_keepkv_decode_matches_a_plain_restatement_step_by_step(tiny, prompt_len, options):
    model, _ = tiny
    steps, prompt = 40, [(j * 37 + 11) % 256 for j in range(prompt_len)]
    tokens, snapshots = engine_snapshots(tiny, make_method("keepkv", **options), prompt, steps)
    plain = PlainKeepKV(**options)
    assert tokens == restated_greedy(model, plain, prompt, steps)
    # the run must exercise what it restates: many merges, some tokens standing for several
    assert plain.merged > 15 and (plain.dropped > 0) == (options["similarity_threshold"] > -1)
    assert len(snapshots) == steps - 1
    for step, layers in enumerate(snapshots):
        for layer, heads in enumerate(layers):
            for head, (pos, k, v, votes, scores) in enumerate(heads):
                where = f"step {step}, layer {layer}, head {head}"
                expected = plain.history[layer][step][head]
                assert pos == [t["pos"] for t in expected], where
                assert len(pos) == min(options["budget"], prompt_len + step + 1), where
                for name, got in (("k", k), ("v", v)):
                    torch.testing.assert_close(got, torch.stack([t[name] for t in expected]), rtol=1e-4, atol=1e-4,
                                               msg=lambda m: f"{name} at {where}: {m}")
                torch.testing.assert_close(votes, torch.tensor([t["c"] for t in expected]), msg=where)
                torch.testing.assert_close(scores, torch.tensor([t["score"] for t in expected]), rtol=1e-4,
                                           atol=1e-6, msg=where)
    assert max(t["c"] for layer in plain.heads.values() for tokens in layer for t in tokens) >= 3
