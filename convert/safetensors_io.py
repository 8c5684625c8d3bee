"""Streaming safetensors output: write shards tensor block by block, and a hash of each computed while writing.

A single routed-expert tensor of Maverick is 21 GB in bfloat16, so the converter reads rows ``[a:b]`` (experts, or
output rows) of its inputs (``mlx_llama4.safetensors_reader``) and writes each block of output rows at its final
offset in a preallocated shard file. Peak memory is then about one block, not one tensor or one shard. The file
format is described in ``mlx_llama4/safetensors_reader.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Optional

import mlx.core as mx
import numpy as np

from mlx_llama4.weights import TensorInfo

_WRITE_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.uint32: "U32",
    mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64", mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
}


def _nbytes(shape, dtype: mx.Dtype) -> int:
    return math.prod(shape) * dtype.size


class ShardWriter:
    """Writes one safetensors file whose tensors (names, shapes, dtypes) are known up front.

    The header goes first, the file is preallocated, and each block of rows is written at its final offset,
    so tensors can be produced in any order and in pieces.
    """

    def __init__(self, path: Path, tensors: Iterable[tuple[str, TensorInfo]], metadata: Optional[dict] = None):
        self.path = Path(path)
        header: dict = {"__metadata__": metadata or {"format": "mlx"}}
        self.offsets: dict[str, tuple[int, int, TensorInfo]] = {}
        pos = 0
        for name, info in tensors:
            if info.dtype not in _WRITE_DTYPES:
                raise ValueError(f"{name}: cannot write dtype {info.dtype}")
            n = _nbytes(info.shape, info.dtype)
            header[name] = {"dtype": _WRITE_DTYPES[info.dtype], "shape": list(info.shape), "data_offsets": [pos, pos + n]}
            row = n // info.shape[0] if info.shape and info.shape[0] else n
            self.offsets[name] = (pos, row, info)
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
        self.header = struct.pack("<Q", len(raw)) + raw
        self.data_start = len(self.header)
        self.size = self.data_start + pos
        self._hash = {name: hashlib.sha256() for name in self.offsets}
        self._next_row = dict.fromkeys(self.offsets, 0)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self.fd, self.size)
            os.pwrite(self.fd, self.header, 0)
        except BaseException:
            os.close(self.fd)
            raise
        self.written = 0

    def write_rows(self, name: str, a: int, value: mx.array) -> int:
        """Write ``value`` as rows ``[a : a + len(value)]`` of tensor ``name``; returns the bytes written."""
        begin, row, info = self.offsets[name]
        if tuple(value.shape[1:]) != tuple(info.shape[1:]) or value.dtype != info.dtype:
            raise ValueError(f"{name}: block {value.dtype} {tuple(value.shape)} does not fit {info.dtype} {info.shape}")
        if a != self._next_row[name]:
            raise ValueError(f"{name}: rows must be written in order (got row {a}, expected {self._next_row[name]})")
        self._next_row[name] += value.shape[0] if value.ndim else 1
        if value.dtype == mx.bfloat16:
            value = value.view(mx.uint16)
        data = np.ascontiguousarray(np.asarray(value))
        view, off = memoryview(data.reshape(-1).view(np.uint8)), self.data_start + begin + a * row
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], off + done)
        self._hash[name].update(view)
        self.written += done
        return done

    def digest(self) -> str:
        """``shard_digest`` of the file, computed from what was written (no second read)."""
        short = [n for n, (_, _, info) in self.offsets.items() if self._next_row[n] != (info.shape[0] if info.shape else 1)]
        if short:
            raise ValueError(f"{self.path.name}: tensors not completely written: {', '.join(short[:5])}")
        return _combine(self.header, [self._hash[n].digest() for n in self.offsets])

    def close(self, sync: bool = True) -> None:
        if self.fd >= 0:
            try:
                if sync:
                    os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1


def _combine(header: bytes, digests: list[bytes]) -> str:
    return hashlib.sha256(header + b"".join(digests)).hexdigest()


def shard_digest(path: Path, block: int = 16 << 20) -> str:
    """A sha256 of a safetensors file that can be computed while its tensors are written block by block in any
    interleaving: sha256(header bytes + the sha256 of each tensor's data, in file order). Bytes between or after
    tensors are not covered; the caller checks the file size."""
    with open(path, "rb", buffering=0) as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n)
        if len(head) < 8 or len(raw) < n:
            raise ValueError(f"{path}: truncated")
        header = json.loads(raw)
        header.pop("__metadata__", None)
        spans = sorted((t["data_offsets"][0], t["data_offsets"][1]) for t in header.values())
        buf = bytearray(block)
        view = memoryview(buf)
        digests = []
        for begin, end in spans:
            h = hashlib.sha256()
            f.seek(8 + n + begin)
            left = end - begin
            while left:
                got = f.readinto(view[: min(block, left)])
                if not got:
                    raise ValueError(f"{path}: truncated")
                h.update(view[:got])
                left -= got
            digests.append(h.digest())
    return _combine(head + raw, digests)
