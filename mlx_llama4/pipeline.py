"""Pipeline parallelism: each process of an ``mx.distributed`` group runs a contiguous range of the text
decoder's layers (README.md, "Several Macs").

Process 0 runs the first layers and passes its hidden states to process 1, and so on; the last process's output
goes to every process, which all compute the same norm, logits and (rank 0's) token. One transfer of the hidden
states per process boundary and one to all per step, instead of two ``all_sum`` per layer: the mode for slow
links. Embeddings, lm_head and the vision tower are held whole by every process. Layers are split in proportion
to each machine's memory (what is left of it after the parts every process holds), or as given.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Optional, Sequence

import mlx.core as mx

from .sharding import ShardingError
from .weights import Entry, Getter

_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.")


def layer_of(name: str) -> Optional[int]:
    """The decoder layer a tensor belongs to, or None for the parts every process holds."""
    m = _LAYER.match(name)
    return int(m[1]) if m else None


def device_memory() -> int:
    """Bytes this process may fill: Metal's recommended working set, else the machine's physical memory."""
    if mx.metal.is_available():
        info = mx.device_info()
        return int(info.get("max_recommended_working_set_size") or info["memory_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def split_layers(layer_bytes: Sequence[int], budgets: Sequence[float]) -> list[int]:
    """Layers per process: contiguous ranges whose bytes are in proportion to ``budgets``, at least one each."""
    n, total = len(budgets), sum(layer_bytes)
    if len(layer_bytes) < n:
        raise ShardingError(f"cannot split {len(layer_bytes)} layers across {n} processes by pipeline "
                            "parallelism: there are fewer layers than processes")
    bounds, share = [0], 0.0
    cumulative = [sum(layer_bytes[: i + 1]) for i in range(len(layer_bytes))]
    for r in range(n - 1):
        share += budgets[r] / sum(budgets)
        target = share * total
        lo, hi = bounds[-1] + 1, len(layer_bytes) - (n - 1 - r)  # at least one layer here and for each later rank
        end = min(range(lo, hi + 1), key=lambda e: abs(cumulative[e - 1] - target))
        bounds.append(end)
    bounds.append(len(layer_bytes))
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _nbytes(entry: Entry, dtype: Optional[mx.Dtype]) -> int:
    total = 0
    for info in entry.outputs.values():
        size = dtype.size if dtype is not None and mx.issubdtype(info.dtype, mx.floating) else info.dtype.size
        total += size * math.prod(info.shape)
    return total


class PipelineStage:
    """Process ``rank`` runs layers ``[start, end)``; called by ``TextModel`` with all layers and its caches
    (one per layer it runs)."""

    def __init__(self, group: mx.distributed.Group, start: int, end: int):
        self.group, self.start, self.end = group, start, end
        self.rank, self.size = group.rank(), group.size()

    def __call__(self, layers: list, h: mx.array, cache: list[Any]) -> mx.array:
        # What a layer gives: the input's dtype promoted with the weights' (a quantized embedding may give
        # bfloat16 where the layers compute in float32). Every transfer carries it, so that the sizes agree.
        dtype = mx.result_type(h.dtype, layers[self.start].input_layernorm.weight.dtype)
        if self.rank > 0:
            h = mx.distributed.recv(h.shape, dtype, self.rank - 1, group=self.group)  # (B, L, D), previous stage
        for layer, c in zip(layers[self.start : self.end], cache):
            h = layer(h, c)
        if h.dtype != dtype:
            h = h.astype(dtype)
        if self.rank < self.size - 1:
            h = mx.distributed.send(h, self.rank + 1, group=self.group)
            # A prompt's pieces evaluate only the caches (mlx-lm's generate_step): make the last one wait for the
            # send, which the next stage's receive needs.
            _after(cache[-1], h)
        return mx.distributed.all_gather(h, group=self.group)[-h.shape[0] :]  # the last stage's output, everywhere


def _after(cache: Any, x: mx.array) -> None:
    """Make the cache's keys (an array, or a quantized cache's triple) depend on ``x``."""
    if isinstance(cache.keys, tuple):
        cache.keys = tuple(mx.depends(list(cache.keys), x))
    else:
        cache.keys = mx.depends(cache.keys, x)


class PipelineParallel:
    """Process ``group.rank()``'s layers for pipeline parallelism; ``layers_per_rank`` fixes the split, else it
    follows each process's memory (``device_memory``, gathered from all)."""

    mode = "pipeline"

    def __init__(self, group: mx.distributed.Group, dtype: Optional[mx.Dtype] = None,
                 layers_per_rank: Optional[Sequence[int]] = None):
        self.group, self.dtype, self.layers_per_rank = group, dtype, layers_per_rank
        self.rank, self.size = group.rank(), group.size()
        self.start = self.end = 0

    def _split(self, n_layers: int, entries: list[Entry]) -> list[int]:
        if self.layers_per_rank is not None:
            split = list(self.layers_per_rank)
            if len(split) != self.size or any(s < 1 for s in split) or sum(split) != n_layers:
                raise ShardingError(f"layers_per_rank {split} must give each of the {self.size} processes at least "
                                    f"one layer and add up to the model's {n_layers} layers")
            return split
        layer_bytes, shared = [0] * n_layers, 0
        for entry in entries:
            layer = layer_of(entry.name)
            if layer is None:
                shared += _nbytes(entry, self.dtype)
            elif layer < n_layers:
                layer_bytes[layer] += _nbytes(entry, self.dtype)
        memory = mx.distributed.all_gather(mx.array([device_memory() / 2**20], mx.float32), group=self.group)
        budgets = [m * 2**20 - shared for m in memory.tolist()]
        if min(budgets) <= 0:
            r = budgets.index(min(budgets))
            raise ShardingError(f"process {r} has {memory[r].item() / 1024:.1f} GB of memory, less than the "
                                f"{shared / 2**30:.1f} GB every process holds (embeddings, lm_head, vision)")
        return split_layers(layer_bytes, budgets)

    def apply(self, model, entries: list[Entry]) -> None:
        """Keep only this process's layers in ``model`` (built, not loaded); the others become None."""
        layers = model.language_model.model.layers
        split = self._split(len(layers), entries)
        self.start = sum(split[: self.rank])
        self.end = self.start + split[self.rank]
        for i in range(len(layers)):
            if not self.start <= i < self.end:
                layers[i] = None
        model.language_model.model.pipeline = PipelineStage(self.group, self.start, self.end)

    def read(self, entry: Entry, get: Getter) -> dict[str, mx.array]:
        layer = layer_of(entry.name)
        if layer is not None and not self.start <= layer < self.end:
            return {}
        return entry.read(get, None, None)
