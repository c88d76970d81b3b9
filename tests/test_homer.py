"""HOMER (nanokv/methods/homer.py, engine/merging_prefill.py) against a restatement written the way
alinlab/HOMER's code runs: each chunk a list of its own K/V per layer, processed apart, pruned, its
lower layers pruned alike, merged pairwise by the recursion of its `_merge`, then decoded over
the final K/V at the positions after the suffix."""

import pytest
import torch

from nanokv import LLM, SamplingParams
from nanokv.kernels.reference import causal_attention
from nanokv.methods import make_method
from nanokv.models.rope import rope_cos_sin

ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory=8_000_000)
PROMPT = [(7 * i + 3) % 250 + 1 for i in range(400)]


@pytest.fixture(scope="module")
def deep_gqa_dir(tmp_path_factory):
    """A random 4-layer Llama, 4 query heads over 2 kv-heads: room for three levels of merging."""
    import transformers as T

    from conftest import saved_tiny

    return saved_tiny(tmp_path_factory, "tiny-llama-deep-gqa", T.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=1024))


class Chunk:
    """One node of the tree: its hidden states, positions, kinds (0 prefix, 1 context, 2 suffix) and
    K/V of every layer it has run."""

    def __init__(self, x, pos, kind):
        self.x, self.pos, self.kind, self.kv = x, pos, kind, {}
        self.probs = None  # the last row's attention probabilities at the last layer run

    def run(self, model, layers):
        for layer in layers:
            cos, sin = rope_cos_sin(self.pos, model.inv_freq, self.x.dtype)

            def attention(l, q, k, v, window, chunk=self):
                chunk.kv[l] = (k, v)
                group = q.shape[1] // k.shape[1]
                logits = torch.einsum("hd,shd->hs", q[-1], k.repeat_interleave(group, dim=1)) / q.shape[-1] ** 0.5
                chunk.probs = logits.softmax(-1)
                return causal_attention(q, k, v)

            self.x = model.layers[layer](self.x, cos, sin, attention)

    def keep(self, rows):
        self.x, self.pos, self.kind = self.x[rows], self.pos[rows], self.kind[rows]
        self.kv = {l: (k[rows], v[rows]) for l, (k, v) in self.kv.items()}  # every layer run so far

    @staticmethod
    def merge(left, right):
        """alinlab/HOMER's Chunk.merge: prefix and suffix averaged, contexts concatenated."""
        def parts(c, t):
            return t[c.kind == 0], t[c.kind == 1], t[c.kind == 2]

        def fold(a, b):
            (ap, ac, as_), (bp, bc, bs) = parts(left, a), parts(right, b)
            return torch.cat([(ap + bp) / 2, ac, bc, (as_ + bs) / 2])

        merged = Chunk(fold(left.x, right.x), torch.cat([parts(left, left.pos)[0], parts(left, left.pos)[1],
                                                         parts(right, right.pos)[1], parts(right, right.pos)[2]]),
                       torch.cat([parts(left, left.kind)[0], parts(left, left.kind)[1],
                                  parts(right, right.kind)[1], parts(right, right.kind)[2]]))
        merged.kv = {l: (fold(left.kv[l][0], right.kv[l][0]), fold(left.kv[l][1], right.kv[l][1])) for l in left.kv}
        return merged


def restated_homer(model, method, prompt, steps):
    """Greedy tokens of HOMER's prefill and decode, restated (see the module docstring)."""
    L = len(model.layers)
    tree = method.tree(len(prompt), L)
    ids = torch.tensor(prompt)
    p, s = tree.prefix, tree.suffix
    leaves = []
    for i, (start, end) in enumerate(tree.pieces):
        rows = torch.cat([ids[:p], ids[start:end], ids[len(prompt) - s:]])
        kind = torch.tensor([0] * p + [1] * (end - start) + [2] * s)
        leaves.append(Chunk(model.embed_tokens(rows), torch.tensor(tree.positions(i)), kind))
    starts = [0] + [end + 1 for end in tree.level_ends[:-1]]

    def process(chunk, height, target):
        chunk.run(model, range(starts[height], tree.level_ends[height] + 1))
        keep = method.prune(method.significance(chunk.probs), chunk.kind == 1, target)
        chunk.keep(keep.nonzero().flatten())
        return chunk

    def merge(level, node, target):  # the recursion of alinlab/HOMER's _merge, targets from the plan
        if level == 0:
            return process(leaves[node], 0, target)
        left = merge(level - 1, 2 * node, tree.targets[level - 1][2 * node])
        right = merge(level - 1, 2 * node + 1, tree.targets[level - 1][2 * node + 1])
        return process(Chunk.merge(left, right), level, target)

    root = merge(len(tree.level_ends) - 1, 0, tree.targets[-1][0])
    kv = root.kv
    tokens, position = [], int(root.pos[-1]) + 1
    logits = model.compute_logits(model.norm(root.x[-1:]))
    for _ in range(steps):
        token = int(logits[-1].argmax())
        tokens.append(token)
        x = model.embed_tokens(torch.tensor([token]))
        cos, sin = rope_cos_sin(torch.tensor([position]), model.inv_freq, x.dtype)
        for layer in range(L):
            def attention(l, q, k, v, window):
                kv[l] = (torch.cat([kv[l][0], k]), torch.cat([kv[l][1], v]))
                group = q.shape[1] // k.shape[1]
                keys, values = (t.repeat_interleave(group, dim=1) for t in kv[l])
                w = (torch.einsum("qhd,shd->hqs", q, keys) / q.shape[-1] ** 0.5).softmax(-1)
                return torch.einsum("hqs,shd->qhd", w, values)
            x = model.layers[layer](x, cos, sin, attention)
        logits = model.compute_logits(model.norm(x))
        position += 1
    return tokens


@torch.inference_mode()
@pytest.mark.parametrize("options", [dict(budget=64, suffix=8), dict(budget=96, suffix=16, prefix=2, layers_warmup=1)])
def test_homer_generates_what_a_restatement_of_the_official_recursion_generates(deep_gqa_dir, options):
    llm = LLM(str(deep_gqa_dir), **ENGINE, method="homer", **options)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True), chat=False)[0]
    tree = llm.method.tree(len(PROMPT), 4)
    assert len(tree.pieces) >= 4 and len(tree.level_ends) >= 3  # chunks merged over several levels
    assert out.token_ids == restated_homer(llm.model, llm.method, PROMPT, 10)
    # what is held: the final length in every layer and head (the prefix and suffix once), and the
    # generated tokens after it; real blocks, fewer than full's
    held = options["budget"] + 10 - 1
    assert out.metrics["kv_cache_bytes_theory"] == held * 4 * 2 * (2 * 32 * 4 + 4)
    full = LLM(str(deep_gqa_dir), **ENGINE).generate([PROMPT], SamplingParams(max_tokens=10, ignore_eos=True),
                                                     chat=False)[0]
    assert out.metrics["kv_cache_bytes"] < full.metrics["kv_cache_bytes"] / 3


def test_one_chunk_is_full_prefill(deep_gqa_dir):
    """A budget over the prompt: one chunk, nothing pruned or merged, the prompt at its own positions."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    full = LLM(str(deep_gqa_dir), **ENGINE).generate([PROMPT[:200]], params, chat=False)[0].token_ids
    llm = LLM(str(deep_gqa_dir), **ENGINE, method="homer", budget=500)
    assert llm.generate([PROMPT[:200]], params, chat=False)[0].token_ids == full


def test_a_question_after_the_context_follows_the_suffix(deep_gqa_dir):
    """(context, question): the context merged, the question prefilled over it at the positions after the
    suffix's, as alinlab/HOMER continues at last_position_id + 1."""
    llm = LLM(str(deep_gqa_dir), **ENGINE, method="homer", budget=64, suffix=8)
    context, question = PROMPT[:380], PROMPT[380:400]
    out = llm.generate([(context, question)], SamplingParams(max_tokens=6, ignore_eos=True), chat=False)[0]
    tree = llm.method.tree(len(context), 4)
    next_position = tree.prefix + tree.chunk_len + tree.suffix
    [seq_shift] = {len(context) - next_position}
    assert seq_shift > 0 and len(out.token_ids) == 6
    assert out.metrics["kv_cache_tokens"] == 400 + 6 - 1


def test_the_plan_follows_the_official_schedule_and_targets():
    """alinlab/HOMER for Llama-2-7B (32 layers, 12 warm-up): 8 chunks of a 4,000-token context in
    chunks of 1,024 with a prefix of 4 and a suffix of 32: height 3, (32 - 12) // 4 = 5 layers a level,
    none left over; a child keeps 4 + (1024 - 36) // 2 + 32 = 530 tokens, the root the budget."""
    method = make_method("homer", budget=1024, prefix=4, suffix=32, layers_warmup=12)
    n = 4 + 4000 + 32
    tree = method.tree(n, 32)
    assert len(tree.pieces) == 8 and tree.chunk_len == 500
    assert tree.level_ends == [16, 21, 26, 31]
    assert tree.targets[0] == [530] * 8 and tree.targets[2] == [530, 530] and tree.targets[3] == [1024]
    assert tree.positions(1)[:6] == [0, 1, 2, 3, 4, 5] and tree.positions(1)[-1] == 4 + 500 + 31


def test_a_short_right_child_keeps_its_length_and_its_sibling_the_rest():
    """alinlab/HOMER's _merge: a right child shorter than half a chunk keeps its length; its left
    sibling takes max_chunk_len - (that - prefix - suffix). A 190-token context in chunks of 100 with
    a prefix of 2 and a suffix of 4: 4 chunks of 48, 48, 48 and 46; half a chunk is 2 + 94 // 2 + 4 =
    53; the last leaf is 2 + 46 + 4 = 52 long, so it keeps 52 and its sibling 100 - (52 - 6) = 54."""
    method = make_method("homer", budget=100, prefix=2, suffix=4, layers_warmup=0)
    tree = method.tree(2 + 190 + 4, 8)
    assert [end - start for start, end in tree.pieces] == [48, 48, 48, 46]
    assert tree.targets == [[53, 53, 54, 52], [53, 53], [100]]
