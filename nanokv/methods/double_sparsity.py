"""double_sparsity: pick each decode step's tokens by attention scored on a few outlier channels.

Paper: Post-Training Sparse Attention with Double Sparsity (Yang, Sheng, Gonzalez, Stoica,
Zheng; 2024), arXiv 2408.07092. Sparse in tokens and in channels: a few channels of a head carry
most of q . k, and which ones is a property of the model, found once offline. At decode, score
every held key on those r channels only (the "label cache": K restricted to them), q_r . k_r,
take each head's top `budget` tokens, and attend over those alone with the whole keys. The cache
is kept whole; what changes is what a decode step reads.

The channel magnitudes come from `python -m nanokv.calibrate double_sparsity --model ...`
(nanokv/calibrate/double_sparsity.py): per layer and head, each channel's mean |q_c k_c| over
calibration text (post-RoPE, each token's query with its own key: the official "qk" outliers),
and its mean |q_c| and |k_c| before RoPE ("q", "k"). Defaults from the official code
(andy-yang-1/DoubleSparse): outliers="qk" (evaluation/perplexity_eval.py --channel qk), r = D/8
(channel_fraction 0.125: 16 of 128, the group_factor=8 of convert_kvcache_*_heavy_recent), the
first two layers and the prefill dense (skip_layers=2: AIME/modify_qwen2.py `layer_idx < 2`;
its offloading runs keep layers 0, 1 and 31 dense), 256 tokens (the heavy_const of
models/model.py, its gpt-fast decode path) as the default budget: tokens per kv-head and step,
as Quest's.

What differs:
- GQA: one channel set and one token set per kv-head. The channels are the r with the largest
  magnitude summed over the kv-head's query heads; each query head scores on them, and the group
  ranks by its highest approximate logit. The official "qk" and "q" channels are per query head
  and so are its picks (its label cache holds each query head's r channels).
- nanokv gathers every held key whole (ReadStep.keys) and slices the r channels; the official
  label cache is a separate store of those r channels. The bytes counted for the scoring are
  r numbers of every held key (step.key_bytes(r)): on this engine the smaller read is accounted,
  not yet realised in memory traffic.
- labels at the cache's precision: the official HF evaluation quantizes query and key labels to
  4 bits (label_bits / --q_bits), its gpt-fast decode path keeps them at 16 bits as here.
- channels from nanokv's calibration prose (8 samples of 1,024 tokens by default), not the
  official 256 Pile-validation samples in blocks of 512 tokens.
- a recompute after preemption runs its generated tokens densely (as prefill).
"""

import torch

from nanokv.methods.base import CALIBRATION_FILE, PageReader, Picks, ReadStep, top_slots

OUTLIERS = ("qk", "q", "k")


class DoubleSparsity(PageReader):
    name = "double_sparsity"
    description = "query-aware sparse decode: top tokens by attention over a few calibrated outlier channels"
    paper = "https://arxiv.org/abs/2408.07092"
    default_budget = 256
    calibration = "double_sparsity"
    options = {
        "channel_fraction": (float, 0.125, "a fraction in (0, 1] of the head's channels scored (r / D)",
                             lambda v: 0 < v <= 1),
        "outliers": (str, "qk", "one of qk, q, k (the magnitudes the channels are ranked by)",
                     lambda v: v in OUTLIERS),
        "skip_layers": (int, 2, "an integer >= 0 (the first layers, read whole)", lambda v: v >= 0),
        "calibration_file": CALIBRATION_FILE,
    }
    magnitudes: torch.Tensor | None = None   # [L, H, D] from bind_calibration: summed over each group

    def bind_calibration(self, artifact: dict):
        found = artifact["tensors"].get(f"{self.outliers}_channels")
        H = artifact["num_kv_heads"]
        if found is None or found.dim() != 3 or found.shape[1] % H:
            shape = "missing" if found is None else f"of shape {tuple(found.shape)}"
            raise ValueError(f"the double_sparsity calibration's {self.outliers}_channels is {shape}, expected "
                             f"[layers, heads, D]; run `python -m nanokv.calibrate double_sparsity --model ...` again")
        L, heads, D = found.shape
        self.magnitudes = found.float().view(L, H, heads // H, D).sum(dim=2)  # a group's query heads together
        self._on_device = {}

    def channels(self, head_dim: int) -> int:
        """r: the channels scored."""
        return max(1, round(self.channel_fraction * head_dim))

    def outlier_channels(self, layer: int, head_dim: int, device) -> torch.Tensor:
        """[H, r] each kv-head's r largest channels at `layer`."""
        if self.magnitudes is None:
            raise ValueError("method 'double_sparsity' has no calibration: bind_calibration first (LLM does; make "
                             "one with python -m nanokv.calibrate double_sparsity)")
        if device not in self._on_device:  # ranked once per device, every layer
            r = self.channels(head_dim)
            self._on_device[device] = self.magnitudes.topk(r, dim=-1).indices.to(device)
        return self._on_device[device][layer]

    def pick(self, step: ReadStep) -> Picks:
        b, H, S, D = step.keys.shape
        channels = self.outlier_channels(step.layer, D, step.keys.device)   # [H, r]
        r = channels.shape[-1]
        labels = step.keys.gather(-1, channels[None, :, None, :].expand(b, H, S, r))
        queries = step.queries.view(b, H, -1, D)
        queries = queries.gather(-1, channels[None, :, None, :].expand(b, H, queries.shape[2], r)).flatten(1, 2)
        scores = step.logits(labels, queries).amax(dim=2)                   # the group's highest
        return Picks(slots=top_slots(scores, self.budget), scored_bytes=step.key_bytes(r))
