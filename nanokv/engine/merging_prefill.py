"""MergingPrefill: a hierarchical merging method's prefill of one sequence (HOMER: nanokv/methods/homer.py),
as the model's attention callable (nanokv/models/llama.py).

One forward pass over every chunk of the compressed part, laid out one after another, each chunk its
prefix, its context tokens and its suffix (MergeTree). Every row belongs to a node of the merge
tree; at each layer a node's rows attend only over each other, causally in row order (positions
repeat once contexts merge), and write their K/V to the sequence's cache in row order. At the last
layer of a tree level:

    prune   each node keeps the context tokens its last row attends to most (the method's
            significance and prune); the rest leave the cache of this layer and of every lower one
            (compact: the propagative refinement), and leave the pass (narrow);
    merge   (below the root) nodes 2i and 2i + 1 become one: the left node's prefix copy and the
            right node's suffix copy take the mean of the two copies, in every layer so far and in
            the hidden states (narrow's pairs of rows); the other copies leave.

Because every row that stays keeps its order, slot j of every layer so far holds row j throughout.
What is left is [prefix, contexts..., suffix] in every layer; what follows the compressed part
goes on after the suffix's positions (`next_position`).
"""

from __future__ import annotations

import torch

from nanokv.cache.overwrite import read_tokens, write_tokens
from nanokv.engine.blending import attention_within
from nanokv.methods.base import query_logits

PREFIX, CONTEXT, SUFFIX = 0, 1, 2


class MergingPrefill:
    def __init__(self, cache, seq_id: int, tree, method, token_ids: list[int], ranks=None):
        """tree: the method's MergeTree for these `token_ids` (the compressed part); ranks: tensor
        parallelism's group, over which a chunk's significance is the highest of every rank's heads."""
        self.cache, self.seq_id, self.tree, self.method, self.ranks = cache, seq_id, tree, method, ranks
        device = cache.pool.device
        p, s, n = tree.prefix, tree.suffix, len(token_ids)
        ids, positions, kinds, groups = [], [], [], []
        for i, (start, end) in enumerate(tree.pieces):
            ids += token_ids[:p] + token_ids[start:end] + token_ids[n - s:]
            positions += tree.positions(i)
            kinds += [PREFIX] * p + [CONTEXT] * (end - start) + [SUFFIX] * s
            groups += [i] * (p + end - start + s)
        self.ids = torch.tensor(ids, device=device)
        self.positions = torch.tensor(positions, device=device)
        self.kind = torch.tensor(kinds, device=device)
        self.group = torch.tensor(groups, device=device)
        # what follows the compressed part: after the suffix (every chunk's sits at the same positions)
        self.next_position = int(self.positions[-1]) + 1
        self.level = 0
        self.pairs: torch.Tensor | None = None  # narrow's rows after a level's last layer
        self.prefill_flops = 0  # as StepAttention's: 4 D per (query, key) pair per query head
        self.kept: list[int] = []  # rows left after each level (what tests read)

    def __call__(self, layer, q, k, v, sliding_window):
        cache = self.cache
        cache.write_prefill(self.seq_id, layer, k, v, self.positions)
        sizes = torch.unique_consecutive(self.group, return_counts=True)[1].tolist()
        out = attention_within(cache.kernels, q, k, v, sizes, sliding_window)  # row order: positions repeat
        self.prefill_flops += 4 * q.shape[-1] * q.shape[1] * sum(n * (n + 1) // 2 for n in sizes)
        cache.settle(self.seq_id, layers=slice(layer, layer + 1))
        if layer == self.tree.level_ends[self.level]:
            self._prune_and_merge(layer, q, k, sizes)
        return out

    def narrow(self, layer):
        rows, self.pairs = self.pairs, None
        return rows

    def _prune_and_merge(self, layer: int, q: torch.Tensor, k: torch.Tensor, sizes: list[int]):
        cache, tree, level = self.cache, self.tree, self.level
        H, R, device = cache.num_kv_heads, len(self.kind), self.kind.device
        keep = torch.ones(R, dtype=torch.bool, device=device)
        start = 0
        for node, size in enumerate(sizes):
            rows = slice(start, start + size)
            # the attention probabilities of the node's last row over its keys [Hq, size]
            probs = query_logits(q[start + size - 1:start + size], k[rows].transpose(0, 1))[:, 0].softmax(dim=-1)
            significance = self.method.significance(probs)
            if self.ranks is not None:  # the highest over every rank's heads
                significance = self.ranks.all_reduce(significance.float().contiguous(), "max")
            keep[rows] = self.method.prune(significance, self.kind[rows] == CONTEXT, tree.targets[level][node])
            start += size
        lower = slice(0, layer + 1)  # this layer and every one below it (propagative refinement)
        if not bool(keep.all()):
            cache.compact(self.seq_id, keep.expand(layer + 1, H, R), lower)
        kept = keep.nonzero().flatten()
        kind, group, positions = self.kind[kept], self.group[kept], self.positions[kept]
        partner = torch.arange(len(kept), device=device)
        self.level += 1
        if self.level < len(tree.level_ends):  # below the root: nodes 2i and 2i + 1 merge
            left, right = group % 2 == 0, group % 2 == 1
            # the copies that stay (left prefix, right suffix) and the ones folded into them, in order
            stay = torch.cat([((kind == PREFIX) & left).nonzero(), ((kind == SUFFIX) & right).nonzero()]).flatten()
            fold = torch.cat([((kind == PREFIX) & right).nonzero(), ((kind == SUFFIX) & left).nonzero()]).flatten()
            for l in range(layer + 1):
                a = read_tokens(cache, self.seq_id, l, stay, ("k", "v"))
                b = read_tokens(cache, self.seq_id, l, fold, ("k", "v"))
                write_tokens(cache, self.seq_id, l, stay, {f: (a[f].float() + b[f].float()) / 2 for f in ("k", "v")})
            partner[stay] = fold
            remain = torch.ones(len(kept), dtype=torch.bool, device=device)
            remain[fold] = False
            cache.compact(self.seq_id, remain.expand(layer + 1, H, len(kept)), lower)
            survivors = remain.nonzero().flatten()
            self.pairs = torch.stack([kept[survivors], kept[partner[survivors]]], dim=1)
            kind, group, positions = kind[survivors], group[survivors] // 2, positions[survivors]
        else:
            self.pairs = kept if len(kept) < R else None
        self.kind, self.group, self.positions = kind, group, positions
        self.kept.append(len(kind))

