"""A prefix cache shared by all requests: a size-bounded LRU of one-sequence KV caches keyed by what they hold.

An entry is a ``PromptCache`` (per-layer caches and one key per position: the token id, or for an image's
``<|patch|>`` rows a key from the image's pixels). A new prompt takes the entry that restores the longest
prefix of it, by ``PromptCache.reuse``'s rule: exact or refused, never wrong, backing up to an image's start
and, where the chunked layers have already dropped what the reuse needs, to a chunk boundary.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
from mlx.utils import tree_map

from ..cache import ChunkCache, can_trim_cache, trim_cache
from ..model import Model
from ..prompt_cache import PromptCache


def _detached(cache: Any) -> Any:
    """A copy of a one-sequence cache whose arrays are new objects. Caches write into their buffers in place
    (``buffer[..., a:b, :] = x``), which must never reach the entry the copy came from."""
    out = copy.copy(cache)
    if isinstance(cache, ChunkCache):
        out.keys, out.values = cache.state[:2]  # the live slots, sliced
    else:
        out.keys, out.values = tree_map(lambda a: a[..., : cache.offset, :], (cache.keys, cache.values))
    return out


def restored(caches: list[Any], n: int) -> list[Any]:
    """New caches holding the first ``n`` positions of ``caches`` (whose last positions can be trimmed exactly)."""
    copies = [_detached(c) for c in caches]
    trim_cache(copies, copies[0].offset - n)
    return copies


class PrefixCache:
    """LRU of prompt caches, at most ``max_bytes`` of KV in all."""

    def __init__(self, model: Model, max_bytes: int):
        self._model = model
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, PromptCache] = OrderedDict()  # least recently used first
        self._next_id = 0
        self.nbytes = 0
        self.hits = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, keys: np.ndarray,
              image_spans: list[tuple[int, int]]) -> tuple[int, Optional[list[Any]], Optional[int]]:
        """``(n, caches, entry_id)``: new per-layer caches holding the first ``n`` positions of ``keys`` (never all
        of them: one is left to feed), copied from the entry ``entry_id``, or ``(0, None, None)`` when no entry
        helps."""
        best, best_id = 0, None
        for entry_id, entry in self._entries.items():
            n = entry.restorable_prefix(keys, image_spans)
            if n > best:
                best, best_id = n, entry_id
        if best_id is None:
            return 0, None, None
        self._entries.move_to_end(best_id)
        self.hits += 1
        self.hit_tokens += best
        return best, restored(self._entries[best_id].layers, best), best_id  # exact: restorable_prefix checked it

    def insert(self, keys: np.ndarray, caches: list[Any]) -> tuple[Optional[int], list[int]]:
        """Keep ``caches`` (evaluated, not written to afterwards), which hold ``keys``. Entries that this one
        restores exactly are dropped; the least recently used go while the total is over budget. Returns the new
        entry's id (None when it is not kept) and the ids of the entries dropped."""
        size = sum(c.nbytes for c in caches)
        offset = caches[0].offset
        if size > self.max_bytes or offset == 0:
            return None, []
        keys = np.asarray(keys[:offset], np.int64)
        dropped = []
        for entry_id, entry in list(self._entries.items()):
            n = len(entry.keys)
            if n <= offset and np.array_equal(entry.keys, keys[:n]) and can_trim_cache(caches, offset - n):
                dropped.append(self._remove(entry_id))  # a prefix of this one, restorable from it
            elif n >= offset and np.array_equal(entry.keys[:offset], keys) and can_trim_cache(entry.layers, n - offset):
                self._entries.move_to_end(entry_id)  # this one is a restorable prefix of it
                return None, dropped
        entry = PromptCache(self._model)
        entry.layers, entry.keys = list(caches), keys
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = entry
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            dropped.append(self._remove(next(iter(self._entries))))
        return entry_id, dropped

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _remove(self, entry_id: int) -> int:
        entry = self._entries.pop(entry_id)
        self.nbytes -= sum(c.nbytes for c in entry.layers)
        return entry_id
