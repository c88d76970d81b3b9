import pytest
import torch

from nanokv.engine.sequence import Sequence
from nanokv.sampling import SamplingParams, _filtered_probs, sample


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1),
                                          ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("seed", "1"),
                                          ("seed", 2**70), ("stop", None), ("stop", [3])])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (_filtered_probs(logits, top_k=2, top_p=1.0) > 0).tolist() == [True, True, False, False]
    # mass 0.5 < 0.7 after the first token, 0.8 >= 0.7 after the second: keep two
    assert (_filtered_probs(logits, top_k=0, top_p=0.7) > 0).tolist() == [True, True, False, False]
    assert (_filtered_probs(logits, top_k=0, top_p=0.5) > 0).tolist() == [True, False, False, False]
    kept = _filtered_probs(logits, top_k=0, top_p=0.9)
    assert torch.allclose(kept[:3] / kept[:3].sum(), torch.tensor([0.5, 0.3, 0.15]) / 0.95)


def test_tiny_temperature_is_nearly_greedy_not_a_crash():
    logits = torch.randn(2, 50)
    params = [SamplingParams(temperature=1e-40)] * 2
    assert torch.equal(sample(logits, params, [None, None]), logits.argmax(-1))


def test_seeded_sampling_repeats_and_greedy_is_argmax():
    logits = torch.randn(3, 100)
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits, [p] * 3, [torch.Generator().manual_seed(7)] * 3) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    greedy = sample(logits, [SamplingParams()] * 3, [None] * 3)
    assert torch.equal(greedy, logits.argmax(-1))


def make_seq(stop=(), max_tokens=50, stop_ids=(99,)):
    # a toy decoder: token i is the i-th letter, so text is easy to predict
    return Sequence([1, 2], SamplingParams(max_tokens=max_tokens, stop=list(stop)), set(stop_ids),
                    lambda t: "abcdefghijklmnopqrstuvwxyz"[t], max_length=100)


def test_stop_string_is_cut_and_never_streamed():
    seq = make_seq(stop=["cd"])
    pieces = [seq.append(t) for t in (0, 1, 2, 3, 4)[:4]]  # a b c d
    assert seq.finished and seq.finish_reason == "stop"
    assert "".join(pieces) == "ab" == seq.text
    assert pieces[2] == ""  # "c" could have been the start of "cd": held back


def test_held_back_text_is_released_when_the_stop_does_not_come():
    seq = make_seq(stop=["cd"])
    assert [seq.append(t) for t in (0, 2, 4)] == ["a", "", "ce"]


def test_eos_and_max_tokens_finish():
    seq = make_seq(max_tokens=3)
    for t in (0, 1, 2):
        seq.append(t)
    assert seq.finish_reason == "length" and seq.output_token_ids == [0, 1, 2]
    seq = make_seq()
    seq.append(0)
    seq.append(99)
    assert seq.finish_reason == "stop" and seq.output_token_ids == [0]
