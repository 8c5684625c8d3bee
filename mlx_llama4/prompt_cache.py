"""A conversation's KV cache kept across calls (``PromptCache``), saved to and loaded from disk, and the keys
that say what each cached position holds: the token id, or for an image's ``<|patch|>`` rows a key derived
from the image's pixels (two images share token ids, not content). ``stream_generate`` and the engine's
prefix cache reuse a cached prefix only where it can be restored exactly.

A long document prefilled once is saved (``save_prompt_cache``) and questioned many times: each question
costs only its own tokens, also in one process (``PromptCache.pin``), and saving and loading stream to and
from the file without a second copy of the cache in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .cache import ChunkCache, GlobalCache, QuantizedChunkCache, QuantizedGlobalCache, can_trim_cache, trim_cache
from .images import tile_count
from .model import Model

# Format 2: tensors without spare slots, the per-position keys as a tensor, user metadata. Files of format 1
# (mlx-llama4 before long-context support) are refused by name: prefill the document again.
PROMPT_CACHE_FORMAT = "mlx-llama4 prompt cache 2"


class PromptCache:
    """A conversation's KV cache and what it holds: one key per position, the token id, or for an image's
    ``<|patch|>`` rows a key derived from the image's pixels (two images share token ids, not content)."""

    def __init__(self, model: Model):
        self.model_id = model_fingerprint(model)  # a cache is only valid for the model that filled it
        self.chunk_size = model.config.text.attention_chunk_size
        self._make_layers = model.make_cache
        self.layers = model.make_cache()
        self.keys = np.zeros(0, np.int64)
        self.metadata: dict[str, str] = {}  # saved with the cache: e.g. the document the CLI prefilled
        self._pinned: Optional[tuple[int, list[Any]]] = None  # (offset, copies of the chunked layers there)

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    def pin(self) -> None:
        """Keep the current end restorable: a later prompt that shares the whole cached prefix resumes here
        exactly, even after replies have carried the chunked layers past a chunk boundary (the global layers
        can always be trimmed back). Each question to a prefilled document then costs only its own tokens.
        Costs at most one chunk per chunked layer, copied when the layer is next written."""
        chunked = [(i, type(c).from_state(c.state)) for i, c in enumerate(self.layers) if isinstance(c, ChunkCache)]
        self._pinned = (self.offset, chunked)

    def restorable_prefix(self, keys: np.ndarray, image_spans: list[tuple[int, int]]) -> int:
        """The length of the longest cached prefix of ``keys`` that can be restored exactly: never splitting an
        image, always leaving one token to feed, and, where the chunked layers have already dropped what it
        needs, backed up to the pinned position or a chunk boundary, whichever is later (restarting at a
        boundary is exact: chunked layers need nothing before it)."""
        held = self.keys[: self.offset]
        n = min(len(held), len(keys) - 1)
        same = held[:n] == keys[:n]
        keep = n if same.all() else int(np.argmin(same))
        pinned = self._pinned[0] if self._pinned else 0
        while keep > 0:
            keep = next((s for s, e in image_spans if s < keep < e), keep)  # back up to an image's start
            if can_trim_cache(self.layers, self.offset - keep):
                break
            boundary = keep // self.chunk_size * self.chunk_size
            if 0 < pinned <= keep and pinned >= boundary:
                return pinned
            keep = boundary if boundary < keep else 0
        return keep

    def reuse(self, keys: np.ndarray, image_spans: list[tuple[int, int]]) -> int:
        """Keep the longest restorable prefix of ``keys`` (``restorable_prefix``), dropping the rest, and return
        its length; the caller feeds ``keys[length:]``."""
        keep = self.restorable_prefix(keys, image_spans)
        if self._pinned and keep < self._pinned[0]:
            self._pinned = None  # what follows `keep` is about to be overwritten
        if keep == 0:
            self.layers[:] = self._make_layers()
        elif not trim_cache(self.layers, self.offset - keep):  # then `keep` is the pinned position
            for c in self.layers:
                if not isinstance(c, ChunkCache):
                    c.trim(c.offset - keep)
            for i, snapshot in self._pinned[1]:
                self.layers[i] = type(snapshot).from_state(snapshot.state)  # the snapshot stays for next time
        self.keys = self.keys[:keep]
        return keep

    def reserve(self, n: int) -> None:
        """Size the global layers for ``n`` positions in all (a prompt and its reply), so they grow without
        copying."""
        for c in self.layers:
            if isinstance(c, GlobalCache):
                c.reserve(n)


def model_fingerprint(model: Model) -> str:
    """An identity of the model that a KV cache depends on, stable across processes: a hash of its config and
    of the first 64 values of every parameter tensor.

    The config fixes the structure (layers, heads, RoPE, chunking); sampling every tensor tells apart other
    checkpoints, fine-tunes and quantizations (packed integers are hashed as stored), while floats pass
    through bfloat16 first, so the same checkpoint loaded in float32 or bfloat16 is the same model. It costs
    one small read per tensor and is computed once per model object.
    """
    cached = getattr(model, "_fingerprint", None)
    if cached is not None:
        return cached
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode())
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    heads = [a.reshape(-1)[:64] for _, a in params]
    heads = [h.astype(mx.bfloat16).astype(mx.float32) if mx.issubdtype(h.dtype, mx.floating) else h for h in heads]
    mx.eval(heads)
    for (name, _), head in zip(params, heads):
        digest.update(name.encode())
        digest.update(np.asarray(head).tobytes())
    model._fingerprint = digest.hexdigest()[:32]
    return model._fingerprint


def check_cache_model(cache_id: str, model: Model, source: str) -> None:
    if cache_id != model_fingerprint(model):
        raise ValueError(
            f"{source} was filled by another model (its config or weights differ from this one's); a KV cache "
            "only fits the model that made it: use a new PromptCache(model) for this model"
        )


def image_keys(ids: np.ndarray, pixel_values: Optional[np.ndarray], grids: list, image_token: int,
                per_tile: int) -> tuple[np.ndarray, list[tuple[int, int]], list[int]]:
    """Per-position keys, each image's span of ``<|patch|>`` positions, and each image's first tile."""
    keys = ids.astype(np.int64).copy()
    positions = np.flatnonzero(ids == image_token)
    spans, first_tiles, tile, at = [], [], 0, 0
    for grid in grids:
        tiles = tile_count(grid)
        n = tiles * per_tile
        digest = hashlib.sha1(np.ascontiguousarray(pixel_values[tile : tile + tiles]).tobytes()).digest()
        keys[positions[at : at + n]] = -1 - (int.from_bytes(digest[:7], "little"))
        spans.append((int(positions[at]), int(positions[at + n - 1]) + 1))
        first_tiles.append(tile)
        tile, at = tile + tiles, at + n
    return keys, spans, first_tiles


def embeddings_to_feed(model: Model, ids: np.ndarray, start: int, image_spans: list[tuple[int, int]],
                       first_tiles: list[int], pixel_values: Optional[np.ndarray]) -> Optional[mx.array]:
    """Input embeddings (L - start, D) for ``ids[start:]`` when images remain to feed there (the vision tower
    runs on those images only), else None: the token ids are enough."""
    later = [i for i, (s, _) in enumerate(image_spans) if s >= start]
    if not later:
        return None
    pixels = mx.array(pixel_values[first_tiles[later[0]]:])
    return model.embed(mx.array(ids[start:])[None], pixels)[0]


_CACHE_CLASSES = {c.__name__: c for c in (GlobalCache, QuantizedGlobalCache, ChunkCache, QuantizedChunkCache)}
# safetensors dtype names (https://github.com/huggingface/safetensors; see safetensors_reader.py)
_DTYPE_NAMES = {mx.uint32: "U32", mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32", np.dtype(np.int64): "I64"}


def save_prompt_cache(file: str | Path, cache: PromptCache) -> None:
    """Save a prefilled conversation (e.g. a long document) so it can be questioned again without prefill.

    The file (safetensors, written under exactly this name) records the model it belongs to, the key of every
    cached position (token ids) and ``cache.metadata``; only the positions held are written, without spare
    slots, one attention head at a time, so saving needs no second copy of the cache in memory. It is written
    to a temporary sibling and renamed into place, so an interrupted save never leaves a partial file.
    """
    path = Path(file)
    if cache.offset == 0:
        raise ValueError("the prompt cache is empty: nothing to save")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: cannot save the prompt cache, the folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: cannot save the prompt cache, this is a folder")
    unknown = {type(c).__name__ for c in cache.layers} - set(_CACHE_CLASSES)
    if unknown:
        raise TypeError(f"cannot save layer caches of type {', '.join(sorted(unknown))}")
    # Every cache class's state is (keys, values, *scalars); keys and values hold exactly the positions kept.
    tensors = tree_flatten([list(c.state[:2]) for c in cache.layers])
    tensors.append(("prompt_keys", np.ascontiguousarray(cache.keys[: cache.offset], np.int64)))
    meta = {
        "format": PROMPT_CACHE_FORMAT,
        "model": cache.model_id,
        "classes": json.dumps([type(c).__name__ for c in cache.layers]),
        "scalars": json.dumps([list(c.state[2:]) for c in cache.layers]),
        "metadata": json.dumps(cache.metadata),
    }
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as f:
            _write_safetensors(f, tensors, meta)
        os.replace(partial, path)
    except (OSError, RuntimeError) as e:
        with suppress(OSError):
            partial.unlink()
        kind = type(e) if isinstance(e, OSError) else OSError
        raise kind(f"{path}: cannot write the prompt cache ({getattr(e, 'strerror', None) or e})") from None


def _write_safetensors(f: BinaryIO, tensors: list[tuple[str, mx.array | np.ndarray]], metadata: dict[str, str]) -> None:
    """The safetensors layout (described in safetensors_reader.py), each tensor written in contiguous pieces of
    its last two axes. A cache's tensors are views of larger buffers; ``mx.save_safetensors`` first copies every
    such view whole (measured: twice the cache's memory at the peak), while a (batch, head) row of one is
    already contiguous."""
    header: dict[str, Any] = {"__metadata__": metadata}
    start = 0
    for name, a in tensors:
        end = start + a.nbytes
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [start, end]}
        start = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)) + raw)
    for _, a in tensors:
        for index in np.ndindex(a.shape[:-2]):  # a view each (a reshape of a view would copy it)
            row = a[index]
            if isinstance(row, mx.array):
                mx.eval(row)
            view = memoryview(row)
            f.write(view if view.c_contiguous else memoryview(mx.contiguous(row)))


def load_prompt_cache(file: str | Path, model: Model) -> PromptCache:
    """A conversation saved by ``save_prompt_cache``, for ``model`` (the model that filled it, or a fresh
    load of the same checkpoint; any other model is refused), pinned at its end (``PromptCache.pin``). Tensors
    are read one at a time into the cache: memory holds the cache once."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt cache file" if not path.exists() else f"{path}: not a file")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)  # lazy: nothing read yet
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a prompt cache, or a corrupt or truncated one ({e})") from None
    found = meta.get("format", "")
    if found != PROMPT_CACHE_FORMAT:
        if found.startswith("mlx-llama4 prompt cache"):
            raise ValueError(f"{path}: a prompt cache of an older format ({found!r}); prefill the prompt again")
        raise ValueError(f"{path}: not a prompt cache written by save_prompt_cache (no {PROMPT_CACHE_FORMAT!r} mark)")
    check_cache_model(meta.get("model"), model, f"the prompt cache {path}")
    cache = PromptCache(model)
    try:
        classes, scalars = json.loads(meta["classes"]), json.loads(meta["scalars"])
        if len(classes) != len(cache.layers) or len(scalars) != len(classes):
            raise ValueError(f"{len(classes)} layers, but the model has {len(cache.layers)}")
        keys = arrays.pop("prompt_keys")
        tensors = tree_unflatten(list(arrays.items()))
        as_tuple = lambda x: tuple(x) if isinstance(x, list) else x  # noqa: E731  (quantized: packed, scales, biases)
        cache.layers = [
            _CACHE_CLASSES[name].from_state((as_tuple(t[0]), as_tuple(t[1]), *s))
            for name, t, s in zip(classes, tensors, scalars, strict=True)
        ]
        for c in cache.layers:  # one layer at a time
            mx.eval(c.state)
        cache.keys = np.asarray(keys, np.int64)
        cache.metadata = json.loads(meta["metadata"])
        offsets = sorted({c.offset for c in cache.layers})
        if offsets != [len(cache.keys)]:
            raise ValueError(f"{len(cache.keys)} position keys for layers at offsets {offsets}")
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt prompt cache ({type(e).__name__}: {e})") from None
    cache.pin()
    return cache
