"""quest: read only the pages of the cache that can matter to the current query.

Paper: Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (Tang et al., ICML
2024), arXiv 2406.10774. The cache is kept whole; what changes is what a decode step reads.
Every page (a cache block of `block_size` tokens of one head) carries the per-channel min and
max of its keys. For a query q, sum_c max(q_c * max_c, q_c * min_c) bounds q . k from above for
every key k in the page, so a page whose bound is low cannot hold a key the query attends to
much. Each decode step keeps the top K = budget / page_size pages by bound (at least
`min_pages`) and attends over those alone. Defaults from the paper and the official code
(mit-han-lab/Quest @ 01c1623, evaluation/quest_attention.py): page size 16 (the cache's block
size), the first two layers and the prefill dense (`skip_layers=2`), at least 3 pages, token
budgets of 512 to 4096 (1024 when none is given).

What differs:
- GQA: one page set per kv-head, ranked by the highest of its query heads' bounds, which all
  of the group read (the cache stores kv-heads); official Quest selects per query head.
- The newest page is always read, inside the K (Quest's kernel path); its accuracy path ranks
  it like any page.
- A recompute after preemption runs its generated tokens densely (as prefill), so later
  layers' KV may differ slightly from the sparse first run.

The bounds live in the cache's pool (kmin / kmax per block, nanokv/cache/pool.py). The scoring
and the pick are kernels (page_scores: nanokv/kernels/quest.py in Triton, cpu_quest.cpp on a CPU;
the pick as reference.quest_pages, or cpu_quest.cpp's quest_select in one call with the scoring),
which the engine runs in every decode layer (nanokv/engine/attention.py): the reduced tables are
K pages wide whatever the picks, so no layer waits for the GPU to say how many it made.
"""

from nanokv.methods.base import PageReader


class Quest(PageReader):
    name = "quest"
    description = "query-aware sparse decode: read only the top pages by a key min/max bound (cache kept whole)"
    paper = "https://arxiv.org/abs/2406.10774"
    default_budget = 1024
    picks_by_bounds = True
    options = {
        "skip_layers": (int, 2, "an integer >= 0", lambda v: v >= 0),
        "min_pages": (int, 3, "an integer >= 1", lambda v: v >= 1),
    }

    def pages_to_read(self, block_size: int) -> int:
        return max(self.min_pages, self.budget // block_size)
