"""LatentKVCache: a PagedKVCache that stores each token as a low-rank latent (LoRC, Palu).

A layer's kv-heads are taken in groups of `group` consecutive heads (Palu's group-head
decomposition; one group per head, or one for the whole layer, are the two ends). For each group
of each layer the method gives two orthonormal bases (nanokv/calibrate/lowrank.py): the first r_k
columns of one span what the cache keeps of the group's keys *before RoPE*, the first r_v of the
other its values. A token is stored as its coordinates in them,

    latent_k = (k_pre - b_k) @ U_k[:, :r_k]        latent_v = (v - b_v) @ U_v[:, :r_v]

and read back as k_pre ~ latent_k @ U_k[:, :r_k]^T + b_k (then rotated by RoPE at the token's own
position: a rotation does not commute with the projection, which is why keys are stored before
it) and v ~ latent_v @ U_v[:, :r_v]^T + b_v. The bias b is the projection's (Qwen2's k/v bias),
which the factorization leaves out. This is the truncated SVD of W_k (LoRC) or of the whitened
W_k (Palu) in another form: the latent X.A of those papers equals (k_pre - b).U_r up to a fixed
scaling of each coordinate, and the reconstruction is the same.

Storage: the pool's blocks are `chunk` channels wide. A token of layer l takes
m_l = ceil((r_k + r_v) / (2 chunk)) consecutive slots of its group's blocks, its latent cut into
chunks (the K latent, then the V latent, zero-padded): slot j holds chunks 2j in the k field and
2j+1 in the v field, each slot with the token's position. Layers keep different ranks (LoRC's
progressive ranks, Palu's rank search) and so take different numbers of slots a token
(`slots_per_token`); everything else (block tables, lengths counted in slots, allocation,
preemption, accounting) is PagedKVCache's, with a cache "head" being a group.

Attention rebuilds a layer's keys from the gathered latents and runs the reference maths on
them (`read`, then nanokv/kernels/reference.attend), at prefill and at decode: the model with the
low-rank K/V projections everywhere, as the papers evaluate it. Values are never rebuilt: the
attention weights apply to their latents, and each head's output is then taken through its rows
of the value basis (`values_out`): sum_s p_s (U c_s + b) = U (sum_s p_s c_s) + b, Palu's fold of
V's reconstruction into the output (it folds U into W_o; here the engine applies it, as the model
knows nothing of latents). Palu also fuses K's reconstruction with RoPE in a kernel: speed, not
maths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanokv.kernels.reference import latent_keys
from nanokv.models.rope import apply_rope, rope_cos_sin
from nanokv.cache.kv_cache import PagedKVCache
from nanokv.cache.pool import DEFAULT_BLOCK_SIZE, HOST, BlockPool, pool_blocks

CHUNK = 16  # channels a slot holds in each of its k and v fields


@dataclass
class LatentLayer:
    """One layer's projections, per group g: bases [G, group * D, r] (orthonormal columns) and the
    bias [G, group * D] they are taken around."""
    k_basis: torch.Tensor
    v_basis: torch.Tensor
    k_bias: torch.Tensor
    v_bias: torch.Tensor

    @property
    def ranks(self) -> tuple[int, int]:
        return self.k_basis.shape[-1], self.v_basis.shape[-1]

    def slots(self, chunk: int = CHUNK) -> int:
        """Slots one token of this layer takes: its K and V latents, two chunks a slot."""
        return -(-sum(self.ranks) // (2 * chunk))


class LatentKVCache(PagedKVCache):
    def __init__(self, cfg, pool: BlockPool, layers: list[LatentLayer], group: int, inv_freq: torch.Tensor):
        if cfg.num_kv_heads % group:
            raise ValueError(f"a head group of {group} does not divide the model's {cfg.num_kv_heads} kv-heads")
        super().__init__(cfg.num_layers, cfg.num_kv_heads // group, pool)
        self.group, self.model_kv_heads, self.model_head_dim = group, cfg.num_kv_heads, cfg.head_dim
        self.full_block_size = DEFAULT_BLOCK_SIZE  # full's, for uncompressed_bytes
        self.inv_freq, self._table = inv_freq, None  # RoPE's cos and sin by position (rope_tables)
        self.newest_position: int | None = None  # the newest any step has announced (expect_positions)
        self.layers = [LatentLayer(*(t.to(pool.device, torch.float32) for t in (l.k_basis, l.v_basis,
                                                                               l.k_bias, l.v_bias))) for l in layers]
        self.set_slots_per_token(torch.tensor([l.slots(pool.head_dim) for l in layers], device=HOST))

    @classmethod
    def from_memory(cls, cfg, kv_cache_memory: int, layers: list[LatentLayer], group: int, inv_freq: torch.Tensor,
                    block_size: int, dtype: torch.dtype, device="cpu"):
        """A cache whose pool of CHUNK-channel blocks takes `kv_cache_memory` bytes."""
        per_block = BlockPool.block_bytes(block_size, CHUNK, dtype)
        num_blocks = pool_blocks(kv_cache_memory, per_block, sum(l.slots() for l in layers) * (cfg.num_kv_heads // group))
        return cls(cfg, BlockPool(num_blocks, block_size, CHUNK, dtype, device), layers, group, inv_freq)

    # --- writing and reading latents ----------------------------------------------------

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write T tokens of `layer`: slots [G, T * m] (a token's m slots in a row), k (after RoPE)
        and v [T, H, D], positions [T]."""
        p, m, chunk = self.layers[layer], self.slot_counts[layer], self.pool.head_dim
        T, G = k.shape[0], self.num_kv_heads
        k_pre = self._rotate(k.float(), positions, inverse=True).reshape(T, G, -1)
        latent = torch.cat([torch.einsum("tgd,gdr->tgr", k_pre - p.k_bias, p.k_basis),
                            torch.einsum("tgd,gdr->tgr", v.float().reshape(T, G, -1) - p.v_bias, p.v_basis)], -1)
        latent = torch.nn.functional.pad(latent, (0, 2 * m * chunk - latent.shape[-1]))
        chunks = latent.view(T, G, m, 2, chunk).permute(0, 2, 1, 3, 4).reshape(T * m, G, 2, chunk)
        self.write(slots, chunks[:, :, 0], chunks[:, :, 1], positions.repeat_interleave(m))

    # --- attention's reads and writes: latents in, keys rebuilt, outputs through the value basis

    ragged = False
    eager_decode_reason = "its decode attends in groups of similar length, which change from step to step"

    def write_decode(self, layer: int, slots: torch.Tensor, k, v, positions):
        """slots [G, b * most]: each sequence reserved the most slots any layer takes, this one's first."""
        m, b = self.slot_counts[layer], len(positions)
        self.store(layer, slots.view(self.num_kv_heads, b, -1)[:, :, :m].reshape(self.num_kv_heads, b * m), k, v,
                   positions)

    def attend_decode(self, layer: int, q, positions, group: list[torch.Tensor], sliding_window):
        tables, lengths = (t[layer] for t in group)
        return self._attend(layer, q[:, None], positions[:, None], tables, lengths, sliding_window)[:, 0], \
            self.read_bytes(lengths)

    def write_prefill(self, seq_id: int, layer: int, k, v, positions):
        slots = self.append_slots(seq_id, len(k), layers=slice(layer, layer + 1))[0]
        self.store(layer, slots.to(self.pool.device), k, v, positions)

    def attend_prefill(self, seq_id: int, layer: int, q, q_pos, sliding_window, column_sums: bool = False,
                       merged: bool = True, new_kv: tuple | None = None):
        return self._attend(layer, q[None], q_pos[None], *self.held(seq_id, layer), sliding_window)[0], None

    def _attend(self, layer: int, q, q_pos, tables, lengths, sliding_window):
        """Queries [B, T, Hq, D] over the keys rebuilt from the latents and the value latents
        (kernels.latent_attention), then through the value basis."""
        p, pool = self.layers[layer], self.pool
        # the newest held token is the newest query (its K/V were written first)
        cos, sin = self.table_for(q_pos)
        out = self.kernels.latent_attention(q, q_pos, pool.k, pool.v, pool.pos, tables, lengths,
                                            self.slot_counts[layer], p.k_basis, p.k_bias, p.ranks, cos, sin,
                                            sliding_window)
        return self.values_out(layer, out).to(q.dtype)

    def read(self, layer: int, tables: torch.Tensor, lengths: torch.Tensor):
        """What B sequences' groups at `layer` hold: tables [B, G, nb], lengths [B, G] in slots ->
        keys rebuilt from their latents (after RoPE) [B, H, S, D] float32, each head's value latents
        [B, H, S, r_v] (its group's), positions [B, H, S], tokens held [B, H]
        (kernels.reference.latent_keys: what the attention reads)."""
        p, pool = self.layers[layer], self.pool
        cos, sin = self.rope_tables(int(pool.pos.max()))  # covers every position any slot holds
        return latent_keys(pool.k, pool.v, pool.pos, tables, lengths, self.slot_counts[layer], p.k_basis,
                           p.k_bias, p.ranks, cos, sin)

    def values_out(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """Attention outputs over value latents [..., Hq, r_v] -> [..., Hq, D]: each query head's
        through its kv-head's rows of the value basis, plus that head's bias."""
        p, H = self.layers[layer], self.model_kv_heads
        rows = p.v_basis.reshape(H, -1, p.v_basis.shape[-1])                                   # [H, D, r_v]
        Hq = out.shape[-2]
        grouped = out.float().unflatten(-2, (H, Hq // H))                                        # [..., H, g, r_v]
        return (torch.einsum("...hgr,hdr->...hgd", grouped, rows) + p.v_bias.reshape(H, 1, -1)).flatten(-3, -2)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """RoPE on x [..., H, D] at positions [...] (one per token, the same for its heads), in
        float32; `inverse` takes it off."""
        cos, sin = self._cos_sin(positions.flatten())
        rotated = apply_rope(x.reshape(-1, *x.shape[-2:]), cos, -sin if inverse else sin)
        return rotated.view(x.shape)

    def _cos_sin(self, positions: torch.Tensor):
        """cos and sin [N, D] at `positions`."""
        cos, sin = self.table_for(positions)
        return cos[positions], sin[positions]

    def expect_positions(self, last: int):
        """A step's newest position, from the host: the table grows now, so that the step's
        layers look positions up without reading their largest back from the device."""
        self.newest_position = last if self.newest_position is None else max(self.newest_position, last)
        self.rope_tables(self.newest_position)

    def table_for(self, positions: torch.Tensor):
        """RoPE's table covering `positions`: as far as the steps announced (expect_positions), else
        (a caller outside a step) as far as their largest."""
        if self.newest_position is not None:
            return self.rope_tables(self.newest_position)
        return self.rope_tables(int(positions.max()) if positions.numel() else 0)

    def rope_tables(self, last_position: int):
        """RoPE's cos and sin [P, D] float32 for positions 0 .. P - 1 >= last_position: a table grown
        as positions grow, since every layer reads every held token's at every step, and sin and
        cos cost more than a lookup."""
        if self._table is None or len(self._table[0]) <= last_position:
            size = max(last_position + 1, 2 * len(self._table[0]) if self._table is not None else 1024)
            self._table = rope_cos_sin(torch.arange(size, device=self.pool.device), self.inv_freq, torch.float32)
        return self._table

    # --- accounting -------------------------------------------------------------------

    def theoretical_bytes(self, seq_id: int) -> int:
        """Each token's latents (r_k + r_v numbers of each group) and one int32 position, with no
        block rounding and no chunk padding."""
        lengths = self.seqs[seq_id].lengths                                        # [L, G] slots
        tokens = lengths // self.slots_per_token[:, None]
        per_token = torch.tensor([sum(l.ranks) * self.pool.dtype.itemsize + 4 for l in self.layers], device=HOST)
        return int((tokens * per_token[:, None]).sum())
