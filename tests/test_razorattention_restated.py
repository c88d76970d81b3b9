"""RazorAttention (arXiv 2407.15891) restated plainly from its rules, not from
nanokv/methods/razorattention.py, and compared with the method:

- which prompt positions each (layer, kv-head) keeps, over random head profiles, prompt lengths,
  compression / budget, sink_size, s0 and compensation: the top ceil(echo_ratio x heads) by echo
  score and the top ceil(induction_ratio x heads) by induction score keep everything; every other
  head keeps its N0 sinks and the newest L_h = max(S0, N / C), plus, with the compensation token,
  the newest dropped slot;
- the greedy tokens of the tiny model in the engine against a dense restatement in which each
  non-retrieval head attends over its sinks, its recent tokens, the generated ones and one
  compensation token: the mean key and the mean value of its dropped tokens, its logit raised by
  log d for the d tokens it stands for (so it weighs as d of them in the softmax)."""

import math
import random
from fractions import Fraction

import pytest
import torch

from helpers import DenseLayers, restated_greedy
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView
from test_methods_decode_wave2 import serve


def protected_heads(induction, echo, induction_ratio, echo_ratio):
    """{(layer, head)}: the top ceil(ratio x all heads) by each score, the two sets united.
    The ratio is read as the decimal it is written as (0.14 x 100 heads is 14, not 15)."""
    heads = [(layer, h) for layer in range(len(induction)) for h in range(len(induction[0]))]
    chosen = set()
    for scores, ratio in ((induction, induction_ratio), (echo, echo_ratio)):
        count = math.ceil(Fraction(str(ratio)) * len(heads))
        chosen |= set(sorted(heads, key=lambda lh: -scores[lh[0]][lh[1]])[:count])
    return chosen


def recent_size(n, compression=None, budget=None, s0=0):
    """L_h = max(S0, N / C): N / C is `budget`, or ceil((1 - r) N) for compression=r."""
    return max(s0, budget if budget is not None else math.ceil((1 - Fraction(str(compression))) * n))


def dropped_range(n, sink, recent):
    """The prompt positions a non-retrieval head folds away (or would drop): past the sinks, before the recent."""
    return range(sink, max(sink, n - recent))


# --- which positions each head keeps ------------------------------------------------------------------

def test_razor_keep_mask_restated_as_a_plain_loop():
    rng = random.Random(0)
    for case in range(300):
        # 5 x 10 heads: 0.14 x 50 is 7.000000000000001 in floats, 7 heads as written
        L, H = rng.choice([(1, 1), (1, 3), (2, 2), (2, 4), (3, 3), (3, 4), (5, 10)])
        induction = [[rng.random() for _ in range(H)] for _ in range(L)]
        echo = [[rng.random() for _ in range(H)] for _ in range(L)]
        # ratios whose products with L x H are mostly fractional: ceil and floor differ
        ratios = dict(induction_ratio=rng.choice([0.0, 0.1, 0.14, 0.25, 0.3, 0.5]),
                      echo_ratio=rng.choice([0.0, 0.01, 0.1, 0.2, 0.34]))
        knob = ({"budget": rng.randint(1, 20)} if rng.random() < 0.5
                else {"compression": rng.choice([0.1, 0.25, 0.5, 0.7, 0.9])})
        sink, s0, n = rng.choice([0, 1, 4]), rng.choice([0, 0, 5, 16]), rng.randint(1, 60)
        compensation = rng.random() < 0.5
        options = dict(sink_size=sink, s0=s0, compensation=compensation, **ratios, **knob)
        method = make_method("razorattention", **options)
        method.bind_calibration({"head_scores": induction, "echo_scores": echo})

        protected = protected_heads(induction, echo, ratios["induction_ratio"], ratios["echo_ratio"])
        recent = recent_size(n, knob.get("compression"), knob.get("budget"), s0)
        dropped = dropped_range(n, sink, recent)
        if compensation and dropped:   # the newest dropped slot stays, as the compensation token
            dropped = dropped[:-1]
        others = [p for p in range(n) if p not in dropped]
        for layer in range(L):
            want = [list(range(n)) if (layer, h) in protected else others for h in range(H)]
            view = PrefillView(layer, L, torch.zeros(n, 2 * H, 4), torch.randn(H, n, 4), torch.arange(n),
                               values=torch.randn(H, n, 4))
            mask = method.keep_mask(view)
            got = [list(range(n))] * H if mask is None else [row.nonzero().flatten().tolist() for row in mask]
            assert got == want, f"case {case}: {options}, n={n}, layer {layer}"
            # what the scheduler plans with: the layer's mean over its heads, rounded up
            assert method.kept_after_prefill(n, layer, L) == math.ceil(sum(map(len, want)) / H), f"case {case}"


# --- the compensation token, end to end ----------------------------------------------------------------

class PlainRazor(DenseLayers):
    """The method stated densely: the prompt attends to itself whole; at decode a protected head reads
    every token, another reads its sinks, its recent tokens, the generated ones and the compensation
    token (mean key, mean value of the dropped ones, logit + log d: it weighs as the d tokens)."""

    def __init__(self, prompt_len, protected, sink, recent, weight=math.log):
        super().__init__()
        self.prompt_len, self.protected, self.sink, self.recent = prompt_len, protected, sink, recent
        self.weight = weight   # the compensation token's logit bias for d tokens

    def decode(self, layer, q, keys, values):
        H, D = keys.shape[1], q.shape[-1]
        group = q.shape[1] // H
        out = []
        for h in range(H):
            k, v = keys[:, h].float(), values[:, h].float()
            dropped = ([] if (layer, h) in self.protected
                       else list(dropped_range(self.prompt_len, self.sink, self.recent)))
            seen = [i for i in range(len(k)) if i not in dropped]
            ks, vs, bias = k[seen], v[seen], [0.0] * len(seen)
            if dropped:   # where it sits does not matter: every decode query comes after the prompt
                ks = torch.cat([ks, k[dropped].mean(0, keepdim=True)])
                vs = torch.cat([vs, v[dropped].mean(0, keepdim=True)])
                bias.append(self.weight(len(dropped)))
            for j in range(group):   # query heads h * group .. share kv-head h
                logits = ks @ q[0, h * group + j].float() / math.sqrt(D) + torch.tensor(bias)
                out.append(logits.softmax(-1) @ vs)
        return torch.stack(out)[None].to(q.dtype)


PROMPTS = [[(i * 53 + j * 29 + j * j) % 256 for j in range(n)] for i, n in enumerate((40, 23, 31, 12, 48))]


@pytest.mark.parametrize("seed, options", [
    (1, dict(budget=3, sink_size=2)),
    (2, dict(compression=0.75, sink_size=4)),
    (3, dict(budget=2, sink_size=1, s0=6)),
    (4, dict(compression=0.5, sink_size=0, induction_ratio=0.5, echo_ratio=0.0)),
])
def test_razor_compensation_token_restated_end_to_end(tiny, seed, options):
    g = torch.Generator().manual_seed(seed)
    induction, echo = torch.rand(2, 2, generator=g).tolist(), torch.rand(2, 2, generator=g).tolist()
    options = {"induction_ratio": 0.25, "echo_ratio": 0.25, **options}
    method = make_method("razorattention", compensation=True, **options)
    method.bind_calibration({"head_scores": induction, "echo_scores": echo})
    protected = protected_heads(induction, echo, options["induction_ratio"], options["echo_ratio"])
    assert len(protected) < 4   # some head compresses

    def plain(prompt, weight=math.log):
        recent = recent_size(len(prompt), options.get("compression"), options.get("budget"), options.get("s0", 0))
        return restated_greedy(tiny[0], PlainRazor(len(prompt), protected, options["sink_size"], recent, weight),
                               prompt, steps)

    steps = 8
    engine = serve(tiny, method, PROMPTS, 800, steps)[0]
    for prompt, got in zip(PROMPTS, engine):
        assert got == plain(prompt), f"prompt of {len(prompt)}"
    # the case exercises the weight: counting the compensation token as one token changes some prompt's tokens
    assert [plain(p, weight=lambda d: 0.0) for p in PROMPTS] != engine
