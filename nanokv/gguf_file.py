"""A minimal GGUF reader: metadata as plain Python values, tensors as memory-mapped bytes.

Why not `gguf.GGUFReader`? It builds a numpy view per array element, so the tokenizer
arrays of a Qwen vocabulary (150k strings, 150k merges) take over ten seconds to parse.
The format is simple enough to read directly (header, key/value pairs, tensor infos,
aligned data); dequantization is still the `gguf` package's job (see `dequantize`).

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 kv count;
each kv = string key, u32 type, value; each tensor info = string name, u32 n_dims,
u64 dims[n_dims] (fastest-varying first), u32 ggml type, u64 offset into the data
section, which starts at the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# GGUF value type id -> struct format of a scalar of that type.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    pass


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]   # numpy order: rows first (the reverse of GGUF's dims)
    type_name: str           # ggml type, e.g. "Q4_K"
    data: np.ndarray         # raw bytes, [rows, bytes per row]


class GGUFFile:
    def __init__(self, path: str | Path):
        import gguf  # for the ggml type table (block sizes and names)

        self.path = Path(path)
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._mv = memoryview(self._buf)
        self._pos = 0
        if bytes(self._mv[:4]) != b"GGUF":
            raise GGUFError("not a GGUF file (bad magic)")
        self._pos = 4
        version, n_tensors, n_kv = self._unpack("<IQQ")
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version}; supported: 2, 3")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I")[0])
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")[0]
            dims = self._unpack(f"<{n_dims}Q")
            type_id, offset = self._unpack("<IQ")
            infos.append((name, dims, type_id, offset))
        alignment = self.metadata.get("general.alignment", 32)
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = []
        for name, dims, type_id, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise GGUFError(f"tensor {name} has unknown ggml type id {type_id}") from None
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            cols = dims[0]
            rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
            row_bytes = cols // block * block_bytes
            start = data_start + offset
            end = start + rows * row_bytes
            if end > len(self._buf):
                raise GGUFError(f"truncated: tensor {name} ends at byte {end}, file has {len(self._buf)}")
            shape = tuple(reversed(dims))
            self.tensors.append(GGUFTensor(name, shape, qtype.name, self._buf[start:end].reshape(rows, row_bytes)))

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._buf):
            raise GGUFError("truncated header")
        values = struct.unpack_from(fmt, self._mv, self._pos)
        self._pos += size
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self._pos + n > len(self._buf):
            raise GGUFError("truncated header")
        s = bytes(self._mv[self._pos:self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, type_id: int):
        if type_id in _SCALARS:
            return self._unpack("<" + _SCALARS[type_id])[0]
        if type_id == _STRING:
            return self._string()
        if type_id == _ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type in _NUMPY:  # numeric arrays in one read
                size = np.dtype(_NUMPY[item_type]).itemsize * count
                if self._pos + size > len(self._buf):
                    raise GGUFError("truncated header")
                arr = np.frombuffer(self._mv, _NUMPY[item_type], count, self._pos)
                self._pos += size
                return arr.tolist()
            return [self._value(item_type) for _ in range(count)]
        raise GGUFError(f"unknown metadata value type {type_id}")


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """Any supported ggml type -> float32 array of `tensor.shape`."""
    import gguf

    qtype = gguf.GGMLQuantizationType[tensor.type_name]
    return gguf.quants.dequantize(tensor.data, qtype).astype(np.float32, copy=False).reshape(tensor.shape)
