"""BlockPool: one pool of head-blocks.

A block holds `block_size` tokens of ONE kv-head of ONE layer (the layout of KV-Compress):
K and V as `[num_blocks, block_size, head_dim]`, plus the original position of every slot.
Because each (sequence, layer, kv-head) owns its own blocks, a method that keeps fewer tokens
in one head or one layer returns whole blocks to the pool.

Every per-slot tensor is a *slot field* ("k", "v", "pos", and whatever a method registers,
e.g. accumulated attention scores); compaction moves all fields together, so metadata rides
with its token. Other block kinds (quantized, low-rank) will add fields of their own.
"""

from __future__ import annotations

import torch

# Where the bookkeeping lives: block tables, lengths and the free list stay in host memory, since
# the scheduler and the cache read them in Python every step. K, V and every slot field live on
# the pool's device, and so does a mirror of the tables, kept current by edits (device_tables.py).
HOST = torch.device("cpu")
DEFAULT_BLOCK_SIZE = 16  # tokens a full-precision block holds unless the user says otherwise


class OutOfBlocks(RuntimeError):
    """The pool cannot serve an allocation. The scheduler checks free blocks before every step
    (and preempts when they run short), so this only fires when that check was wrong."""


class BlockPool:
    # a prefix cache's unused blocks (prefix_cache.py): held, but free to take back when needed, so
    # they count as free; `reclaim(n)` (set by the prefix cache) gives at least n of them back
    cached_free = 0
    reclaim = None

    def __init__(self, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", extra_fields: dict[str, torch.dtype] | None = None,
                 key_bounds: bool = False, pin: bool = False):
        """pin: page-locked host memory (a host tier whose device is CUDA: copies to and from it
        can be asynchronous)."""
        if num_blocks <= 0:
            raise ValueError(f"the KV-cache pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks, self.block_size, self.head_dim = num_blocks, block_size, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_blocks, block_size)
        # Attention reads whole blocks and masks the slots past a head's length, so every slot
        # it can reach must hold a finite number (0 * NaN is NaN): blocks are zeroed when handed
        # out, and block 0, which padded block-table entries point at, is zeroed now. The rest
        # stays untouched (on CPU, unused pool memory costs nothing until written).
        self.fields: dict[str, torch.Tensor] = {
            "k": torch.empty(*shape, head_dim, dtype=dtype, device=device, pin_memory=pin),
            "v": torch.empty(*shape, head_dim, dtype=dtype, device=device, pin_memory=pin),
            "pos": torch.zeros(*shape, dtype=torch.int32, device=device, pin_memory=pin),
        }
        for name, field_dtype in (extra_fields or {}).items():  # a method's per-token state
            self.fields[name] = torch.zeros(*shape, dtype=field_dtype, device=device)
        self.fields["k"][0] = 0
        self.fields["v"][0] = 0
        # Per-block metadata: with key_bounds, the per-channel min and max of the keys a block
        # holds (Quest's page summary), kept up to date by the cache on every write and compaction.
        self.block_fields: dict[str, torch.Tensor] = {}
        if key_bounds:
            self.block_fields = {name: torch.zeros(num_blocks, head_dim, dtype=dtype, device=device)
                                 for name in ("kmin", "kmax")}
        self._init_free_list(num_blocks)

    def _init_free_list(self, num_blocks: int, first: int = 0):
        """A stack of free block ids from `first` on; allocate pops from the top, free pushes back.
        Both keep the order of the ids they move (the top slice is handed out reversed, and freed
        ids go back reversed), so one allocation out of a fresh pool, or out of what one free gave
        back, is ascending neighbouring blocks: a head's prefill then lies in one run of memory,
        which the CPU reads ~1.5x faster than scattered blocks (decode attention, measured)."""
        self._free = torch.arange(num_blocks - 1, first - 1, -1, dtype=torch.int64, device=HOST)
        self._num_free = num_blocks - first
        self.usable_blocks = num_blocks - first  # what sequences may hold, less what set_aside took
        self._in_use = torch.zeros(num_blocks, dtype=torch.bool, device=HOST)  # guards double frees

    # --- fields -----------------------------------------------------------------------

    @property
    def k(self) -> torch.Tensor:
        return self.fields["k"]

    @property
    def v(self) -> torch.Tensor:
        return self.fields["v"]

    @property
    def pos(self) -> torch.Tensor:
        return self.fields["pos"]

    # --- allocation -------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can have: the free stack, and a prefix cache's unused blocks."""
        return self._num_free + self.cached_free

    @property
    def num_used(self) -> int:
        # set-aside blocks hold no sequence's tokens; a prefix cache's unused ones count as free
        return self.usable_blocks - self.num_free

    def allocate(self, n: int) -> torch.Tensor:
        if n > self._num_free and self.reclaim is not None:
            self.reclaim(n - self._num_free)
        if n > self._num_free:
            raise OutOfBlocks(f"asked for {n} blocks, {self._num_free} free")
        ids = self._free[self._num_free - n:self._num_free].flip(0)
        self._num_free -= n
        self._in_use[ids] = True
        on_device = ids.to(self.device)
        self.fields["k"][on_device] = 0
        self.fields["v"][on_device] = 0
        if self.block_fields:  # empty bounds, which the first write replaces
            self.block_fields["kmin"][on_device] = torch.finfo(self.dtype).max
            self.block_fields["kmax"][on_device] = torch.finfo(self.dtype).min
        return ids

    def clone_blocks(self, src: torch.Tensor) -> torch.Tensor:
        """Fresh blocks holding copies of blocks `src` (every slot field and block field) -> their ids:
        what a sequence appends to instead of a shared block."""
        ids = self.allocate(len(src))
        to, frm = ids.to(self.device), src.to(self.device)
        for field in [*self.fields.values(), *self.block_fields.values()]:
            field[to] = field[frm]
        return ids

    def set_aside(self) -> int:
        """Take one block out of circulation for good -> its id: a scratch that no table holds (a CUDA
        graph's padding rows write there). It is the bottom of the free stack, the last one
        `allocate` would hand out: on a fresh pool the highest id, so the ascending runs allocations
        take stay whole, and never block 0 (which the plain-torch gathers read for -1 table entries,
        so it must hold finite numbers). Not counted as used: it holds no sequence's tokens."""
        if self._num_free == 0 or int(self._free[0]) == 0:
            raise ValueError(f"the KV-cache pool of {self.num_blocks} blocks has none free to set aside as a "
                             "scratch block; raise kv_cache_memory")
        kept = int(self._free[0])
        self._free[:self._num_free - 1] = self._free[1:self._num_free].clone()
        self._num_free -= 1
        self._in_use[kept] = True
        self.usable_blocks -= 1
        return kept

    def slot_index(self, slots: torch.Tensor):
        """Flat slots (block * block_size + offset) as an index into any slot field, to read and to
        assign: `field[pool.slot_index(slots)]`. Works on strided fields too (a quantized pool keeps
        every field of a block in one row, so its fields cannot be flattened to slots). Slots
        worked out from the HOST's block tables move to the pool's device here."""
        slots = slots.to(self.device)
        return slots // self.block_size, slots % self.block_size

    def read_slots(self, slots: torch.Tensor, name: str) -> torch.Tensor:
        """Field `name` at flat slots of any shape -> [*slots.shape, *per-slot shape]: one index_select
        over the field's slot rows (on a CPU ~6x faster than indexing by block and offset); a
        strided field (a quantized pool's, whose blocks are not one run of slots) by block and offset."""
        field = self.fields[name]
        if field.is_contiguous():
            rows = field.view(-1, *field.shape[2:]).index_select(0, slots.to(self.device).flatten())
            return rows.view(*slots.shape, *field.shape[2:])
        return field[self.slot_index(slots)]

    def free(self, ids: torch.Tensor):
        ids = ids.to(HOST)
        if len(ids) == 0:
            return
        if not bool(self._in_use[ids].all()) or len(torch.unique(ids)) != len(ids):
            raise RuntimeError("freeing a block that is not allocated (double free)")
        self._in_use[ids] = False
        self._free[self._num_free:self._num_free + len(ids)] = ids.flip(0)
        self._num_free += len(ids)

    # --- bytes ------------------------------------------------------------------------

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block, every slot field and block field counted (what a method saves when
        it frees one)."""
        return sum(f[0].numel() * f.element_size() for f in [*self.fields.values(), *self.block_fields.values()])

    @staticmethod
    def block_bytes(block_size: int, head_dim: int, dtype: torch.dtype,
                    extra_fields: dict[str, torch.dtype] | None = None, key_bounds: bool = False) -> int:
        """bytes_per_block of a pool not built yet: K and V, the int32 positions, extra fields,
        and the key bounds."""
        per_slot = 2 * head_dim * dtype.itemsize + torch.int32.itemsize
        per_slot += sum(d.itemsize for d in (extra_fields or {}).values())
        return block_size * per_slot + (2 * head_dim * dtype.itemsize if key_bounds else 0)

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def used_bytes(self) -> int:
        return self.num_used * self.bytes_per_block



# --- pools whose rows serve two block kinds (quant_pool.py, pruned_pool.py) ----------------

def row_views(arena: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
    """Strided views [num_blocks, *shape] into the byte rows of `arena` [num_blocks, row bytes],
    one per field of `layout` {name: (dtype, shape per block)}, one after another (4-aligned)."""
    views, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        size = dtype.itemsize * numel(shape)
        views[name] = arena[:, offset:offset + size].view(dtype).unflatten(1, shape)
        offset = align(offset + size)
    assert offset <= arena.shape[1]
    return views


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def align(n: int, to: int = 4) -> int:
    return (n + to - 1) // to * to


def pool_blocks(kv_cache_memory: int, per_block: int, per_token: int, reserved: int = 0) -> int:
    """How many blocks of `per_block` bytes `kv_cache_memory` bytes hold; an error if not enough
    for one token (`per_token` blocks) and the `reserved` ones (a pool that never hands out block 0)."""
    num_blocks = int(kv_cache_memory // per_block)
    if num_blocks < per_token + reserved:
        more = f" and {reserved} more reserved" if reserved else ""
        raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes holds {num_blocks} blocks; one token of "
                         f"this model needs {per_token} blocks ({per_token * per_block} bytes){more}")
    return num_blocks
