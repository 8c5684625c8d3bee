"""Text generation with images: ``generate`` and ``stream_generate``, and a prompt cache kept across turns.

The token loop, samplers, logits processors, KV quantization and streaming detokenizer are mlx-lm's; what is
ours is turning a prompt (text or chat messages, with images) into embeddings, reusing a conversation's KV
cache exactly (or rebuilding it when the chunked layers have dropped what a reuse would need), stop tokens
and statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

from .cache import ChunkCache, QuantizedChunkCache, can_trim_cache, trim_cache
from .images import ImageInput, tile_count
from .model import Model
from .structured import JSONConstraint, json_schema_of

DEFAULT_MAX_TOKENS = 256
# What MLX's affine ``mx.quantize`` accepts (MLX 0.32; tests/test_generate.py checks these against it).
KV_BITS = (1, 2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)
PROMPT_CACHE_FORMAT = "mlx-llama4 prompt cache 1"


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
        self.model_id = model_fingerprint(model)  # a cache is only valid for the model that filled it
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


def _check_cache_model(cache_id: str, model: Model, source: str) -> None:
    if cache_id != model_fingerprint(model):
        raise ValueError(
            f"{source} was filled by another model (its config or weights differ from this one's); a KV cache "
            "only fits the model that made it: use a new PromptCache(model) for this model"
        )


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


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_sampling(*, max_tokens: Any = 0, temperature: Any = 0.0, top_p: Any = 1.0, top_k: Any = 0, min_p: Any = 0.0,
                   repetition_penalty: Any = None, seed: Any = None, prefill_step_size: Any = None) -> None:
    """Raise a ``ValueError`` naming the first sampling argument that is out of range or of the wrong type
    (booleans are not numbers here)."""
    rules = (
        ("max_tokens", max_tokens, _is_int(max_tokens) and max_tokens >= 0, "an integer >= 0"),
        ("temperature", temperature, _is_number(temperature) and temperature >= 0, "a number >= 0 (0: greedy)"),
        ("top_p", top_p, _is_number(top_p) and 0 < top_p <= 1, "a number in (0, 1] (1: no nucleus filter)"),
        ("top_k", top_k, _is_int(top_k) and top_k >= 0, "an integer >= 0 (0: no top-k filter)"),
        ("min_p", min_p, _is_number(min_p) and 0 <= min_p <= 1, "a number in [0, 1] (0: no min-p filter)"),
        ("repetition_penalty", repetition_penalty,
         repetition_penalty is None or (_is_number(repetition_penalty) and repetition_penalty > 0),
         "a number > 0 (1 or None: no penalty)"),
        ("seed", seed, seed is None or (_is_int(seed) and 0 <= seed < 2**64), "an integer in [0, 2**64)"),
        ("prefill_step_size", prefill_step_size,
         prefill_step_size is None or (_is_int(prefill_step_size) and prefill_step_size > 0), "an integer > 0"),
    )
    for name, value, ok, expected in rules:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {value!r}")


def kv_group_size_for(model: Model, kv_bits: Optional[int], kv_group_size: Optional[int]) -> Optional[int]:
    """The group size to quantize the KV cache with (None when ``kv_bits`` is None).

    Keys and values are quantized along the head size, so the group size must divide it. Automatic (None):
    64, mlx-lm's default, when it divides the head size, else 32 (e.g. the demo model's head size 32).
    """
    head = model.config.text.head_dim
    valid = [g for g in KV_GROUP_SIZES if head % g == 0]
    if kv_bits is None:
        if kv_group_size is not None and not (_is_int(kv_group_size) and kv_group_size in KV_GROUP_SIZES):
            raise ValueError(f"kv_group_size must be one of {list(KV_GROUP_SIZES)} or None, got {kv_group_size!r}")
        return None
    if not (_is_int(kv_bits) and kv_bits in KV_BITS):
        raise ValueError(f"kv_bits must be one of {list(KV_BITS)} (MLX's quantization bits) or None, got {kv_bits!r}")
    if not valid:
        raise ValueError(f"this model's head size {head} is not a multiple of any quantization group size "
                         f"{list(KV_GROUP_SIZES)}, so its KV cache cannot be quantized")
    if kv_group_size is None:
        return next(g for g in (64, 32) if g in valid)
    if not (_is_int(kv_group_size) and kv_group_size in valid):
        raise ValueError(f"kv_group_size {kv_group_size!r} does not fit this model's head size {head}: the KV cache "
                         f"is quantized along the head size; valid group sizes: {valid} (None: automatic)")
    return int(kv_group_size)


def resolve_sampling(model: Model, processor: Any, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                     temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
                     min_p: float = 0.0, repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                     kv_bits: Optional[int] = None, kv_group_size: Optional[int] = None,
                     prefill_step_size: Optional[int] = None) -> dict:
    """The settings a generation runs with (``stream_generate``'s keywords): the checkpoint's defaults
    (``processor.generation_config``) for temperature, top-p and top-k not given, every value checked (a
    ``ValueError`` names the bad one), the KV group size chosen. Front ends call it to refuse bad settings
    before any prompt is read."""
    defaults = getattr(processor, "generation_config", {}) or {}
    settings = dict(
        max_tokens=max_tokens,
        temperature=defaults.get("temperature", 0.0) if temperature is None else temperature,
        top_p=defaults.get("top_p", 1.0) if top_p is None else top_p,
        top_k=defaults.get("top_k", 0) if top_k is None else top_k,
        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, prefill_step_size=prefill_step_size,
    )
    check_sampling(**settings)
    if settings["top_k"] >= model.config.text.vocab_size:
        settings["top_k"] = 0  # keeps every token, as no top-k filter does
    return dict(settings, kv_bits=kv_bits, kv_group_size=kv_group_size_for(model, kv_bits, kv_group_size))


def read_generation_config(path: Path) -> dict:
    """Sampling defaults and end tokens from a checkpoint's ``generation_config.json`` (absent: greedy)."""
    file = Path(path) / "generation_config.json"
    if not file.exists():
        return {}
    try:
        cfg = json.loads(file.read_text())
        eos = cfg.get("eos_token_id")
        out = {"eos_token_ids": [eos] if _is_int(eos) else list(eos or [])}
        if not all(_is_int(i) for i in out["eos_token_ids"]):
            raise ValueError(f"eos_token_id must be an integer or a list of integers, got {eos!r}")
        if cfg.get("do_sample"):
            for key in ("temperature", "top_p", "top_k"):
                if cfg.get(key) is not None:
                    out[key] = cfg[key]
        check_sampling(**{k: v for k, v in out.items() if k != "eos_token_ids"})
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from None
    return out


def _stop_tokens(model: Model, processor: Any, defaults: dict) -> set[int]:
    return set(processor.eos_token_ids) | set(model.config.text.eos_token_id) | set(defaults.get("eos_token_ids", []))


def _special_tokens(tokenizer: Any) -> set[int]:
    """The tokenizer's special tokens (``<|eot|>``, ``<|python_start|>``, reserved ones ...): control tokens that
    a reply's text never shows (its chunks' ``token`` still carry them)."""
    return {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}


def stream_generate(
    model: Model,
    processor: Any,
    prompt: str | Sequence[dict],
    images: Optional[ImageInput | Sequence[ImageInput]] = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: Optional[int] = None,
    prompt_cache: Optional[PromptCache] = None,
    prefill_step_size: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    response_format: Optional[Mapping[str, Any]] = None,
) -> Iterator[GenerationChunk]:
    """Stream the reply to ``prompt``: a string (one user turn, after ``images`` if any) or chat messages in the
    Hugging Face format, whose image parts without an inline image take ``images`` in order. ``images`` is one
    image (a path, bytes, PIL image or array) or a list of them.

    Sampling defaults come from the checkpoint's ``generation_config.json`` (temperature 0 = greedy when it
    has none). ``max_tokens=0`` only prefills (e.g. a prompt cache to save). ``kv_bits`` quantizes the KV cache
    of every layer, in groups of ``kv_group_size`` (None: automatic, see ``kv_group_size_for``). With
    ``prompt_cache`` only the tokens after the longest reusable prefix are fed, and the cache is left holding
    the whole conversation so far. ``progress(done, total)`` reports prefill progress. The prompt is fed
    ``prefill_step_size`` tokens at a time: by default one attention chunk, which bounds the activations of
    a long prefill to one chunk's. The text of the chunks never contains special tokens.

    ``response_format`` (OpenAI's ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
    {"schema": ...}}``, or a bare JSON schema) keeps the reply on that schema while sampling
    (``structured.JSONConstraint``): a reply that ends with ``finish_reason == "stop"`` is complete JSON that
    validates; one cut by ``max_tokens`` (``"length"``) may not be.
    """
    tic = time.perf_counter()
    settings = resolve_sampling(model, processor, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                kv_bits=kv_bits, kv_group_size=kv_group_size, prefill_step_size=prefill_step_size)
    if prompt_cache is not None:
        _check_cache_model(prompt_cache.model_id, model, "this prompt cache")
    stops = _stop_tokens(model, processor, getattr(processor, "generation_config", {}) or {})
    schema = json_schema_of(response_format)
    processors = make_logits_processors(repetition_penalty=settings["repetition_penalty"])
    if schema is not None:  # before the prompt is read: a schema llguidance cannot enforce fails at once
        processors.append(JSONConstraint(processor.tokenizer, schema, stops))
    if settings["seed"] is not None:
        mx.random.seed(settings["seed"])
    inputs = processor(messages=prompt if isinstance(prompt, str) else list(prompt), images=images)
    ids = np.asarray(inputs["input_ids"])[0]
    pixels = inputs["pixel_values"]
    per_tile = model.config.vision.tokens_per_tile if model.config.vision else 0
    keys, spans, first_tiles = _image_keys(ids, pixels, inputs["grids"], model.config.image_token_index, per_tile)

    limit = model.config.text.max_position_embeddings
    if len(ids) >= limit:
        raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {limit} positions "
                         "(max_position_embeddings)")
    max_tokens = min(settings["max_tokens"], limit - len(ids))

    cache = prompt_cache or PromptCache(model)
    start = cache.reuse(keys, spans)
    later = [i for i, (s, _) in enumerate(spans) if s >= start]  # images whose tokens are still to feed
    feed = mx.array(ids[start:])
    embeddings = None
    if later:
        embeddings = model.embed(feed[None], mx.array(pixels[first_tiles[later[0]]:]))[0]  # (L, D)

    hidden = _special_tokens(processor.tokenizer)
    detokenizer = NaiveStreamingDetokenizer(processor.tokenizer)
    steps = generate_step(
        feed, model.language_model, max_tokens=max_tokens,
        sampler=make_sampler(temp=settings["temperature"], top_p=settings["top_p"], min_p=settings["min_p"],
                             top_k=settings["top_k"]),
        logits_processors=processors,
        prompt_cache=cache.layers,
        prefill_step_size=settings["prefill_step_size"] or model.config.text.attention_chunk_size or 2048,
        kv_bits=settings["kv_bits"], kv_group_size=settings["kv_group_size"], quantized_kv_start=0,
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
            if finish != "stop" and token not in hidden:
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


def generate(model: Model, processor: Any, prompt: str | Sequence[dict],
             images: Optional[ImageInput | Sequence[ImageInput]] = None, **kwargs) -> str:
    """The whole reply to ``prompt`` as one string; keyword arguments as for ``stream_generate``."""
    return "".join(chunk.text for chunk in stream_generate(model, processor, prompt, images, **kwargs))


_CACHE_CLASSES = {c.__name__: c for c in (KVCache, QuantizedKVCache, ChunkCache, QuantizedChunkCache)}


def save_prompt_cache(file: str | Path, cache: PromptCache) -> None:
    """Save a prefilled conversation (e.g. a long document) so it can be questioned again without prefill.

    The file (safetensors, written under exactly this name) records the model it belongs to; it is written
    to a temporary sibling and renamed into place, so an interrupted save never leaves a partial file.
    """
    path = Path(file)
    if cache.offset == 0:
        raise ValueError("the prompt cache is empty: nothing to save")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: cannot save the prompt cache, the folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: cannot save the prompt cache, this is a folder")
    # Every cache class's state is (keys, values, *scalars).
    arrays = dict(tree_flatten([list(c.state[:2]) for c in cache.layers]))
    meta = {
        "format": PROMPT_CACHE_FORMAT,
        "model": cache.model_id,
        "classes": json.dumps([type(c).__name__ for c in cache.layers]),
        "scalars": json.dumps([list(c.state[2:]) for c in cache.layers]),
        "keys": json.dumps(cache.keys.tolist()),
    }
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as f:
            mx.save_safetensors(f, arrays, meta)
        os.replace(partial, path)
    except (OSError, RuntimeError) as e:
        with suppress(OSError):
            partial.unlink()
        kind = type(e) if isinstance(e, OSError) else OSError
        raise kind(f"{path}: cannot write the prompt cache ({getattr(e, 'strerror', None) or e})") from None


def load_prompt_cache(file: str | Path, model: Model) -> PromptCache:
    """A conversation saved by ``save_prompt_cache``, for ``model`` (the model that filled it, or a fresh
    load of the same checkpoint; any other model is refused)."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt cache file" if not path.exists() else f"{path}: not a file")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a prompt cache, or a corrupt or truncated one ({e})") from None
    if meta.get("format") != PROMPT_CACHE_FORMAT:
        raise ValueError(f"{path}: not a prompt cache written by save_prompt_cache (no {PROMPT_CACHE_FORMAT!r} mark)")
    _check_cache_model(meta.get("model"), model, f"the prompt cache {path}")
    cache = PromptCache(model)
    try:
        classes, scalars = json.loads(meta["classes"]), json.loads(meta["scalars"])
        if len(classes) != len(cache.layers) or len(scalars) != len(classes):
            raise ValueError(f"{len(classes)} layers, but the model has {len(cache.layers)}")
        tensors = tree_unflatten(list(arrays.items()))
        as_tuple = lambda x: tuple(x) if isinstance(x, list) else x  # noqa: E731  (quantized: packed, scales, biases)
        cache.layers = [
            _CACHE_CLASSES[name].from_state((as_tuple(t[0]), as_tuple(t[1]), *s))
            for name, t, s in zip(classes, tensors, scalars, strict=True)
        ]
        cache.keys = np.asarray(json.loads(meta["keys"]), np.int64)
        mx.eval([c.state for c in cache.layers])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt prompt cache ({type(e).__name__}: {e})") from None
    return cache
