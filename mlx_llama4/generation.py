"""Text generation with images: ``generate`` and ``stream_generate``, and a prompt cache kept across turns.

The token loop, samplers, logits processors, KV quantization and streaming detokenizer are mlx-lm's; what is
ours is turning a prompt (text or chat messages, with images) into embeddings, reusing a conversation's KV
cache exactly (or rebuilding it when the chunked layers have dropped what a reuse would need), stop tokens
and statistics.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

from .cache import ChunkCache, QuantizedChunkCache, can_trim_cache, trim_cache
from .images import tile_count
from .model import Model

DEFAULT_MAX_TOKENS = 256


@dataclass
class GenerationChunk:
    """One step of ``stream_generate``: the new text and token, and running statistics."""

    text: str
    token: Optional[int]
    finish_reason: Optional[str]  # "stop" (an end token), "length" (max_tokens / context), or None
    prompt_tokens: int  # tokens fed this call (after reusing a prompt cache)
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    time_to_first_token: float  # seconds
    peak_memory: float  # GB


class PromptCache:
    """A conversation's KV cache and what it holds: one key per position, the token id, or for an image's
    ``<|patch|>`` rows a key derived from the image's pixels (two images share token ids, not content)."""

    def __init__(self, model: Model):
        self.chunk_size = model.config.text.attention_chunk_size
        self._make_layers = model.make_cache
        self.layers = model.make_cache()
        self.keys = np.zeros(0, np.int64)

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    def reuse(self, keys: np.ndarray, image_spans: list[tuple[int, int]]) -> int:
        """Keep the longest cached prefix of ``keys`` that can be restored exactly (never splitting an image,
        always leaving one token to feed) and return its length; the caller feeds ``keys[length:]``."""
        held = self.keys[: self.offset]
        n = min(len(held), len(keys) - 1)
        same = held[:n] == keys[:n]
        keep = n if same.all() else int(np.argmin(same))
        while keep > 0:
            keep = next((s for s, e in image_spans if s < keep < e), keep)  # back up to an image's start
            if can_trim_cache(self.layers, self.offset - keep):
                break
            # Restarting at a chunk boundary is always exact: chunked layers need nothing before it.
            boundary = keep // self.chunk_size * self.chunk_size
            keep = boundary if boundary < keep else 0
        if keep == 0:
            self.layers[:] = self._make_layers()
        else:
            trim_cache(self.layers, self.offset - keep)
        self.keys = held[:keep]
        return keep


def _image_keys(ids: np.ndarray, pixel_values: Optional[np.ndarray], grids: list, image_token: int,
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


def read_generation_config(path: Path) -> dict:
    """Sampling defaults and end tokens from a checkpoint's ``generation_config.json`` (absent: greedy)."""
    file = Path(path) / "generation_config.json"
    if not file.exists():
        return {}
    cfg = json.loads(file.read_text())
    eos = cfg.get("eos_token_id")
    out = {"eos_token_ids": [eos] if isinstance(eos, int) else list(eos or [])}
    if cfg.get("do_sample"):
        for key in ("temperature", "top_p", "top_k"):
            if cfg.get(key) is not None:
                out[key] = cfg[key]
    return out


def _stop_tokens(model: Model, processor: Any, defaults: dict) -> set[int]:
    return set(processor.eos_token_ids) | set(model.config.text.eos_token_id) | set(defaults.get("eos_token_ids", []))


def stream_generate(
    model: Model,
    processor: Any,
    prompt: str | Sequence[dict],
    images: Optional[Sequence[Any]] = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    prompt_cache: Optional[PromptCache] = None,
    prefill_step_size: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Iterator[GenerationChunk]:
    """Stream the reply to ``prompt``: a string (one user turn, after ``images`` if any) or chat messages in the
    Hugging Face format, whose image parts without an inline image take ``images`` in order.

    Sampling defaults come from the checkpoint's ``generation_config.json`` (temperature 0 = greedy when it
    has none). With ``prompt_cache`` only the tokens after the longest reusable prefix are fed, and the cache
    is left holding the whole conversation so far. ``progress(done, total)`` reports prefill progress. The
    prompt is fed ``prefill_step_size`` tokens at a time: by default one attention chunk, which bounds the
    activations of a long prefill to one chunk's.
    """
    tic = time.perf_counter()
    defaults = getattr(processor, "generation_config", {}) or {}
    temperature = defaults.get("temperature", 0.0) if temperature is None else temperature
    top_p = defaults.get("top_p", 1.0) if top_p is None else top_p
    top_k = defaults.get("top_k", 0) if top_k is None else top_k
    if seed is not None:
        mx.random.seed(seed)
    inputs = processor(messages=prompt if isinstance(prompt, str) else list(prompt),
                       images=list(images) if images else None)
    ids = np.asarray(inputs["input_ids"])[0]
    pixels = inputs["pixel_values"]
    per_tile = model.config.vision.tokens_per_tile if model.config.vision else 0
    keys, spans, first_tiles = _image_keys(ids, pixels, inputs["grids"], model.config.image_token_index, per_tile)

    limit = model.config.text.max_position_embeddings
    if len(ids) >= limit:
        raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {limit} positions "
                         "(max_position_embeddings)")
    max_tokens = min(max_tokens, limit - len(ids))

    cache = prompt_cache or PromptCache(model)
    start = cache.reuse(keys, spans)
    later = [i for i, (s, _) in enumerate(spans) if s >= start]  # images whose tokens are still to feed
    feed = mx.array(ids[start:])
    embeddings = None
    if later:
        embeddings = model.embed(feed[None], mx.array(pixels[first_tiles[later[0]]:]))[0]  # (L, D)

    stops = _stop_tokens(model, processor, defaults)
    detokenizer = NaiveStreamingDetokenizer(processor.tokenizer)
    steps = generate_step(
        feed, model.language_model, max_tokens=max_tokens,
        sampler=make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k),
        logits_processors=make_logits_processors(repetition_penalty=repetition_penalty),
        prompt_cache=cache.layers,
        prefill_step_size=prefill_step_size or model.config.text.attention_chunk_size or 2048,
        kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=0,
        prompt_progress_callback=progress, input_embeddings=embeddings,
    )
    generated: list[int] = []
    ttft = prompt_tps = 0.0
    try:
        for n, (token, _) in enumerate(steps):
            if n == 0:
                ttft = time.perf_counter() - tic
                prompt_tps = len(feed) / ttft
                tic = time.perf_counter()
            generated.append(token)
            finish = "stop" if token in stops else ("length" if n + 1 == max_tokens else None)
            if finish != "stop":
                detokenizer.add_token(token)
            if finish:
                detokenizer.finalize()
            yield GenerationChunk(
                text=detokenizer.last_segment, token=token, finish_reason=finish, prompt_tokens=len(feed),
                prompt_tps=prompt_tps, generation_tokens=n + 1,
                generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
                time_to_first_token=ttft, peak_memory=mx.get_peak_memory() / 1e9,
            )
            if finish:
                return
    finally:
        # Whatever was fed (the prompt and the tokens sampled so far) is what the cache now holds.
        held = np.concatenate([keys, np.asarray(generated, np.int64)])
        cache.keys = held[: cache.offset]


def generate(model: Model, processor: Any, prompt: str | Sequence[dict], images: Optional[Sequence[Any]] = None,
             **kwargs) -> str:
    """The whole reply to ``prompt`` as one string; keyword arguments as for ``stream_generate``."""
    return "".join(chunk.text for chunk in stream_generate(model, processor, prompt, images, **kwargs))


_CACHE_CLASSES = {c.__name__: c for c in (KVCache, QuantizedKVCache, ChunkCache, QuantizedChunkCache)}


def save_prompt_cache(file: str | Path, cache: PromptCache) -> None:
    """Save a prefilled conversation (e.g. a long document) so it can be questioned again without prefill."""
    if cache.offset == 0:
        raise ValueError("the prompt cache is empty: nothing to save")
    # Every cache class's state is (keys, values, *scalars).
    arrays = dict(tree_flatten([list(c.state[:2]) for c in cache.layers]))
    meta = {
        "classes": json.dumps([type(c).__name__ for c in cache.layers]),
        "scalars": json.dumps([list(c.state[2:]) for c in cache.layers]),
        "keys": json.dumps(cache.keys.tolist()),
    }
    mx.save_safetensors(str(file), arrays, meta)


def load_prompt_cache(file: str | Path, model: Model) -> PromptCache:
    arrays, meta = mx.load(str(file), return_metadata=True)
    tensors = tree_unflatten(list(arrays.items()))
    cache = PromptCache(model)
    classes, scalars = json.loads(meta["classes"]), json.loads(meta["scalars"])
    if len(classes) != len(cache.layers):
        raise ValueError(f"{file}: a prompt cache for {len(classes)} layers, but the model has {len(cache.layers)}")
    as_tuple = lambda x: tuple(x) if isinstance(x, list) else x  # noqa: E731  (quantized: packed, scales, biases)
    cache.layers = [
        _CACHE_CLASSES[name].from_state((as_tuple(t[0]), as_tuple(t[1]), *s))
        for name, t, s in zip(classes, tensors, scalars)
    ]
    cache.keys = np.asarray(json.loads(meta["keys"]), np.int64)
    return cache
