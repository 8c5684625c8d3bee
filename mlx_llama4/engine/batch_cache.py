"""KV caches for a batch of sequences that are each at their own position.

Every layer keeps one buffer ``(B, KV, S, Dh)`` in which row b's position p lives in slot ``p % C`` for a
chunked RoPE layer (chunk size C, the layout of ``ChunkCache``: the buffer restarts at every multiple of C, so
it never holds more than one chunk) and in slot ``p`` for a global layer. A decode step writes each row's new
key into its own slot (one scatter, no copy of the buffer) and attends over the slots with a per-row mask:
slot j is live for row b iff ``j <= slot_b``. Slots past it hold zeros, or in a chunked layer the rest of the
row's previous chunk, which its chunk does not see.

Rows join (``add``, from a sequence's one-row ``ChunkCache`` / ``KVCache`` after its prefill) and leave
(``filter``) between steps; ``extract`` gives a row back as one-row caches (for the prefix cache). A batch
step feeds one token per row. Why not mlx-lm's ``BatchKVCache``: it aligns rows at the right with left
padding, which a chunked layer cannot use (its rows restart their buffer at different steps), and it has no
quantized form; slot = position serves both kinds of layer with one mask rule, quantized or not.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from ..cache import ChunkCache, QuantizedChunkCache
from ..mlx_lm_cache import BaseCache, KVCache, QuantizedKVCache


class BatchKV(BaseCache):
    """One layer's keys and values for the rows of a batch; ``window`` is the chunk size of a chunked RoPE
    layer, None for a global layer."""

    step = 256  # slot growth granularity

    def __init__(self, window: Optional[int] = None):
        self.window = window
        self.keys: Any = None  # (B, KV, S, Dh); quantized: a (packed, scales, biases) triple
        self.values: Any = None
        self.offset = mx.array([], mx.int32)  # (B,) each row's next position
        self.positions: list[int] = []  # the same, on the host

    def _encode(self, x: mx.array) -> Any:
        return x

    def _slot(self, position: int) -> int:
        return position % self.window if self.window else position

    def _held(self, position: int) -> int:
        """Slots that hold a row's keys before ``position``, as in the row's one-row cache: its current
        chunk, or the whole chunk just completed (a prefix-cache trim inside it stays exact)."""
        if not self.window:
            return position
        return position % self.window or min(position, self.window)

    def _capacity(self, slots: int) -> int:
        cap = -(-slots // self.step) * self.step
        return min(cap, self.window) if self.window else cap

    def _slots(self) -> int:
        return tree_flatten(self.keys)[0][1].shape[2] if self.keys is not None else 0

    def _resized(self, slots: int) -> None:
        """Cut or zero-pad the slot axis to ``slots``."""
        have = self._slots()

        def resize(a):
            if slots <= have:
                return a[..., :slots, :]
            return mx.concatenate([a, mx.zeros((*a.shape[:2], slots - have, a.shape[3]), a.dtype)], axis=2)

        self.keys, self.values = tree_map(resize, (self.keys, self.values))

    def __len__(self) -> int:
        return len(self.positions)

    def add(self, cache: Any) -> None:
        """Append a row from a one-row cache of this layer (``ChunkCache`` for a chunked layer, ``KVCache``
        for a global one, or their quantized forms, matching this batch cache)."""
        position = cache.offset
        held = self._held(position)
        # A ChunkCache keeps position p at slot p % C and a KVCache at slot p: the same layout as ours.
        row = tree_map(lambda a: a[..., :held, :], (cache.keys, cache.values))
        slots = max(self._slots(), self._capacity(held))

        def padded(a):
            return mx.concatenate([a, mx.zeros((*a.shape[:2], slots - a.shape[2], a.shape[3]), a.dtype)], axis=2)

        if self.keys is None:
            self.keys, self.values = tree_map(padded, row)
        else:
            self._resized(slots)
            self.keys, self.values = tree_map(
                lambda old, new: mx.concatenate([old, padded(new)], axis=0), (self.keys, self.values), row
            )
        self.positions.append(position)
        self.offset = mx.array(self.positions, dtype=mx.int32)

    def filter(self, rows: list[int]) -> None:
        """Keep ``rows`` (indices into the batch), in that order; the slot axis shrinks to what they hold."""
        self.positions = [self.positions[r] for r in rows]
        if not rows:
            self.keys = self.values = None
            self.offset = mx.array([], mx.int32)
            return
        slots = min(self._slots(), self._capacity(max(self._held(p) for p in self.positions)))
        index = mx.array(rows, dtype=mx.int32)
        # Slice first so that the gather writes a compact buffer and the old one is freed.
        self.keys, self.values = tree_map(lambda a: mx.take(a[..., :slots, :], index, axis=0), (self.keys, self.values))
        self.offset = mx.array(self.positions, dtype=mx.int32)

    def extract(self, row: int) -> Any:
        """Row ``row`` as a new one-row cache of the single-sequence kind (its own copy of the keys)."""
        position = self.positions[row]
        held = self._held(position)
        index = mx.array([row], dtype=mx.int32)
        keys, values = tree_map(lambda a: mx.take(a[..., :held, :], index, axis=0), (self.keys, self.values))
        cache = self._single()
        cache.keys, cache.values, cache.offset = keys, values, position
        return cache

    def _single(self) -> Any:
        return ChunkCache(self.window) if self.window else KVCache()

    def make_mask(self, length: int) -> mx.array:
        """The mask for the keys that the next ``update_and_fetch`` returns: (B, 1, 1, S), True where a row
        attends. Called before the update, as mlx-lm's caches are."""
        if length != 1:
            raise ValueError(f"a batch step feeds one token per row, got {length}")
        slots = self.offset % self.window if self.window else self.offset  # (B,) where the new keys go
        live = max(self._slot(p) for p in self.positions) + 1
        return (mx.arange(live)[None] <= slots[:, None])[:, None, None, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Write each row's new key and value (B, KV, 1, Dh) at its slot; return the slots in use."""
        if keys.shape[2] != 1:
            raise ValueError(f"a batch step feeds one token per row, got {keys.shape[2]}")
        live = max(self._slot(p) for p in self.positions) + 1
        if live > self._slots():
            self._resized(self._capacity(live))
        slots = (self.offset % self.window if self.window else self.offset)[:, None, None, None]  # (B, 1, 1, 1)

        def write(buffer, new):
            return mx.put_along_axis(buffer, mx.broadcast_to(slots, new.shape), new, axis=2)

        self.keys, self.values = tree_map(write, (self.keys, self.values), (self._encode(keys), self._encode(values)))
        self.positions = [p + 1 for p in self.positions]
        self.offset = self.offset + 1
        return tree_map(lambda a: a[..., :live, :], (self.keys, self.values))

    def size(self) -> int:
        return max(self.positions, default=0)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for _, a in tree_flatten((self.keys, self.values))) if self.keys is not None else 0


class QuantizedBatchKV(BatchKV):
    """The batch buffer with keys and values quantized (mlx-lm's quantized attention reads ``bits``)."""

    def __init__(self, window: Optional[int] = None, group_size: int = 64, bits: int = 8):
        super().__init__(window)
        self.group_size = group_size
        self.bits = bits

    def _encode(self, x: mx.array) -> tuple:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _single(self) -> Any:
        if self.window:
            return QuantizedChunkCache(self.window, group_size=self.group_size, bits=self.bits)
        return QuantizedKVCache(group_size=self.group_size, bits=self.bits)


class BatchCache:
    """All layers' batch caches, rows in the same order in every layer."""

    def __init__(self, single: list[Any], kv_bits: Optional[int] = None, kv_group_size: int = 64):
        """``single``: a one-sequence cache per layer (``model.make_cache()``), which tells each layer's kind."""
        windows = [c.chunk_size if isinstance(c, ChunkCache) else None for c in single]
        if kv_bits is None:
            self.layers: list[BatchKV] = [BatchKV(w) for w in windows]
        else:
            self.layers = [QuantizedBatchKV(w, kv_group_size, kv_bits) for w in windows]

    def __len__(self) -> int:
        return len(self.layers[0])

    @property
    def positions(self) -> list[int]:
        """Each row's next position."""
        return list(self.layers[0].positions)

    def add(self, caches: list[Any]) -> None:
        """Append a row from one sequence's per-layer caches."""
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.add(cache)

    def filter(self, rows: list[int]) -> None:
        for layer in self.layers:
            layer.filter(rows)

    def extract(self, row: int) -> list[Any]:
        return [layer.extract(row) for layer in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
