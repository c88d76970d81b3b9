"""Real weights (SmolLM2-135M-Instruct Q4_1 and Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUFs):
nanokv against transformers loading the same file, float32."""

import pytest
import torch
import transformers as T

from helpers import assert_same_greedy, hf_greedy, nanokv_logits
from nanokv.engine.llm import LLM
from nanokv.sampling import SamplingParams

pytestmark = pytest.mark.slow

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined a screw press with movable metal type. Within decades, presses spread across Europe, "
    "books became cheaper, and literacy rose. Scholars argue about how much the press changed science, "
    "religion and politics, but few doubt that it changed how ideas travelled. In this essay we look at "
    "three consequences: the standardisation of texts, the rise of a reading public, and the speed at "
    "which new discoveries could be checked by others. First, consider the standardisation of texts. "
    "Before print, every copy of a book was made by hand, and every copy differed a little from the rest."
)


@pytest.fixture(scope="module", params=["smollm2_gguf", "qwen_gguf"])
def engines(request):
    path = request.getfixturevalue(request.param)
    llm = LLM(str(path), dtype="float32")
    hf = T.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) >= 128
    return llm, hf, ids[:128]


def test_logits_and_top1_match_transformers(engines):
    llm, hf, ids = engines
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = nanokv_logits(llm.model, llm.config, ids)
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_continuation_matches_transformers(engines):
    llm, hf, ids = engines
    theirs, their_logits = hf_greedy(hf, ids, 32)
    [out] = llm.generate([ids], SamplingParams(max_tokens=32, ignore_eos=True))
    assert len(out.token_ids) == 32
    assert_same_greedy(out.token_ids, theirs, their_logits)
