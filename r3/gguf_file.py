"""A GGUF file's metadata and tensor table, read in one pass with ``struct``.

The ``gguf`` package's reader builds a numpy view per array item: for a 49k-token vocabulary
(tokens, merges, token types) that is seconds of Python on every model or tokenizer load. Here
scalars and strings are read directly, numeric arrays are one ``frombuffer`` each, and tensor data
stay memory-mapped views laid out as ``gguf`` lays them out (its dequantisers take them as they are).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8

# GGUF metadata value types: scalars by struct format, then string (8) and array (9).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# Unquantised tensor types whose data are read as typed elements (others: raw bytes per row).
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands, or is cut short."""


@dataclass
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    data: np.ndarray  # read-only view of the file; quantised types as bytes, one row per last axis


@dataclass
class GGUFFile:
    path: Path
    version: int
    fields: dict[str, Any]  # scalars as Python values, strings as str, arrays as lists or numpy arrays
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFError(f"cut short at byte {self.pos}") from None
        self.pos += struct.calcsize("<" + fmt)
        return values if len(fmt) > 1 else values[0]

    def string(self, errors: str = "strict") -> str:
        n = self.take("Q")
        if n > self.size - self.pos:
            raise GGUFError(f"a string of {n} bytes at byte {self.pos - 8} runs past the end of the file")
        try:
            s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors)
        except UnicodeDecodeError:
            raise GGUFError(f"a string at byte {self.pos - 8} is not UTF-8") from None
        self.pos += n
        return s

    def value(self, kind: int, top: bool = True):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string(errors="strict" if top else "replace")
        if kind == _ARRAY and top:
            item, n = self.take("IQ")
            if item in _NUMPY:
                width = np.dtype(_NUMPY[item]).itemsize
                if n * width > self.size - self.pos:
                    raise GGUFError(f"an array of {n} items at byte {self.pos} runs past the end of the file")
                arr = np.frombuffer(self.buf, dtype=np.dtype(_NUMPY[item]).newbyteorder("<"), count=n,
                                    offset=self.pos).copy()
                self.pos += n * width
                return arr
            if n > (self.size - self.pos) // 8:  # (each item is at least a length)
                raise GGUFError(f"an array of {n} items at byte {self.pos} runs past the end of the file")
            return [self.value(item, top=False) for _ in range(n)]
        raise GGUFError(f"unknown metadata value type {kind} at byte {self.pos - 4}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse ``path``'s header, metadata and tensor table; tensor data are mapped, not read."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GGUFError("empty file") from None
    cur = _Cursor(buf)
    if bytes(buf[:4]) != MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.take("I")
    if version & 0xFFFF == 0 and version:
        raise GGUFError("big-endian GGUF files are not supported")
    if version not in VERSIONS:
        raise GGUFError(f"GGUF version {version} is not supported (supported: {', '.join(map(str, VERSIONS))})")
    n_tensors, n_fields = cur.take("QQ")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cur.string()
        if key in fields:
            raise GGUFError(f"metadata key '{key}' appears twice")
        fields[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        if n_dims > MAX_DIMS:
            raise GGUFError(f"tensor '{name}' has {n_dims} dimensions")
        dims = tuple(cur.take("Q") for _ in range(n_dims))
        kind, offset = cur.take("IQ")
        infos.append((name, dims, kind, offset))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment {alignment!r} is not a power of two")
    start = -(-cur.pos // alignment) * alignment
    tensors, names = [], set()
    for name, dims, kind, offset in infos:
        if name in names:
            raise GGUFError(f"tensor '{name}' appears twice")
        names.add(name)
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise GGUFError(f"tensor '{name}' has unknown type {kind}") from None
        n = math.prod(dims)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block:
            raise GGUFError(f"tensor '{name}' rows of {dims[0]} are not whole {qtype.name} blocks of {block}")
        np_shape = tuple(reversed(dims))
        if kind in _PLAIN:
            dtype, count = np.dtype(_PLAIN[kind]).newbyteorder("<"), n
        else:
            dtype, count = np.dtype(np.uint8), n // block * block_bytes
            np_shape = (*np_shape[:-1], np_shape[-1] // block * block_bytes) if np_shape else (count,)
        begin = start + offset
        if begin + count * dtype.itemsize > cur.size:
            raise GGUFError(f"tensor '{name}' runs past the end of the file")
        data = np.frombuffer(buf, dtype=dtype, count=count, offset=begin).reshape(np_shape)
        tensors.append(GGUFTensor(name, qtype, dims, data))
    return GGUFFile(path, version, fields, tensors)
