"""Text generation with images: ``generate`` and ``stream_generate``, and a prompt cache kept across turns.

The token loop, samplers, logits processors, KV quantization and streaming detokenizer are mlx-lm's; what is
ours is turning a prompt (text or chat messages, with images) into embeddings, reusing a conversation's KV
cache exactly (or rebuilding it when the chunked layers have dropped what a reuse would need), stop tokens
and statistics.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .cache import global_kv_bits, quantize_global_layers
from .images import ImageInput
from . import long_context
from .model import Model
from .prompt_cache import PromptCache, check_cache_model, embeddings_to_feed
from .prompts import prepare_prompt
from .sharding import rank0_sampler
from .text_stream import TextStream, special_token_ids
from .structured import JSONConstraint, json_schema_of

DEFAULT_MAX_TOKENS = 256
# What MLX's affine ``mx.quantize`` accepts (MLX 0.32; tests/test_generate.py checks these against it).
KV_BITS = (1, 2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)


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
    kv_bits: Optional[int] = None  # bits of the global layers' KV cache; None: float


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


def kv_group_size_for(model: Model, kv_bits: Optional[int | str], kv_group_size: Optional[int]) -> Optional[int]:
    """The group size to quantize the KV cache with (None when ``kv_bits`` is None, or ``"auto"`` on a model
    whose KV cannot be quantized).

    Keys and values are quantized along the head size, so the group size must divide it. Automatic (None):
    64, mlx-lm's default, when it divides the head size, else 32 (e.g. the demo model's head size 32).
    """
    head = model.config.text.head_dim
    valid = [g for g in KV_GROUP_SIZES if head % g == 0]
    if kv_bits == "auto":
        if not valid and kv_group_size is None:
            return None  # "auto" then keeps the KV float
        kv_bits = long_context.LONG_CONTEXT_KV_BITS
    if kv_bits is None:
        if kv_group_size is not None and not (_is_int(kv_group_size) and kv_group_size in KV_GROUP_SIZES):
            raise ValueError(f"kv_group_size must be one of {list(KV_GROUP_SIZES)} or None, got {kv_group_size!r}")
        return None
    if not (_is_int(kv_bits) and kv_bits in KV_BITS):
        raise ValueError(f"kv_bits must be one of {list(KV_BITS)} (MLX's quantization bits), 'auto' or None, "
                         f"got {kv_bits!r}")
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
                     kv_bits: Optional[int | str] = "auto", kv_group_size: Optional[int] = None,
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


def stop_tokens(model: Model, processor: Any) -> set[int]:
    """Every end token: the tokenizer's and the chat format's, and those config.json and generation_config.json
    list."""
    defaults = getattr(processor, "generation_config", {}) or {}
    return set(processor.eos_token_ids) | set(model.config.text.eos_token_id) | set(defaults.get("eos_token_ids", []))




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
    kv_bits: Optional[int | str] = "auto",
    kv_group_size: Optional[int] = None,
    prompt_cache: Optional[PromptCache] = None,
    prefill_step_size: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    response_format: Optional[Mapping[str, Any]] = None,
    tools: Optional[Sequence[dict]] = None,
) -> Iterator[GenerationChunk]:
    """Stream the reply to ``prompt``: a string (one user turn, after ``images`` if any) or chat messages in the
    Hugging Face format, whose image parts without an inline image take ``images`` in order. ``images`` is one
    image (a path, bytes, PIL image or array) or a list of them. ``tools`` (function specs, OpenAI or Hugging
    Face style) go into the prompt through the checkpoint's chat template; ``mlx_llama4.tool_calls`` reads
    the calls in the reply.

    Sampling defaults come from the checkpoint's ``generation_config.json`` (temperature 0 = greedy when it
    has none). ``max_tokens=0`` only prefills (e.g. a prompt cache to save). ``kv_bits`` (1-6 or 8) quantizes
    the KV cache of every layer, in groups of ``kv_group_size`` (None: automatic, see ``kv_group_size_for``);
    ``"auto"`` (the default) keeps it float unless the prompt and reply reach ``LONG_CONTEXT_TOKENS`` positions
    (``long_context.py``), and then quantizes the global layers' KV to ``LONG_CONTEXT_KV_BITS`` bits (each
    chunk's ``kv_bits`` says which); None keeps it float. With ``prompt_cache`` only the tokens after the
    longest reusable prefix are fed, and the cache is left holding the whole conversation so far.
    ``progress(done, total)`` reports prefill progress. The prompt is fed ``prefill_step_size`` tokens at a
    time: by default one attention chunk, which bounds the activations of a long prefill to one chunk's (and
    the global layers attend over key blocks, ``blocked_attention``). The text of the chunks never contains
    special tokens.

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
        check_cache_model(prompt_cache.model_id, model, "this prompt cache")
    stops = stop_tokens(model, processor)
    schema = json_schema_of(response_format)
    processors = make_logits_processors(repetition_penalty=settings["repetition_penalty"])
    if schema is not None:  # before the prompt is read: a schema llguidance cannot enforce fails at once
        processors.append(JSONConstraint(processor.tokenizer, schema, stops))
    if settings["seed"] is not None:
        mx.random.seed(settings["seed"])
    inputs = prepare_prompt(model, processor, prompt, images, tools)  # refuses a prompt that does not fit the context
    max_tokens = min(settings["max_tokens"], model.config.text.max_position_embeddings - len(inputs))

    cache = prompt_cache or PromptCache(model)
    start = cache.reuse(inputs.keys, inputs.image_spans)
    context = len(inputs) + max_tokens
    kv_bits, group = settings["kv_bits"], settings["kv_group_size"]
    if kv_bits == "auto":
        if group and context >= long_context.LONG_CONTEXT_TOKENS:
            quantize_global_layers(cache.layers, long_context.LONG_CONTEXT_KV_BITS, group)
        kv_bits = None
    feed = mx.array(inputs.ids[start:])
    embeddings = embeddings_to_feed(model, inputs.ids, start, inputs.image_spans, inputs.first_tiles,
                                    inputs.pixel_values)
    text = TextStream(processor.tokenizer, special_token_ids(processor.tokenizer))
    sampler = make_sampler(temp=settings["temperature"], top_p=settings["top_p"], min_p=settings["min_p"],
                           top_k=settings["top_k"])
    if model.sharding is not None:  # split across processes: all feed process 0's token
        sampler = rank0_sampler(sampler, model.sharding.group)

    def reserve_and_report(done: int, total: int) -> None:
        # The global layers are sized once for the whole context; with kv_bits, generate_step quantizes the
        # caches after the first piece, so they are sized then (sizing the float ones would allocate float).
        if done or kv_bits is None:
            cache.reserve(context)
        if progress is not None:
            progress(done, total)

    steps = generate_step(
        feed, model.language_model, max_tokens=max_tokens, sampler=sampler,
        logits_processors=processors,
        prompt_cache=cache.layers,
        prefill_step_size=settings["prefill_step_size"] or model.config.text.attention_chunk_size or 2048,
        kv_bits=kv_bits, kv_group_size=group, quantized_kv_start=0,
        prompt_progress_callback=reserve_and_report, input_embeddings=embeddings,
    )
    generated: list[int] = []
    ttft = prompt_tps = 0.0
    global_bits = None
    try:
        for n, (token, _) in enumerate(steps):
            if n == 0:
                ttft = time.perf_counter() - tic
                prompt_tps = len(feed) / ttft
                global_bits = global_kv_bits(cache.layers)
                tic = time.perf_counter()
            generated.append(token)
            finish = "stop" if token in stops else ("length" if n + 1 == max_tokens else None)
            piece = ("" if finish == "stop" else text.add(token)) + (text.finish() if finish else "")  # no end token
            yield GenerationChunk(
                text=piece, token=token, finish_reason=finish, prompt_tokens=len(feed),
                prompt_tps=prompt_tps, generation_tokens=n + 1,
                generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
                time_to_first_token=ttft, peak_memory=mx.get_peak_memory() / 1e9, kv_bits=global_bits,
            )
            if finish:
                return
    finally:
        if model.sharding is not None:
            # generate_step has started the step after the last token; let its collectives finish before the
            # processes' next ones, which may run on another stream.
            mx.synchronize(generation_stream)
        # Whatever was fed (the prompt and the tokens sampled so far) is what the cache now holds.
        held = np.concatenate([inputs.keys, np.asarray(generated, np.int64)])
        cache.keys = held[: cache.offset]


def generate(model: Model, processor: Any, prompt: str | Sequence[dict],
             images: Optional[ImageInput | Sequence[ImageInput]] = None, **kwargs) -> str:
    """The whole reply to ``prompt`` as one string; keyword arguments as for ``stream_generate``."""
    return "".join(chunk.text for chunk in stream_generate(model, processor, prompt, images, **kwargs))
