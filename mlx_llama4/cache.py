"""KV caches for iRoPE attention, following mlx-lm's cache protocol (``offset``, ``state``, ``trim`` ...).

RoPE layers attend only within aligned chunks ``[kC, (k+1)C)``, so they keep the current chunk alone in a
buffer of at most ``C`` slots that restarts at every multiple of ``C``: no copy per decode step, and decode
attends only to the live keys. NoPE (global) layers keep every position in a ``GlobalCache``, sized once for a
known length (``reserve``) instead of copying their whole history every 256 positions as mlx-lm's ``KVCache``
does.

Trimming is exact or refused: once a RoPE layer has dropped an earlier chunk, restoring a position inside
that chunk is impossible, and saying so lets the caller re-prefill instead of computing wrong logits.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_map

from .mlx_lm_cache import BaseCache


def _leaves(x: Any) -> tuple:
    """A cache buffer is one array, or the (packed, scales, biases) triple of a quantized one."""
    return x if isinstance(x, tuple) else (x,)


class ChunkCache(BaseCache):
    """Keys and values of the current attention chunk, in a buffer of at most ``chunk_size`` positions."""

    step = 256  # growth granularity while the first chunk fills

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.keys: Any = None  # (B, KV, slots, Dh), slot = position % chunk_size
        self.values: Any = None
        self.offset = 0  # absolute number of positions seen

    def _encode(self, x: mx.array) -> Any:
        return x

    def _slots(self) -> int:
        return _leaves(self.keys)[0].shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Store ``L`` new positions and return the live keys/values of their chunk, oldest first."""
        L = keys.shape[2]
        start = self.offset % self.chunk_size
        end = start + L
        if end > self.chunk_size:
            raise ValueError(
                f"a step of {L} tokens at position {self.offset} crosses a chunk boundary "
                f"(chunk size {self.chunk_size}); split steps at multiples of the chunk size"
            )
        keys, values = self._encode(keys), self._encode(values)
        if self.keys is None or end > self._slots():
            self._grow(keys, values, end)
        for buf, new in zip(_leaves(self.keys) + _leaves(self.values), _leaves(keys) + _leaves(values)):
            buf[..., start:end, :] = new
        self.offset += L
        return tree_map(lambda a: a[..., :end, :], (self.keys, self.values))

    def _grow(self, keys: Any, values: Any, needed: int) -> None:
        slots = min(self.chunk_size, -(-needed // self.step) * self.step)
        live = self.offset % self.chunk_size  # > 0 only while the first chunk is filling, or after a reload

        def grown(new, old=None):
            buf = mx.zeros((*new.shape[:2], slots, new.shape[3]), new.dtype)
            if live:
                buf[..., :live, :] = old[..., :live, :]
            return buf

        old = () if self.keys is None else ((self.keys, self.values),)
        self.keys, self.values = tree_map(grown, (keys, values), *old)

    def is_trimmable(self, n: Optional[int] = None) -> bool:
        """With ``n``: whether dropping the last ``n`` positions is exact. Without (mlx-lm's protocol, which
        cannot say how many): whether every trim is exact, i.e. no chunk was dropped yet."""
        if n is None:
            return self.offset <= self.chunk_size
        new = self.offset - n
        if n < 0 or new < 0:
            return False
        # The next position `new` needs the positions [chunk_start(new), new) still in the buffer.
        return n == 0 or new % self.chunk_size == 0 or new // self.chunk_size == (self.offset - 1) // self.chunk_size

    def trim(self, n: int) -> int:
        if not self.is_trimmable(n):
            raise ValueError(
                f"cannot trim {n} positions exactly: position {self.offset - n} lies in an attention chunk "
                f"that was already dropped (offset {self.offset}, chunk size {self.chunk_size})"
            )
        self.offset -= n
        return n

    def to_quantized(self, group_size: int = 64, bits: int = 8) -> "QuantizedChunkCache":
        q = QuantizedChunkCache(self.chunk_size, group_size=group_size, bits=bits)
        q.offset = self.offset
        if self.keys is not None:
            q.keys, q.values = q._encode(self.keys), q._encode(self.values)
        return q

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def _live(self) -> tuple[Any, Any]:
        if self.keys is None:
            return None, None
        live = self.offset % self.chunk_size or min(self.offset, self.chunk_size)
        return tree_map(lambda a: a[..., :live, :], (self.keys, self.values))

    @property
    def state(self):
        return (*self._live(), self.offset, self.chunk_size)

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.chunk_size = v

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in _leaves(self.keys) + _leaves(self.values)) if self.keys is not None else 0


class QuantizedChunkCache(ChunkCache):
    """The chunk buffer with keys and values quantized (mlx-lm's quantized attention reads ``bits``)."""

    def __init__(self, chunk_size: int, group_size: int = 64, bits: int = 8):
        super().__init__(chunk_size)
        self.group_size = group_size
        self.bits = bits

    def _encode(self, x: mx.array) -> tuple:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def to_quantized(self, group_size: int = 64, bits: int = 8) -> "QuantizedChunkCache":
        return self

    @property
    def state(self):
        return (*self._live(), self.offset, self.chunk_size, self.group_size, self.bits)

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.chunk_size, self.group_size, self.bits = v


class GlobalCache(BaseCache):
    """Keys and values of every position so far, for a global layer, in one buffer (B, KV, slots, Dh).

    mlx-lm's ``KVCache`` grows 256 slots at a time by concatenation: a copy of the whole history each time,
    O(N^2 / 256) bytes copied on the way to N positions and a second copy of the layer alive meanwhile. Here
    ``reserve(n)`` sizes the buffer once when the length is known (a prompt and its reply: no copy at all), and
    past that it grows by a quarter of its size, so reaching N positions copies O(N) in all.
    """

    step = 256  # slots are allocated in multiples of this
    _reserved = 0  # slots to allocate once the first keys show the shape

    def __init__(self):
        self.keys: Any = None  # (B, KV, slots, Dh), slot = position
        self.values: Any = None
        self.offset = 0

    def _encode(self, x: mx.array) -> Any:
        return x

    def _slots(self) -> int:
        return _leaves(self.keys)[0].shape[2] if self.keys is not None else 0

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions in all, now (one copy of what is held) or at the first update."""
        self._reserved = max(self._reserved, n)
        if self.keys is not None and n > self._slots():
            self._resize(n)
            mx.eval(self.keys, self.values)  # layer by layer: one layer's old buffer alive at a time

    def _resize(self, needed: int) -> None:
        slots = -(-needed // self.step) * self.step

        def grown(a):
            # The held positions are written into the new buffer in place, so the old and the new buffer are all
            # that is alive; concatenating them with zeros would also hold the zeros, nearly a second new buffer.
            buf = mx.zeros((*a.shape[:2], slots, a.shape[3]), a.dtype)
            if self.offset:
                buf[..., : self.offset, :] = a[..., : self.offset, :]
            return buf

        self.keys, self.values = tree_map(grown, (self.keys, self.values))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Store ``L`` new positions; return the keys and values of all positions so far."""
        start, end = self.offset, self.offset + keys.shape[2]
        keys, values = self._encode(keys), self._encode(values)
        if self.keys is None:
            self.keys, self.values = tree_map(lambda a: a[..., :0, :], (keys, values))
        if end > self._slots():
            slots = self._slots()
            self._resize(self._reserved if self._reserved >= end else max(end, slots + max(self.step, slots // 4)))
        for buf, new in zip(_leaves(self.keys) + _leaves(self.values), _leaves(keys) + _leaves(values)):
            buf[..., start:end, :] = new
        self.offset = end
        return self._live()

    def _live(self) -> tuple[Any, Any]:
        """The positions held, as new array objects (views): a later in-place write never reaches them."""
        return tree_map(lambda a: a[..., : self.offset, :], (self.keys, self.values))

    def is_trimmable(self, n: Optional[int] = None) -> bool:
        return n is None or 0 <= n <= self.offset

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def to_quantized(self, group_size: int = 64, bits: int = 8) -> "QuantizedGlobalCache":
        q = QuantizedGlobalCache(group_size=group_size, bits=bits)
        q._reserved = self._reserved
        if self.offset:
            q.keys, q.values = (q._encode(a) for a in self._live())
            q.offset = self.offset
        return q

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self):
        """The positions held, without spare slots."""
        return (*self._live(), self.offset)

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset = v

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in _leaves(self.keys) + _leaves(self.values)) if self.keys is not None else 0


class QuantizedGlobalCache(GlobalCache):
    """The global buffer with keys and values quantized (attention reads ``bits`` and ``group_size``)."""

    def __init__(self, group_size: int = 64, bits: int = 8):
        super().__init__()
        self.group_size = group_size
        self.bits = bits

    def _encode(self, x: mx.array) -> tuple:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def to_quantized(self, group_size: int = 64, bits: int = 8) -> "QuantizedGlobalCache":
        return self

    @property
    def state(self):
        return (*self._live(), self.offset, self.group_size, self.bits)

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.group_size, self.bits = v


def make_cache(uses_rope: list[bool], chunk_size: Optional[int]) -> list[Any]:
    """One cache per layer: a chunk buffer for chunked RoPE layers, a growing buffer for global layers."""
    return [ChunkCache(chunk_size) if rope and chunk_size else GlobalCache() for rope in uses_rope]


def quantize_global_layers(cache: list[Any], bits: int, group_size: int) -> None:
    """Quantize the global layers' KV (what grows with the context), in place; chunked layers stay as they are.
    A layer already quantized keeps its bits."""
    for i, c in enumerate(cache):
        if isinstance(c, GlobalCache):
            cache[i] = c.to_quantized(group_size=group_size, bits=bits)


def global_kv_bits(cache: list[Any]) -> Optional[int]:
    """The bits of the global layers' quantized KV, None when it is float."""
    return next((getattr(c, "bits", None) for c in cache if not isinstance(c, ChunkCache)), None)


def can_trim_cache(cache: list[Any], n: int) -> bool:
    """Whether every layer can drop its last ``n`` positions exactly."""
    return all(
        c.is_trimmable(n) if isinstance(c, ChunkCache) else (c.is_trimmable() and 0 <= n <= c.offset) for c in cache
    )


def trim_cache(cache: list[Any], n: int) -> bool:
    """Drop the last ``n`` positions from every layer, or from none; returns whether it trimmed."""
    if not can_trim_cache(cache, n):
        return False
    for c in cache:
        c.trim(n)
    return True
