"""KV caches for iRoPE attention, following mlx-lm's cache protocol (``offset``, ``state``, ``trim`` ...).

RoPE layers attend only within aligned chunks ``[kC, (k+1)C)``, so they keep the current chunk alone in a
buffer of at most ``C`` slots that restarts at every multiple of ``C``: no copy per decode step, and decode
attends only to the live keys. NoPE (global) layers keep everything in mlx-lm's growing ``KVCache``.

Trimming is exact or refused: once a RoPE layer has dropped an earlier chunk, restoring a position inside
that chunk is impossible, and saying so lets the caller re-prefill instead of computing wrong logits.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, _BaseCache


class ChunkCache(_BaseCache):
    """Keys and values of the current attention chunk, in a buffer of at most ``chunk_size`` positions."""

    step = 256  # growth granularity while the first chunk fills

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.keys: Optional[mx.array] = None  # (B, KV, slots, Dh), slot = position % chunk_size
        self.values: Optional[mx.array] = None
        self.offset = 0  # absolute number of positions seen

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store ``L`` new positions and return the live keys/values of their chunk, oldest first."""
        L = keys.shape[2]
        start = self.offset % self.chunk_size
        end = start + L
        if end > self.chunk_size:
            raise ValueError(
                f"a step of {L} tokens at position {self.offset} crosses a chunk boundary "
                f"(chunk size {self.chunk_size}); split steps at multiples of the chunk size"
            )
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset += L
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        slots = min(self.chunk_size, -(-needed // self.step) * self.step)
        B, n_kv, _, dk = keys.shape
        new_k = mx.zeros((B, n_kv, slots, dk), keys.dtype)
        new_v = mx.zeros((B, n_kv, slots, values.shape[3]), values.dtype)
        if self.keys is not None:  # only while the first chunk is filling
            live = self.offset % self.chunk_size
            new_k[..., :live, :] = self.keys[..., :live, :]
            new_v[..., :live, :] = self.values[..., :live, :]
        self.keys, self.values = new_k, new_v

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

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self):
        live = self.offset % self.chunk_size or min(self.offset, self.chunk_size)
        if self.keys is None:
            return None, None
        return self.keys[..., :live, :], self.values[..., :live, :]

    @state.setter
    def state(self, v):
        self.keys, self.values = v

    @property
    def meta_state(self):
        return tuple(map(str, (self.offset, self.chunk_size)))

    @meta_state.setter
    def meta_state(self, v):
        self.offset, self.chunk_size = map(int, v)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(uses_rope: list[bool], chunk_size: Optional[int]) -> list[Any]:
    """One cache per layer: a chunk buffer for chunked RoPE layers, a growing cache for global layers."""
    return [ChunkCache(chunk_size) if rope and chunk_size else KVCache() for rope in uses_rope]


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
