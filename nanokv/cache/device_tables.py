"""DeviceTables: every sequence's block tables, mirrored on the pool's device and kept current by
edits, so that a decode step does not rebuild and send [L, b, H, nb] tables from the host.

The host's tables (kv_cache.SequenceKV) stay the source of truth: the scheduler and the cache read
them in Python. Each sequence also owns a row of one device tensor `tables` [L, rows, H, capacity]
that holds the same block ids, -1 past each head's blocks. When the host's tables change (blocks
appended, a compaction's tail freed, a sequence freed) the cache records the entries it changed
(`record`); the next decode step sends them with its other inputs, in one copy, and `apply` writes
them into the mirror. A step then reads its batch's tables with one gather of their rows.

A decode step allocates a block for a head once every block_size tokens, so the edits a step sends
are a few entries per sequence, not the whole table. Row 0 is never handed out: it stays -1, a row
that holds nothing. Block ids are int32 here (half the bytes of a mirror sized for every running
sequence); a gather hands the kernels int64, which they multiply by block strides without overflow.

The mirror grows by doubling, up to the rows and columns the engine set memory aside for (`bound`:
every running sequence at the model's context), so `most_bytes` is what it can ever take.
"""

from __future__ import annotations

import torch

from nanokv.cache.pool import HOST


class DeviceTables:
    def __init__(self, num_layers: int, num_kv_heads: int, device):
        self.num_layers, self.num_kv_heads, self.device = num_layers, num_kv_heads, torch.device(device)
        self.tables = torch.full((num_layers, 1, num_kv_heads, 4), -1, dtype=torch.int32, device=self.device)
        self.rows: dict[int, int] = {}
        self.free_rows: list[int] = []
        self.next_row = 1  # row 0 is the empty row
        self.edits: list[tuple[torch.Tensor, ...]] = []  # (layers, rows, heads, columns, block ids), on the host
        self.most_rows: int | None = None     # what doubling stops at (bound); None: no limit
        self.most_columns: int | None = None
        self.sending = 0  # how many of `edits` the last `pending` covered: `apply` drops them

    def bound(self, rows: int, columns: int):
        """Grow by doubling up to `rows` rows (the empty one included) and `columns` columns only
        (past them, to exactly what is asked): the mirror then takes at most `most_bytes`."""
        self.most_rows, self.most_columns = rows, columns

    @staticmethod
    def most_bytes(num_layers: int, num_kv_heads: int, rows: int, columns: int) -> int:
        """The bytes of a mirror of `rows` rows and `columns` columns."""
        return num_layers * rows * num_kv_heads * columns * 4  # int32 block ids

    def add(self, seq_id: int, row: int | None = None):
        """Give a new sequence a row (`row`: the one it holds in another mirror of the same cache,
        a cold tier's, so one row index reads both)."""
        if row is None:
            row = self.free_rows.pop() if self.free_rows else self._new_row()
        self.rows[seq_id] = row
        self._grow(row + 1, 0)

    def _new_row(self) -> int:
        self.next_row += 1
        return self.next_row - 1

    def remove(self, seq_id: int, tables: torch.Tensor, num_blocks: torch.Tensor):
        """Free a sequence's row, setting the blocks it held back to -1 (the row's next owner starts
        from an empty table)."""
        row = self.rows.pop(seq_id)
        held = torch.arange(tables.shape[-1], device=HOST) < num_blocks[..., None]
        self.record_freed(seq_id, held, row=row)
        self.free_rows.append(row)

    def record_placed(self, seq_id: int, heads: torch.Tensor, cols: torch.Tensor, ids: torch.Tensor,
                      first_layer: int):
        """What kv_cache.place_blocks did: block ids `ids` went to flat heads `heads` (l * H + h of
        the layers from `first_layer`) at columns `cols`."""
        H = self.num_kv_heads
        self.record(seq_id, torch.stack([heads // H, heads % H, cols], dim=1), ids, first_layer)

    def record_freed(self, seq_id: int, freed: torch.Tensor, first_layer: int = 0, row: int | None = None):
        """The entries `freed` [L', H, capacity] (bool) of the sequence's tables hold no block now (-1)."""
        where = freed.nonzero()
        self.record(seq_id, where, torch.full((len(where),), -1, dtype=torch.int64, device=HOST), first_layer, row)

    def record(self, seq_id: int, where: torch.Tensor, ids: torch.Tensor, first_layer: int = 0,
               row: int | None = None):
        """The sequence's table entries `where` [n, 3] (layer - first_layer, head, column) now hold
        block ids `ids` [n]."""
        if len(ids):
            row = self.rows[seq_id] if row is None else row
            self.edits.append((where[:, 0] + first_layer, torch.full_like(ids, row), where[:, 1], where[:, 2], ids))

    def pending(self) -> list[torch.Tensor]:
        """The edits recorded since the last `apply`, as host tensors [flat indices into `tables`,
        block ids] (none: an empty list), the last edit of an entry winning. The mirror grows first to
        hold every row and column they name. They stay recorded until `apply` has written them: a step
        that fails between the two sends them again with the next."""
        self.sending = len(self.edits)
        if not self.edits:
            return []
        layers, rows, heads, cols, ids = (torch.cat(parts) for parts in zip(*self.edits))
        self._grow(0, int(cols.max()) + 1)
        _, R, H, C = self.tables.shape
        flat = ((layers * R + rows) * H + heads) * C + cols
        index, inverse = torch.unique(flat, return_inverse=True)
        last = torch.full_like(index, -1).scatter_reduce(0, inverse, torch.arange(len(flat), device=HOST), "amax")
        return [index, ids[last].to(torch.int32)]

    def apply(self, index: torch.Tensor, ids: torch.Tensor):
        """Write what `pending` returned (sent to the device) into the mirror."""
        self.tables.view(-1)[index] = ids.to(self.tables.dtype)
        del self.edits[:self.sending]
        self.sending = 0

    def sync(self):
        """Apply the pending edits at once (outside a decode step, which sends them with its inputs)."""
        edits = self.pending()
        if edits:
            self.apply(*(t.to(self.device) for t in edits))

    def gather(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """The tables of rows `rows` [b] (on the device), cut to `width` columns -> [L, b, H, width]."""
        return self.tables[:, rows, :, :width].long()

    def _grow(self, rows: int, columns: int):
        """Widen the mirror (doubling) to at least `rows` rows and `columns` columns, -1 where new."""
        L, R, H, C = self.tables.shape
        if rows <= R and columns <= C:
            return

        def doubled(want: int, have: int, most: int | None) -> int:
            return have if want <= have else max(want, min(2 * have, most or 2 * have))

        grown = torch.full((L, doubled(rows, R, self.most_rows), H, doubled(columns, C, self.most_columns)), -1,
                           dtype=torch.int32, device=self.device)
        grown[:, :R, :, :C] = self.tables
        self.tables = grown
