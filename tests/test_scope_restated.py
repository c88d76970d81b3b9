"""SCOPE's decode restated plainly, over many steps: which generated tokens each (layer, kv-head)
keeps, and the greedy tokens that follow from it.

The restatement follows the rules in nanokv/methods/scope.py's docstring (SCOPE, arXiv
2412.13649, and its official kv_utils.py), written as loops over positions: the prompt positions
prefill kept stay for good; after the current query attends over what the head holds (its own
token included), the generated tokens are cut to the strategy's limit, the newest
`decoding_recent_size` positions never evicted and the others ranked by this query's attention
(softmax over the held keys, averaged over the kv-head's query heads; ties: the oldest goes).
With t = position - prompt length:
- slide: the limit is decoding_window_size;
- adaptive: decoding_recent_size + t // delta;
- discontinuous: the adaptive limit, applied only when t % (delta + 1) == 0 (else nothing goes).
Prefill's choice of prompt positions is snapkv's (tested elsewhere): it is taken from the engine.
"""

import math

import pytest
import torch

from helpers import DenseLayers, held_positions, restated_greedy
from nanokv.methods import make_method
from test_methods_decode_wave2 import serve

R, DELTA = 2, 3
OPTIONS = dict(budget=8, window_size=2, kernel_size=3, decoding_window_size=5, decoding_recent_size=R, delta=DELTA)
# one prompt cut to the budget (8 of 21), one shorter than it (kept whole)
PROMPTS = [[(j * 29 + 7) % 256 for j in range(21)], [(j * 53 + 3) % 256 for j in range(5)]]
STEPS = 36


class PlainScope(DenseLayers):
    """SCOPE as the model's attention: each (layer, kv-head) holds `prompt_kept[layer][head]` and
    the generated positions the strategy leaves; `held[position]` records what each holds after
    the decode step at `position`, [layer][head] sorted."""

    def __init__(self, kind, prompt_len, prompt_kept):
        super().__init__()
        self.kind, self.prompt_len, self.prompt_kept = kind, prompt_len, prompt_kept
        self.generated = {}   # (layer, head) -> generated positions held
        self.held = {}

    def limit(self, t):
        """How many generated tokens may stay after step t (None: no cut this step)."""
        if self.kind == "slide":
            return OPTIONS["decoding_window_size"]
        if self.kind == "discontinuous" and t % (DELTA + 1) != 0:
            return None
        return R + t // DELTA

    def decode(self, layer, q, keys, values):
        now = int(self.positions[-1])
        H, group, D = keys.shape[1], q.shape[1] // keys.shape[1], keys.shape[2]
        chosen, rows = [], []
        for h in range(H):
            generated = self.generated.setdefault((layer, h), []) + [now]   # the new token joins first
            index = torch.tensor(sorted(self.prompt_kept[layer][h]) + generated)
            chosen.append(index)
            # this query's attention over what the head holds: softmax per query head, then the group's mean
            logits = q[0, h * group:(h + 1) * group].float() @ keys[index, h].float().T / math.sqrt(D)
            attention = dict(zip(index.tolist(), logits.softmax(-1).mean(0).tolist()))
            limit = self.limit(now - self.prompt_len)
            while limit is not None and len(generated) > limit:
                candidates = [p for p in generated if p <= now - R]        # the newest R always stay
                generated.remove(min(candidates, key=lambda p: (attention[p], p)))
            self.generated[(layer, h)] = generated
            rows.append(sorted(self.prompt_kept[layer][h] + generated))
        self.held.setdefault(now, []).append(rows)
        return self.attend(q, keys, values, chosen)   # the query attends before its step evicts


@pytest.mark.parametrize("kind", ["slide", "adaptive", "discontinuous"])
def test_scope_decode_keeps_the_generated_tokens_a_plain_restatement_keeps(tiny, kind):
    """Two prompts batched through the engine (scheduler, paged cache, swap-into-victim eviction)
    for 36 tokens: after every decode step each (layer, head) holds exactly the positions the
    restatement holds, and the greedy tokens agree. The settings make every strategy evict
    many times (discontinuous cuts 8 times, several tokens at once)."""
    model, _ = tiny
    seen = {}

    def record(seq, position, cache):
        seen.setdefault(tuple(seq.prompt_token_ids), {})[position] = held_positions(cache, seq.id)

    method = make_method("scope", decoding_metric=kind, **OPTIONS)
    outputs, _, preemptions, _ = serve(tiny, method, PROMPTS, 400, STEPS, on_decode=record)
    assert preemptions == 0
    for prompt, tokens in zip(PROMPTS, outputs):
        engine = seen[tuple(prompt)]
        P = len(prompt)
        # prefill's choice (snapkv's), taken as given: the prompt positions held after the first step
        prompt_kept = [[[p for p in head if p < P] for head in layer] for layer in engine[P]]
        assert all(len(head) == min(P, OPTIONS["budget"]) for layer in prompt_kept for head in layer)
        plain = PlainScope(kind, P, prompt_kept)
        restated = restated_greedy(model, plain, prompt, STEPS)
        assert sorted(plain.held) == sorted(engine) == list(range(P, P + STEPS - 1))
        for position in engine:   # the first step where they part says which choice went wrong
            assert engine[position] == plain.held[position], (P, position)
        assert restated == tokens, P
        # the attention ranking mattered: some head kept an older generated token over a newer one
        generated = [(pos, [p for p in head if p >= P]) for pos in engine for layer in engine[pos] for head in layer]
        assert any(g != list(range(pos - len(g) + 1, pos + 1)) for pos, g in generated)
