"""homer: hierarchical context merging, chunks processed apart and merged pairwise up the layers.

Paper: "Hierarchical Context Merging: Better Long Context Understanding for Pre-trained LLMs",
Woomin Song, Seunghyuk Oh, Sangwoo Mo, Jaehyung Kim, Sukmin Yun, Jung-Woo Ha, Jinwoo Shin (ICLR
2024), arXiv 2404.10308. Code: alinlab/HOMER (src/homer/modeling_llama.py, chunk.py).

A long context is split into 2^h chunks, each with the prompt's prefix before it and its suffix
(the instruction) after it, at positions of its own: prefix 0 .. p - 1, the chunk's tokens from p,
the suffix after the longest chunk. Then, as a binary tree over the layers:

    1. the chunks run the first layers (the warm-up layers, then a share of the rest) apart;
    2. at the last layer of that share, each chunk prunes its context tokens to a target length:
       the tokens the chunk's last token attends to least (its attention probabilities at that
       layer, the highest over heads) go, and they go from every lower layer's KV too
       ("propagative refinement"), so every layer holds the same tokens;
    3. adjacent chunks merge: the two copies of the prefix and of the suffix are averaged (hidden
       states, and K/V in every lower layer), the two contexts are concatenated (keeping their
       positions);
    4. the merged chunks run the next share of layers, prune, merge again, up to the root, which
       runs the last layers and prunes to the final length.

What is left is one cache of the final length in every layer, and generation goes on at the
positions after the suffix's.

Defaults and their sources:
    max_chunk_len: alinlab/HOMER's README advises half the model's context and target_len equal to
        it (2048 for Llama-2); nanokv takes both from the request's budget (budget, or the share
        compression leaves), so one knob sets the size of a chunk and of what is kept.
    layers_warmup: 12 of Llama-2-7B's 32 layers (alinlab/HOMER's homer_args); nanokv scales it to
        the model: 12 L // 32.
    layers per tree level: alinlab/HOMER's create_homer_prefix: floor((L - warmup) / (h + 1)) each,
        the leaves taking the rest.
    targets: alinlab/HOMER's _merge: every child of a merge is pruned to prefix + (max_chunk_len -
        prefix - suffix) // 2 + suffix, so that two fit one chunk; a right child shorter than that
        keeps its length and its left sibling takes the rest; the root prunes to the final length.

What differs:
    - The paper's prefix and suffix are the prompt's instruction around its context. A prompt
      here is tokens, so HOMER takes the compressed part's first `prefix` tokens and last `suffix`
      tokens as those (nanokv's defaults: 4 and 32). With a (context, question) prompt the question
      is not part of the compressed part (kvpress's query-agnostic setting); it is prefilled after,
      over the merged cache.
    - alinlab/HOMER subtracts a calibrated bias per relative position (its "power_max_last_calibrated"
      reduction, bias files for Llama-2 only) from the significance; nanokv uses the attention
      alone (bias_path is the paper's optional calibration, not made here).
    - Attention within a chunk is causal in the chunk's order (positions repeat across merged
      contexts), as the official code, which attends in cache order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nanokv.methods.base import Method


@dataclass
class MergeTree:
    """The plan of one prompt's merging prefill (what the engine runs: engine/merging_prefill.py)."""
    prefix: int                    # p: tokens of the prompt's prefix, copied into every chunk
    suffix: int                    # s: tokens of its suffix, copied into every chunk
    pieces: list[tuple[int, int]]  # each chunk's context tokens [start, end) of the prompt
    chunk_len: int                 # e: context tokens of the longest chunk (the suffix sits after them)
    level_ends: list[int]          # the last layer of each tree level, the leaves first (the root's: L - 1)
    targets: list[list[int]] = field(default_factory=list)  # per level, each node's length after its pruning

    def positions(self, i: int) -> list[int]:
        """Chunk i's positions: the prefix at 0 .., its context after it, the suffix after the
        longest chunk's context (so every chunk's suffix sits at the same positions)."""
        start, end = self.pieces[i]
        p, s, e = self.prefix, self.suffix, self.chunk_len
        return list(range(p)) + list(range(p, p + end - start)) + list(range(p + e, p + e + s))


class Homer(Method):
    name = "homer"
    description = "chunks prefilled apart, pruned by their last token's attention and merged pairwise up the layers"
    paper = "https://arxiv.org/abs/2404.10308"
    merges_chunks = True
    options = {
        "layers_warmup": (int, -1, "layers before any merging, or -1: 12 L // 32 (HOMER: 12 of 32)",
                          lambda n: n >= -1),
        "prefix": (int, 4, "the prompt's first tokens copied into every chunk (nanokv: 4)", lambda n: n >= 0),
        "suffix": (int, 32, "the prompt's last tokens copied into every chunk (nanokv: 32)", lambda n: n >= 1),
        "max_chunk_len": (int, -1, "tokens of a chunk with its prefix and suffix, or -1: the budget (HOMER: "
                                   "target_len = max_chunk_len)", lambda n: n == -1 or n > 0),
    }

    def kept_after_prefill(self, n: int, layer: int, num_layers: int) -> int:
        """The most a head of any layer holds during the prefill, which the scheduler plans with: every
        chunk's tokens, the prefix and suffix once per chunk, until the leaves' first pruning (after
        the prefill every layer holds the final length)."""
        if not self.compresses:
            return n
        p, s, height = self.split(n, num_layers)  # not the whole tree: the scheduler asks once a layer
        return n + (2 ** height - 1) * (p + s)

    def chunk_limit(self, n: int) -> int:
        return self.max_chunk_len if self.max_chunk_len > 0 else self.tokens_to_keep(n)

    def split(self, n: int, num_layers: int) -> tuple[int, int, int]:
        """(prefix, suffix, tree height) of a compressed part of n tokens: 2 ** height chunks, each of
        at most max_chunk_len tokens with the prefix and suffix (alinlab/HOMER's create_homer_prefix)."""
        p, s = min(self.prefix, n // 4), min(self.suffix, n // 4)  # a short prompt still has a context
        eff_max = max(1, self.chunk_limit(n) - p - s)
        height = math.ceil(math.log2(max(1, math.ceil((n - p - s) / eff_max))))
        return p, s, min(height, num_layers - 1)  # a level needs a layer of its own: fewer, longer chunks

    def tree(self, n: int, num_layers: int) -> MergeTree:
        """The merging plan of a compressed part of n tokens (alinlab/HOMER's create_homer_prefix)."""
        p, s, height = self.split(n, num_layers)
        context, limit = n - p - s, self.chunk_limit(n)
        num_chunks = 2 ** height
        e = math.ceil(context / num_chunks)
        pieces = [(p + min(context, i * e), p + min(context, (i + 1) * e)) for i in range(num_chunks)]
        warmup = self.layers_warmup if self.layers_warmup >= 0 else 12 * num_layers // 32
        warmup = min(warmup, num_layers - height - 1)
        per_level = (num_layers - warmup) // (height + 1)
        leftover = (num_layers - warmup) - per_level * (height + 1)
        level_ends = [warmup + leftover + per_level * (k + 1) - 1 for k in range(height + 1)]
        tree = MergeTree(p, s, pieces, e, level_ends)
        tree.targets = self.targets(tree, min(self.tokens_to_keep(n), n), limit)
        return tree

    def targets(self, tree: MergeTree, final: int, limit: int) -> list[list[int]]:
        """Each node's length after its pruning, leaves first (alinlab/HOMER's _merge): a child of a
        merge keeps half a chunk of `limit` tokens (prefix and suffix whole), a short right child its
        length with its left sibling taking what is left; the root keeps `final`."""
        p, s = tree.prefix, tree.suffix
        half = p + (limit - p - s) // 2 + s
        lengths = [p + end - start + s for start, end in tree.pieces]  # each leaf's, as it starts
        levels = [[0] * (len(lengths) >> k) for k in range(len(tree.level_ends))]

        def assign(level: int, node: int, target: int):
            levels[level][node] = target
            if level == 0:
                return
            right_leaf = lengths[(2 * node + 1) << (level - 1)]  # the first leaf of the right subtree
            left, right = (half, half) if right_leaf >= half else (limit - (right_leaf - p - s), right_leaf)
            assign(level - 1, 2 * node, left)
            assign(level - 1, 2 * node + 1, right)

        assign(len(levels) - 1, 0, final)
        return levels

    def significance(self, last_row_probs: torch.Tensor) -> torch.Tensor:
        """[Hq, S] the attention probabilities of a chunk's last token at a pruning layer -> [S]: the
        highest over heads (alinlab/HOMER: metric[:, :, -1, :].max(dim=1))."""
        return last_row_probs.amax(dim=0)

    def prune(self, significance: torch.Tensor, prunable: torch.Tensor, target: int) -> torch.Tensor:
        """[S] scores, [S] bool (the context tokens) -> [S] bool kept: the len - target least significant
        context tokens go (none when the chunk is within its target)."""
        keep = torch.ones_like(prunable)
        drop = min(len(significance) - target, int(prunable.sum()))
        if drop > 0:
            scores = significance.float().masked_fill(~prunable, math.inf)
            keep[scores.topk(drop, largest=False).indices] = False
        return keep
