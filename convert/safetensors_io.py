"""Streaming safetensors I/O: read row ranges of input tensors, write output shards tensor block by block.

``mx.load`` materializes whole tensors, and a single routed-expert tensor of Maverick is 21 GB in bfloat16, so the
converter reads rows ``[a:b]`` (experts, or output rows) with plain file reads (no mmap: pages read this way stay in
the page cache instead of counting against the process) and writes each block of output rows at its final offset
in a preallocated shard file. Peak memory is then about one block, not one tensor or one shard.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data; offsets are
relative to the end of the header, tensors are C-contiguous.
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

from mlx_llama4.weights import CheckpointError, TensorInfo

# safetensors dtype -> (numpy dtype used to hold the bytes, mlx dtype of the result)
_READ_DTYPES = {
    "BOOL": (np.bool_, mx.bool_),
    "U8": (np.uint8, mx.uint8),
    "I8": (np.int8, mx.int8),
    "U16": (np.uint16, mx.uint16),
    "I16": (np.int16, mx.int16),
    "U32": (np.uint32, mx.uint32),
    "I32": (np.int32, mx.int32),
    "U64": (np.uint64, mx.uint64),
    "I64": (np.int64, mx.int64),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),  # numpy has no bfloat16: read the bits, view them in mlx
    "F32": (np.float32, mx.float32),
    "F8_E4M3": (np.uint8, mx.uint8),  # float8 e4m3 bytes; weights.py dequantizes them with their scales
}
_WRITE_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.uint32: "U32",
    mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64", mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
}
_MAX_HEADER = 100 * 1024 * 1024


def _nbytes(shape, dtype: mx.Dtype) -> int:
    return math.prod(shape) * dtype.size


class SafetensorsFile:
    """One safetensors file, header parsed and checked against the file size; tensors read by row ranges."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated or not a safetensors file ({self.size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > self.size:
                raise CheckpointError(f"{self.path}: truncated or not a safetensors file (header length {n}, "
                                      f"file size {self.size})")
            raw = f.read(n)
        self.header_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, t in header.items():
            try:
                dtype, shape, (begin, end) = t["dtype"], tuple(int(d) for d in t["shape"]), t["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for {name!r}") from None
            if dtype not in _READ_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            if end - begin != math.prod(shape) * np.dtype(_READ_DTYPES[dtype][0]).itemsize or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} data offsets do not match its shape {shape}")
            self.tensors[name] = (dtype, shape, begin, end)
            end_max = max(end_max, end)
        if self.data_start + end_max > self.size:
            raise CheckpointError(
                f"{self.path}: truncated: its header describes {self.data_start + end_max} bytes but the file has "
                f"{self.size}; download or copy it again"
            )

    def info(self, name: str) -> TensorInfo:
        dtype, shape, _, _ = self.tensors[name]
        return TensorInfo(shape, _READ_DTYPES[dtype][1])

    def read(self, name: str, a: Optional[int] = None, b: Optional[int] = None) -> mx.array:
        dtype, shape, begin, end = self.tensors[name]
        np_dtype, mx_dtype = _READ_DTYPES[dtype]
        if a is not None and shape:
            a, b = max(0, a), min(shape[0], b)
            row = (end - begin) // shape[0] if shape[0] else 0
            begin, end, shape = begin + a * row, begin + b * row, (b - a,) + shape[1:]
        buf = np.empty(shape, dtype=np_dtype)
        view = memoryview(buf.reshape(-1).view(np.uint8)) if buf.size else memoryview(b"")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            got = 0
            while got < end - begin:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
                got += n
        out = mx.array(buf)
        return out.view(mx_dtype) if dtype == "BF16" else out


class CheckpointReader:
    """The safetensors shards of a checkpoint folder (those its index names, else every ``*.safetensors``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        unlisted: list[str] = []
        weight_map = None
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            names = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in names if not (self.path / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
            unlisted = sorted(p.name for p in self.path.glob("*.safetensors") if p.name not in set(names))
        else:
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not names:
                raise CheckpointError(f"no *.safetensors files in {self.path}")
        self.files = [SafetensorsFile(self.path / n) for n in names]
        self.unlisted = unlisted  # shards in the folder that the index does not name (not read)
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.tensors:
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} is in both {self._where[name].path.name} and {f.path.name}")
                self._where[name] = f
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self._where or self._where[name].path.name != fname:
                    where = self._where[name].path.name if name in self._where else "no shard"
                    raise CheckpointError(f"{index}: says {name!r} is in {fname}, but it is in {where}")

    def info(self) -> dict[str, TensorInfo]:
        return {name: f.info(name) for name, f in self._where.items()}

    def get(self, name: str, a: Optional[int] = None, b: Optional[int] = None) -> mx.array:
        return self._where[name].read(name, a, b)

    def fingerprint(self) -> list:
        """What identifies the input for resuming: each shard's resolved path, size, mtime and header hash."""
        out = []
        for f in self.files:
            st = os.stat(f.path)
            out.append([os.path.realpath(f.path), st.st_size, st.st_mtime_ns, f.header_sha256])
        return out

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


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
