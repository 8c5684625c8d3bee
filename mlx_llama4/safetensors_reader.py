"""The safetensors shards of a checkpoint folder, read strictly: the loader and the converter both read through here.

A folder holds either ``model.safetensors.index.json``, whose ``weight_map`` names the shard of every tensor, or
one or more ``*.safetensors`` files. Everything that does not add up is refused with an error that names the file:
an index that is not JSON or has no ``weight_map`` object, shards the index names but the folder lacks, a tensor
in two shards, an index entry that points to the wrong shard, a header that is not JSON, an unknown dtype, data
offsets that do not match a tensor's shape, a file shorter than its header says. Shards in the folder that the
index does not name are not read (``CheckpointReader.unlisted``).

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data; offsets are
relative to the end of the header, tensors are C-contiguous.

Tensors are read by row ranges with plain file reads (``SafetensorsFile.read``), so the converter can stream a
21 GB expert tensor a block of rows at a time; the loader reads whole files with ``mx.load`` once they passed here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .weights import CheckpointError, TensorInfo

INDEX_FILE = "model.safetensors.index.json"
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
_MAX_HEADER = 100 * 1024 * 1024


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a ``model.safetensors.index.json``."""
    try:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    return weight_map


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
        index = self.path / INDEX_FILE
        unlisted: list[str] = []
        weight_map = None
        if index.exists():
            weight_map = read_index(index)
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


