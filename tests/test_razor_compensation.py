"""RazorAttention's compensation token (compensation=true, the default): the dropped tokens of each non-retrieval
head folded into one slot, mean key and value, weighing as many as it stands for through the
cache's per-slot logit bias; worked by hand, then in the engine (preemption, every kernel's decode
path, the whole-batch one included) and refused with a quantizer."""

import math

import pytest
import torch

from test_methods_decode_wave2 import TINY_PROMPTS, serve
from nanokv.methods import make_method
from nanokv.methods.base import PrefillView

PROFILE = {"head_scores": [[0.9, 0.1], [0.2, 0.3]], "echo_scores": [[0.0, 0.1], [0.2, 0.8]]}
RETRIEVAL = [[True, False], [False, True]]  # induction 25% protects (0, 0), echo 25% (1, 1)


def razor(**options):
    method = make_method("razorattention", sink_size=2, induction_ratio=0.25, echo_ratio=0.25, compensation=True,
                         **options)
    method.bind_calibration(PROFILE)
    return method


def test_the_compensation_token_by_hand():
    # layer 1: head 0 is not a retrieval head, head 1 is. 10 tokens, budget 3, 2 sinks: head 0 keeps
    # 0, 1 and the newest 3 (7, 8, 9) plus one slot, the newest dropped token's, 6, which becomes
    # the compensation of 2..6: their mean key and value, log count log 5. Head 1 keeps all.
    gen = torch.Generator().manual_seed(0)
    S, D = 10, 4
    keys, values = torch.randn(2, S, D, generator=gen), torch.randn(2, S, D, generator=gen)
    view = PrefillView(1, 2, torch.randn(S, 4, D, generator=gen), keys, torch.arange(S), values=values)
    method = razor(budget=3)
    keep = method.keep_mask(view)
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 6, 7, 8, 9] and keep[1].all()
    merged = method.merge(view, keep)
    torch.testing.assert_close(merged["k"][0, 6], keys[0, 2:7].mean(0))
    torch.testing.assert_close(merged["v"][0, 6], values[0, 2:7].mean(0))
    assert merged["razor_log_count"][0].tolist() == pytest.approx([0] * 6 + [math.log(5)] + [0] * 3)
    assert torch.equal(merged["k"][1], keys[1]) and (merged["razor_log_count"][1] == 0).all()
    # a query that sees every token alike (q = 0: equal logits) reads the same from 6 slots as from 10
    kept = keep[0]
    weights = merged["razor_log_count"][0, kept].softmax(-1)
    torch.testing.assert_close(weights @ merged["v"][0, kept], values[0].mean(0))
    # what the scheduler plans with: one slot more in a head that drops tokens
    assert method.kept_after_prefill(10, 1, 2) == math.ceil((10 + 6) / 2)
    assert razor(budget=3).others_keep(5) == 5 and razor(budget=3).others_keep(6) == 6


def test_the_compensation_token_in_the_engine_through_preemption(tiny):
    """Prompts of 2 to 20 tokens: each non-retrieval head holds min(n, 6) prompt slots (2 sinks, 3
    recent and the compensation token) plus the generated tokens; preempted and recomputed
    sequences give the same tokens; every block comes back."""
    steps, method = 12, razor(budget=3)
    counts = []
    roomy, held, preemptions, _ = serve(tiny, method, TINY_PROMPTS, 400, steps, on_decode=lambda s, p, c: counts.append(
        float(c.pool.fields["razor_log_count"].max())))
    assert preemptions == 0 and max(counts) > 0
    tight, _, tight_preemptions, cache = serve(tiny, method, TINY_PROMPTS, 36, steps)
    assert tight_preemptions > 0 and tight == roomy
    for prompt, (lengths, _) in zip(TINY_PROMPTS, held):
        n = len(prompt)
        want = [[n if full else (n if n <= 5 else 6) for full in row] for row in RETRIEVAL]
        assert (lengths - (steps - 1)).tolist() == want
    assert cache.pool.num_free == cache.pool.usable_blocks
    # without the token the outputs differ (the bias is read)
    plain = make_method("razorattention", budget=3, sink_size=2, induction_ratio=0.25, echo_ratio=0.25,
                        compensation=False)
    plain.bind_calibration(PROFILE)
    assert serve(tiny, plain, TINY_PROMPTS, 400, steps)[0] != roomy


@pytest.mark.parametrize("kernels", ["cpu", "triton"])
def test_the_compensation_token_is_read_by_every_decode(tiny, kernels):
    # the C++ and Triton decodes take the whole batch in one call (attend_decode)
    method, prompts = razor(budget=3), TINY_PROMPTS[:4]
    assert serve(tiny, method, prompts, 400, 6, kernels=kernels)[0] == serve(tiny, method, prompts, 400, 6)[0]


def test_the_compensation_token_cannot_go_into_quantized_blocks():
    with pytest.raises(ValueError, match=r"razorattention with these options weighs slots by a logit bias"):
        make_method("razorattention+kivi", budget=8)   # the paper's token is on by default
    assert make_method("razorattention+kivi", budget=8, compensation=False).attention_bias is None
