"""The last R queries' attention rows, kept as a ring of R slot fields (ALISA, Inf-MLLM, MorphKV).

Methods that rank keys by what the R most recent queries gave them need each of those rows, not a
running sum: a row must leave the ranking exactly R steps after it came, and a sum cannot
subtract what it did not store. So field k of every slot holds the row of the query whose position
is k mod R (4R bytes a token and head). A field is trusted only for a query the key was there to
see (ring_positions and the masks below): a slot may hold stale fields of a token evicted or moved
before, and a slot written at prefill holds zeros in the fields no prompt query wrote.
"""

import torch

from nanokv.methods.base import DecodeEvictor, PrefillView, observation_attention


def ring_fields(prefix: str, size: int) -> dict[str, torch.dtype]:
    return {f"{prefix}{k}": torch.float32 for k in range(size)}


def prompt_ring(names: list[str], rows: torch.Tensor, positions: list[int]) -> dict[str, torch.Tensor]:
    """The ring after a prompt: rows [H, W, S] of the queries at `positions` (W of them, the
    prompt's last), each in the field of its position mod R; zeros in the others."""
    H, _, S = rows.shape
    state = {name: torch.zeros(H, S, device=rows.device) for name in names}
    for j, position in enumerate(positions):
        state[names[position % len(names)]] = rows[:, j]
    return state


def ring_positions(query_position: torch.Tensor, size: int) -> torch.Tensor:
    """[size, *query_position.shape]: the position of the query whose row ring field k holds, the
    newest position <= query_position that is k mod size (negative: no such query yet)."""
    k = torch.arange(size, device=query_position.device).view(-1, *[1] * query_position.dim())
    return query_position[None] - (query_position[None] - k) % size


def ring_write(state: dict, names: list, row: torch.Tensor, query_position: torch.Tensor) -> dict:
    """The ring after the query at query_position [B] wrote its row [B, H, S] into field
    (position mod len(names))."""
    at = (query_position % len(names))[:, None, None]
    return {name: torch.where(at == k, row, state[name]) for k, name in enumerate(names)}


def windowed_sum(rows: torch.Tensor, row_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """rows [R, ..., S]: the ring's rows; row_positions [R, ..., 1] their queries' positions
    (ring_positions) -> [..., S]: each key's attention summed over the ring's queries that saw it."""
    return rows.masked_fill(key_positions[None] > row_positions, 0.0).sum(dim=0)


class QueryRingEvictor(DecodeEvictor):
    """Scores each key by the attention the last R queries gave it, summed (the group's query heads
    averaged, GQA): at prefill the prompt's last R queries, then a ring of R slot fields written
    one query a step. ALISA and Inf-MLLM are this score with their own recent windows."""
    ring_prefix = ""

    def ring_size(self) -> int:
        raise NotImplementedError

    def __init__(self, compression: float = 0.0, budget: int | None = None, **options):
        super().__init__(compression, budget, **options)
        self.slot_fields = ring_fields(self.ring_prefix, self.ring_size())

    def prefill_state(self, view: PrefillView) -> dict[str, torch.Tensor]:
        """The attention of the prompt's last min(R, T) queries, each in the field of its position
        mod R (0 in the others)."""
        H = view.keys.shape[0]
        window = min(self.ring_size(), len(view.queries))
        attention = observation_attention(view, window).unflatten(0, (H, -1)).mean(dim=1)  # [H, W, S]: GQA mean
        return prompt_ring(list(self.slot_fields), attention, view.positions[-window:].tolist())

    def scores(self, view: PrefillView) -> torch.Tensor:
        rows = torch.stack(list(self.state_of(view).values()))                   # [R, H, S]
        row_positions = ring_positions(view.positions[-1], self.ring_size()).view(-1, 1, 1)
        return self.protect_recent(windowed_sum(rows, row_positions, view.positions))

    def decode_scores(self, probs, state, step):
        state = ring_write(state, list(self.slot_fields), probs.mean(dim=2), step.positions)
        rows = torch.stack(list(state.values()))                                  # [R, B, H, S]
        row_positions = ring_positions(step.positions[:, None, None], self.ring_size())
        return windowed_sum(rows, row_positions, step.key_positions), state
