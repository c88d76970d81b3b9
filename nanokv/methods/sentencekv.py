"""sentencekv: tokens in host memory, one mean key per sentence on the device; recall the sentences the query resembles.

Paper: SentenceKV: Efficient LLM Inference via Sentence-Level Semantic KV Caching (Zhu, Falahati,
Yang, Amiri, 2025), arXiv 2504.00970; code zzbright1998/SentenceKV @ e603dfc
(models/sentencekv/custom_llama_sentencekv.py, LongBench/run_longbench.py).
Tokens that belong to one sentence tend to matter together. At prefill SentenceKV cuts the text
into sentences at punctuation, keeps one semantic vector per sentence and head on the GPU (the mean
of the sentence's keys) and moves the tokens' KV to the CPU. At each decode step it ranks the
sentences by q . vector, loads the tokens of the most similar ones, and attends over them, the
first tokens (sinks) and the recent window.
Here, per kv-head: the newest `device_window` tokens stay on the device (read whole); every older
token lives in the host tier with its sentence id as a summary field (int32); the sentence vectors
(sums of keys, float32 [H, sentences, D] per layer, and counts) live in the sequence's state on
the device. A sentence grows until its terminator, across offload calls (a prompt's, then a block
at a time at decode), its vector the mean of the keys moved so far. A step ranks each head's
sentences by q . mean key (the highest over the kv-head's query heads) and recalls, after the
first `sink_tokens` host tokens, the tokens of the best sentences, each sentence oldest first,
until budget - device_window tokens are picked (the last sentence may be cut, as the official
code cuts it).
Defaults (official code @ e603dfc): sentence ends '.', '!', '?', '...', '\\n\\n', '\\n\\n\\n', '。',
'！', '？', '。。' (run_longbench.py's punctuations, by decoded text, trailing spaces ignored);
similarity: dot product of the query with the mean key (_batch_similarity_computation);
sink_tokens 32 (start_budget), device_window 32 (recent_budget); budget 1024 (max_capacity_prompts,
run_longbench.py's default; the paper runs 128 to 2048); every layer (skip_layers 0).
The device keeps per sequence and layer H x sentences x D float32 numbers (and a count per
sentence): a pick reads them all and counts their bytes, with the host slots' int32 sentence ids,
in scored_bytes. They are not in the cache's device bytes (peak_kv_bytes).

What differs:
- No SnapKV pass before it: the official code first keeps semantic_factor (3) x budget prompt
  tokens by a SnapKV score (window 32, max-pool 7) and groups only those; here every token is kept
  (in host memory), which is what an offloading tier is for.
- The query: the official code ranks by the mean query of the sentence being generated and,
  while that sentence is at most length_threshold (1) tokens long, attends over the whole
  (compressed) cache; here each step ranks by its own query and always reads the budget.
- No cap on a sentence's length (the official stores at most max(100, 2 x mean length) tokens
  of each sentence); the budget cuts a long sentence instead.
- Picks per kv-head (the best of its query heads), not per query head; the newest tokens are the
  device window and the block filling behind it (up to block_size more than device_window).
- No cache of recalled tokens on the device: a step recalls what it reads.
"""

import torch

from nanokv.methods.base import Offloader, Picks

TERMINATORS = frozenset({".", "!", "?", "...", "\n\n", "\n\n\n", "。", "！", "？", "。。"})


def ends_sentence(text: str) -> bool:
    """The official punctuation list, by text: a token that reads as one of TERMINATORS, spaces after it ignored."""
    return text.rstrip(" ") in TERMINATORS


class SentenceKV(Offloader):
    name = "sentencekv"
    description = "sentences in host memory, a mean key per sentence on the device; recall the most similar sentences"
    paper = "https://arxiv.org/abs/2504.00970"
    default_budget = 1024
    needs_vocabulary = True
    options = {
        "skip_layers": (int, 0, "an integer >= 0 (the first layers, kept whole on the device)", lambda v: v >= 0),
        "device_window": (int, 32, "an integer >= 0 (the newest tokens of each head kept on the device)",
                          lambda v: v >= 0),
        "sink_tokens": (int, 32, "an integer >= 0 (the first tokens, recalled at every step)", lambda v: v >= 0),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ends = None  # [vocab] bool: the ids that end a sentence (bind_vocabulary)

    def check_budget(self):
        if self.budget <= self.device_window + self.sink_tokens:
            raise ValueError(f"budget={self.budget} must exceed device_window + sink_tokens = "
                             f"{self.device_window + self.sink_tokens} for sentencekv (the rest is read by sentences)")

    def bind_vocabulary(self, texts: list[str]):
        self.ends = torch.tensor([ends_sentence(t) for t in texts], dtype=torch.bool, device="cpu")

    def summary_fields(self, head_dim):
        return {"sentence": (torch.int32, ())}

    def summarize(self, view):
        if view.token_ids is None or self.ends is None:
            raise ValueError("sentencekv needs the moved tokens' ids and the vocabulary (the engine gives both)")
        H, n, D = view.keys.shape
        device = view.keys.device
        ids = view.token_ids.to(self.ends.device)
        known = ids < len(self.ends)
        ends = torch.zeros(n, dtype=torch.long, device=ids.device)
        ends[known] = self.ends[ids[known]].long()
        book = view.state.setdefault("sentencekv", {}).get(view.layer)
        if book is None:
            book = {"sums": torch.zeros(H, 0, D, dtype=torch.float32, device=device),
                    "counts": torch.zeros(0, dtype=torch.float32, device=device), "open": False}
        have = book["counts"].shape[0]
        # an unfinished sentence goes on with the first moved token; each terminator closes one
        sentence = (have - 1 if book["open"] else have) + ends.cumsum(0) - ends
        total = int(sentence[-1]) + 1
        sums = torch.nn.functional.pad(book["sums"], [0, 0, 0, total - have])
        counts = torch.nn.functional.pad(book["counts"], [0, total - have])
        at = sentence.to(device)
        sums.index_add_(1, at, view.keys.float())
        counts.index_add_(0, at, torch.ones(n, dtype=torch.float32, device=device))
        view.state["sentencekv"][view.layer] = {"sums": sums, "counts": counts, "open": not bool(ends[-1])}
        return {"sentence": at.to(torch.int32)[None].expand(H, n)}

    def pick(self, step) -> Picks:
        b, H = step.lengths.shape
        D, device, S = step.queries.shape[-1], step.queries.device, step.slots
        books = [state.get("sentencekv", {}).get(step.layer) for state in step.states]
        sizes = [0 if book is None else book["counts"].shape[0] for book in books]
        N = max(1, *sizes)
        vectors = torch.zeros(b, H, N, D, dtype=torch.float32, device=device)
        for i, book in enumerate(books):
            if book is not None:
                vectors[i, :, :sizes[i]] = book["sums"] / book["counts"].clamp(min=1)[:, None]
        q = step.queries.float().view(b, H, -1, D)
        similarity = torch.einsum("bhgd,bhnd->bhgn", q, vectors).amax(dim=2)             # [b, H, N]
        known = torch.arange(N, device=device) < torch.tensor(sizes, device=device)[:, None]
        similarity = similarity.masked_fill(~known[:, None], float("-inf"))
        rank = similarity.argsort(dim=-1, descending=True).argsort(dim=-1)                # 0: the most similar
        # read order: the sinks, then sentence by sentence (the most similar first), each oldest first
        sentence = step.summary("sentence").long().clamp(0, N - 1)                        # [b, H, S]
        slots = torch.arange(S, device=device)
        order = rank.gather(-1, sentence) * S + slots
        order = order.masked_fill(slots < self.sink_tokens, -1)
        order = order.masked_fill(~step.held(), torch.iinfo(torch.int64).max)
        k = min(S, self.budget - self.device_window)
        top = order.topk(k, dim=-1, largest=False)
        picked = top.indices.masked_fill(top.values == torch.iinfo(torch.int64).max, -1)
        scored = step.held().sum() * 4 + sum(sizes) * H * D * 4                           # ids, vectors
        return Picks(slots=picked, scored_bytes=scored)
