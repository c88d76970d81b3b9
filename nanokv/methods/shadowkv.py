"""shadowkv: low-rank pre-RoPE keys and chunk landmarks on the device, values in host memory; a step
rebuilds the keys of its top chunks and recalls only their values.

Paper: ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference (Sun, Chang, Bao,
Zheng, Zheng, Liu, Dong, Chi, Chen; ICML 2025 spotlight), arXiv 2410.21465; code bytedance/ShadowKV.
Pre-RoPE keys are low-rank, values are not: at prefill ShadowKV keeps an SVD of the prompt's pre-RoPE
keys on the device and moves the values to the CPU. The prompt is cut into chunks of 8 tokens; each
chunk's landmark is the mean of its (post-RoPE) keys. Chunks whose keys a mean stands for badly (the
lowest smallest cosine between a key and its chunk's mean) are outliers, kept exact on the device
and read every step, as are the newest (local) tokens. At decode the query scores every other
landmark (q . landmark / sqrt(D), a softmax over the chunks, the most over the GQA group), takes
the top `budget / chunk_size` chunks, rebuilds their keys from the low-rank factors and RoPE, and
fetches their values from the CPU.
Here: when tokens move to the host (`summarize`), the first of a layer (a prompt's) fix the
kv-head's basis (the top `rank` right singular vectors of its pre-RoPE keys, RoPE taken off with
the model's speeds) and pick the outlier chunks among their whole chunks; every moved token keeps
its coordinates in the basis (and its position) on the device; each chunk's key sum and count grow
as tokens move (decode blocks too), its landmark is their mean. `pick` returns the top chunks'
slots with keys rebuilt on the device (Picks.keys: only values and positions are recalled) and the
outlier chunks' slots with their exact keys.

Defaults: bytedance/ShadowKV (read in its copy intelli-jsong/SpeCache @ b447f6f): README's RULER
command (--sparse_budget 2048 --rank 160 --chunk_size 8: `budget` 2048, the picked chunks' tokens;
`chunk_size` 8), models/kv_cache.py ShadowKVCache (outlier_chunk 48: `outliers`; local_chunk 4 = 32
tokens: `device_window` 32), the decode path of models/llama.py as its forks carry it (the SVD of
the keys before RoPE, every layer sparse at decode: `skip_layers` 0; landmark softmax per query
head, the most over the GQA group). The rank
160 is over the 8 kv-heads of Llama-3-8B together (keys [n, 8 * 128]: 160 numbers per token and
layer), hence `rank` 20 per kv-head here.

What differs:
- One basis per kv-head, of `rank` (capped at the head's dimension; fewer if fewer tokens moved
  first), not one SVD over all kv-heads together: the cache's summaries are rows per kv-head. The
  numbers per token are the same at the default (20 x 8 = 160 for Llama-3-8B); coordinates are
  float32 (the official U is bf16), plus an int32 position per token.
- The official code keeps every generated token exact on the GPU. Here decode blocks move to the
  host as they fill (the host tier's rule): they get coordinates in the prompt's basis and join
  the chunks (never as outliers); the basis is not refit.
- Outlier chunks' values live in host memory and are recalled every step (counted as moved); their
  exact keys stay on the device in the sequence's state, read every step (counted in scored_bytes
  with the landmarks, float32 [H, chunks, D], and the coordinates the rebuild reads).
- Landmarks live in the sequence's state (not summaries: one per chunk), as sums and counts, so a
  chunk cut by the prefill's last move is completed by the first decode block.
- The official scale is 1/sqrt(128) always; here 1/sqrt(D). The official code keeps 4 local chunks
  and the prompt's remainder exact; here the device window is `device_window` tokens. A recompute
  after preemption refits the basis over everything it moves (prompt and generated tokens).
"""

import math

import torch

from nanokv.methods.base import Offloader, Picks, top_slots
from nanokv.methods.reattention import unrotated
from nanokv.models.rope import apply_rope, rope_cos_sin_gathered


def padded(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """x grown with zeros (False) along `dim` to `size`."""
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim)


class ShadowKV(Offloader):
    name = "shadowkv"
    description = "low-rank pre-RoPE keys + chunk landmarks on the device, values on the host; top chunks rebuilt"
    paper = "https://arxiv.org/abs/2410.21465"
    default_budget = 2048
    options = {
        "rank": (int, 20, "an integer >= 1 (the basis of each kv-head's pre-RoPE keys; capped at the head's dimension)",
                 lambda v: v >= 1),
        "chunk_size": (int, 8, "an integer >= 1 (tokens per landmark)", lambda v: v >= 1),
        "outliers": (int, 48, "an integer >= 0 (chunks of the first tokens moved, read exactly every step)",
                     lambda v: v >= 0),
        "skip_layers": (int, 0, "an integer >= 0 (the first layers, kept whole on the device)", lambda v: v >= 0),
        "device_window": (int, 32, "an integer >= 0 (the newest tokens of each head kept on the device)",
                          lambda v: v >= 0),
    }

    def check_budget(self):
        if self.budget < self.chunk_size:
            raise ValueError(f"shadowkv reads whole chunks: budget={self.budget} must be at least chunk_size="
                             f"{self.chunk_size} (the default budget is {self.default_budget})")

    def summary_fields(self, head_dim):
        return {"coords": (torch.float32, (min(self.rank, head_dim),)), "pos": (torch.int32, ())}

    def summarize(self, view):
        H, n, D = view.keys.shape
        s = view.state.setdefault(("shadowkv", view.layer), {})
        pre = unrotated(view.keys, view.positions.expand(H, n), view.inv_freq, self.name)  # [H, n, D]
        if "basis" not in s:
            s.update(self._index(view.keys, pre))
        coords = pre @ s["basis"]                                                          # [H, n, r]
        # landmarks: each chunk's key sum and count, grown by every move
        cs, start = self.chunk_size, s["moved"]
        chunk = torch.arange(start, start + n, device=view.keys.device) // cs
        C = -(-(start + n) // cs)
        s["sums"] = padded(s["sums"], C, 1)
        s["counts"] = padded(s["counts"], C, 0)
        s["outlier"] = padded(s["outlier"], C, 1)
        s["sums"].index_add_(1, chunk, view.keys.float())
        s["counts"].index_add_(0, chunk, torch.ones(n, device=pre.device))
        s["moved"] = start + n
        return {"coords": coords, "pos": view.positions.expand(H, n)}

    def _index(self, keys, pre):
        """The first tokens a layer moves [H, n, D] (after RoPE, and before) -> its basis, outlier
        chunks (their exact keys and slots) and empty landmarks."""
        H, n, D = keys.shape
        r, cs = min(self.rank, D), self.chunk_size
        basis = torch.zeros(H, D, r, device=pre.device)
        if n:  # (none: a sequence with nothing moved yet, at pick)
            vh = torch.linalg.svd(pre, full_matrices=False).Vh                              # [H, min(n, D), D]
            basis[:, :, :min(r, vh.shape[1])] = vh[:, :r].transpose(1, 2)
        # outliers: of the whole chunks, those whose worst key is farthest from the chunk's mean
        whole = n // cs
        chunks = keys[:, :whole * cs].float().view(H, whole, cs, D)
        worst = torch.nn.functional.cosine_similarity(chunks, chunks.mean(2, keepdim=True), dim=-1).amin(-1)
        picked = worst.topk(min(self.outliers, whole), dim=-1, largest=False).indices.sort(-1).values  # [H, o]
        slots = (picked[..., None] * cs + torch.arange(cs, device=keys.device)).flatten(1)            # [H, o * cs]
        exact = keys.gather(1, slots[..., None].expand(-1, -1, D))
        outlier = torch.zeros(H, -(-n // cs), dtype=torch.bool, device=keys.device).scatter_(1, picked, True)
        return {"basis": basis, "outlier_slots": slots, "outlier_keys": exact, "outlier": outlier,
                "sums": torch.zeros(H, 0, D, device=pre.device),
                "counts": torch.zeros(0, device=pre.device), "moved": 0}

    def pick(self, step):
        b, H = step.lengths.shape
        D = step.queries.shape[-1]
        cs, device = self.chunk_size, step.queries.device
        # a sequence that has moved nothing yet here (a prompt within the window) has no index
        none = torch.zeros(H, 0, D, device=device)
        index = [s[("shadowkv", step.layer)] if ("shadowkv", step.layer) in s else self._index(none, none)
                 for s in step.states]
        C = max(1, max(i["counts"].shape[0] for i in index))
        landmarks = torch.zeros(b, H, C, D, device=device)
        scorable = torch.zeros(b, H, C, dtype=torch.bool, device=device)
        for j, i in enumerate(index):
            c = i["counts"].shape[0]
            landmarks[j, :, :c] = i["sums"] / i["counts"].clamp(min=1)[:, None]
            scorable[j, :, :c] = ~i["outlier"] & (i["counts"] > 0)
        q = step.queries.float().view(b, H, -1, D)
        logits = torch.einsum("bhgd,bhcd->bhgc", q, landmarks) / math.sqrt(D)
        probs = logits.masked_fill(~scorable[:, :, None], float("-inf")).softmax(dim=-1)
        scores = probs.amax(dim=2).masked_fill(~scorable, float("-inf"))                   # [b, H, C]
        chunks = top_slots(scores, self.budget // cs)                                       # [b, H, k]
        slots = (chunks[..., None] * cs + torch.arange(cs, device=device)).flatten(-2)
        slots = slots.masked_fill((chunks < 0).repeat_interleave(cs, dim=-1) | (slots >= step.lengths[..., None]), -1)
        keys = self._rebuilt(step, slots, torch.stack([i["basis"] for i in index]))
        # the outlier chunks, read exactly every step (padded with -1 where a sequence has fewer)
        o = max(i["outlier_slots"].shape[1] for i in index)
        out_slots = torch.full((b, H, o), -1, dtype=slots.dtype, device=device)
        out_keys = torch.zeros(b, H, o, D, dtype=keys.dtype, device=device)
        for j, i in enumerate(index):
            m = i["outlier_slots"].shape[1]
            out_slots[j, :, :m] = i["outlier_slots"]
            out_keys[j, :, :m] = i["outlier_keys"].to(keys.dtype)
        r = index[0]["basis"].shape[-1]
        # the landmarks scored, the rebuilt slots' coordinates and positions, the outliers' exact keys
        scored = scorable.sum() * (D * 4) + (slots >= 0).sum() * (r * 4 + 4) + \
            (out_slots >= 0).sum() * (D * step.itemsize)
        return Picks(slots=torch.cat([slots, out_slots], -1), keys=torch.cat([keys, out_keys], 2), scored_bytes=scored)

    def _rebuilt(self, step, slots, basis):
        """The keys of host slots [b, H, k] (-1: none) from their coordinates in basis [b, H, D, r],
        rotated by their positions -> [b, H, k, D] float32."""
        at = slots.clamp(min=0)
        coords = step.summary("coords")
        coords = coords.gather(2, at[..., None].expand(-1, -1, -1, coords.shape[-1]))        # [b, H, k, r]
        positions = step.summary("pos").gather(2, at)                                         # [b, H, k]
        pre = torch.einsum("bhkr,bhdr->bhkd", coords.float(), basis)
        cos, sin = rope_cos_sin_gathered(positions.reshape(-1), step.inv_freq.to(pre.device), torch.float32)
        return apply_rope(pre.reshape(-1, 1, pre.shape[-1]), cos, sin).view(pre.shape)
