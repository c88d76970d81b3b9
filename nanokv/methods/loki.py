"""loki: pick each decode step's tokens by attention scored in a few principal directions of the keys.

Paper: Loki: Low-Rank Keys for Efficient Sparse Attention (Singhania, Singh, He, Feizi, Bhatele;
NeurIPS 2024), arXiv 2406.02542. Keys live in a space of much lower rank than the head: a PCA
of each head's keys, made once offline, puts most of their variance in the first few directions.
At decode, project the query and every held key on the top d = d_f * D principal directions,
score q~ . k~ / sqrt(D) (an approximation of q . k: the basis is orthonormal, so with every
direction the score is exact), take each head's top `budget` tokens, and attend over those alone
with the whole keys. The cache is kept whole; what changes is what a decode step reads.

The bases come from `python -m nanokv.calibrate loki --model ...` (nanokv/calibrate/loki.py): per
layer and kv-head, the principal directions of the post-RoPE keys (the official default,
--rotary-type postrotary; its scripts also try prerotary). The scores project post-RoPE queries
and keys either way, so the basis is fitted to what it projects: on SmolLM2-135M the top 128 of
d = 16 scores hold 76% of the exact top 128 with a post-RoPE basis, 58% with a pre-RoPE one
(mean over kv-heads, layers and three late queries of a 700-token text).

Defaults from the official code (hpcgroup/loki, methods/pca_topk/utils.py, examples/pca_topk/*.sh)
and the paper's main setting: d_f = 0.25 (dim_fraction: 32 of a head of 128), every layer sparse
(skip_layers=0), no recent window (--recent-ratio -1). The paper's k_f = 0.25 picks a quarter of
the context; here `budget` is tokens per kv-head and step, as Quest's (1,024 by default: k_f =
0.25 of a 4,096-token context).

What differs:
- GQA: one token set per kv-head, ranked by the highest of its query heads' approximate logits;
  official Loki repeats the kv-head's basis over its query heads and picks per query head.
- nanokv gathers every held key whole (ReadStep.keys) and projects it; Loki's kernels keep the
  keys rotated into the PCA basis (exact scores unchanged) and read only their first d numbers. The bytes counted
  for the scoring are those d numbers of every held key (step.key_bytes(d)): on this engine the
  smaller read is accounted, not yet realised in memory traffic.
- prefill is dense (the official HF path also masks the prompt's own attention to top-k).
- the PCA is fitted on nanokv's calibration prose (8 samples of 1,024 tokens by default), not
  on WikiText-2; the projection is uncentred, as the official scoring.
- a recompute after preemption runs its generated tokens densely (as prefill).
"""

import torch

from nanokv.methods.base import CALIBRATION_FILE, PageReader, Picks, ReadStep, top_slots


class Loki(PageReader):
    name = "loki"
    description = "query-aware sparse decode: top tokens by attention over the keys' top principal directions"
    paper = "https://arxiv.org/abs/2406.02542"
    default_budget = 1024
    calibration = "loki"
    options = {
        "dim_fraction": (float, 0.25, "a fraction in (0, 1] of the head's dimensions scored (Loki's d_f)",
                         lambda v: 0 < v <= 1),
        "skip_layers": (int, 0, "an integer >= 0 (the first layers, read whole)", lambda v: v >= 0),
        "calibration_file": CALIBRATION_FILE,
    }
    bases: torch.Tensor | None = None   # [L, H, D, D] from bind_calibration: column i, the i-th direction

    def bind_calibration(self, artifact: dict):
        basis = artifact["tensors"].get("k_basis")
        if basis is None or basis.dim() != 4 or basis.shape[-1] != basis.shape[-2] or \
                basis.shape[1] != artifact["num_kv_heads"]:
            found = "missing" if basis is None else f"of shape {tuple(basis.shape)}"
            raise ValueError(f"the loki calibration's k_basis is {found}, expected [layers, kv-heads, D, D]; "
                             f"run `python -m nanokv.calibrate loki --model ...` again")
        self.bases, self._on_device = basis.float(), {}

    def dims(self, head_dim: int) -> int:
        """d: the principal directions scored."""
        return max(1, round(self.dim_fraction * head_dim))

    def pick(self, step: ReadStep) -> Picks:
        if self.bases is None:
            raise ValueError("method 'loki' has no calibration: bind_calibration first (LLM does; make one with "
                             "python -m nanokv.calibrate loki)")
        device = step.keys.device
        if device not in self._on_device:  # a few KiB per layer: moved once
            self._on_device[device] = self.bases.to(device)
        D = step.keys.shape[-1]
        d = self.dims(D)
        top = self._on_device[device][step.layer, :, :, :d]                  # [H, D, d]
        b, H = step.keys.shape[:2]
        keys = torch.einsum("bhsD,hDd->bhsd", step.keys.float(), top)
        queries = torch.einsum("bhgD,hDd->bhgd", step.queries.float().view(b, H, -1, D), top).flatten(1, 2)
        scores = step.logits(keys, queries).amax(dim=2)                      # the group's highest
        return Picks(slots=top_slots(scores, self.budget), scored_bytes=step.key_bytes(d))
