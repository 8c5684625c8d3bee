"""What a caller gives the engine and gets back: sampling parameters (validated in the caller's thread), the
events of a reply, and the handle that streams them."""

from __future__ import annotations

import asyncio
import math
import queue
import threading
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence

import mlx.core as mx

from ..generation import DEFAULT_MAX_TOKENS, check_sampling

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]  # (tokens so far (T,), logits (1, V)) -> logits

MAX_TOP_LOGPROBS = 20


class EngineFull(RuntimeError):
    """The engine's queue is full: the request was not taken (a front door answers 429 or 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. None means the checkpoint's default (``generation_config.json``; greedy
    when it has none) for temperature / top_p / top_k, and off for the penalties."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None  # the same seed gives the same tokens, whatever else runs in the batch
    stop: Optional[str | Sequence[str]] = None  # strings that end the reply (not part of it)
    logprobs: bool = False  # report the sampled token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives
    logits_processors: Optional[Sequence[LogitsProcessor]] = None  # run after mlx-lm's (penalties, bias)

    def resolved(self, defaults: dict, vocab_size: int) -> "SamplingParams":
        """These parameters with the checkpoint's defaults filled in, checked; ValueError names the field."""
        p = replace(
            self,
            temperature=defaults.get("temperature", 0.0) if self.temperature is None else self.temperature,
            top_p=defaults.get("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=defaults.get("top_k", 0) if self.top_k is None else self.top_k,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            logits_processors=list(self.logits_processors or []),
            logit_bias=dict(self.logit_bias or {}),
        )
        check_sampling(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                       min_p=p.min_p, repetition_penalty=p.repetition_penalty, seed=p.seed)
        _integer("max_tokens", p.max_tokens, low=1)  # a request must generate (stream_generate also prefills only)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(p, name) is not None:
                _real(name, getattr(p, name))
        for token, bias in p.logit_bias.items():
            _integer("logit_bias token", token, low=0, high=vocab_size - 1)
            _real(f"logit_bias[{token}]", bias)
        if not all(isinstance(s, str) and s for s in p.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not isinstance(p.logprobs, bool):
            raise ValueError(f"logprobs must be true or false, got {p.logprobs!r}")
        _integer("top_logprobs", p.top_logprobs, low=0, high=MAX_TOP_LOGPROBS)
        if not all(callable(f) for f in p.logits_processors):
            raise ValueError("logits_processors must be callables (tokens, logits) -> logits")
        # mlx-lm's top-k needs 0 < k < vocab; keeping the whole vocabulary is no filter at all.
        return replace(p, top_k=0 if p.top_k >= vocab_size else p.top_k, logprobs=p.logprobs or p.top_logprobs > 0)


def _integer(name: str, value, low: Optional[int] = None, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {'inf' if high is None else high}], got {value}")


def _real(name: str, value, low: Optional[float] = None, high: Optional[float] = None, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (open_low and value == low)):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


@dataclass(frozen=True)
class Event:
    """One step of a reply. The last event of a reply has a ``finish_reason``."""

    text: str  # new text since the previous event (special tokens excluded; a possible stop string held back)
    token: Optional[int]  # the token sampled at this step; None on a final event without one
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error" on the last event
    logprob: Optional[float] = None  # log-softmax of the model's logits at ``token`` (if logprobs were asked)
    top_logprobs: Optional[list[tuple[int, float]]] = None  # (token, logprob), most likely first
    prompt_tokens: int = 0  # the prompt's length
    cached_tokens: int = 0  # of those, taken from the prefix cache
    completion_tokens: int = 0  # tokens sampled so far
    time_to_first_token: Optional[float] = None  # seconds from submit to the first token
    error: Optional[str] = None  # what went wrong, when finish_reason is "error"


class Handle:
    """A submitted request: iterate it (blocking, or ``async for``) for its events; ``cancel()`` frees its
    row at the engine's next step."""

    def __init__(self, request_id: int, wake: Callable[[], None]):
        self.id = request_id
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._wake = wake
        self._done = False  # the final event was handed to the caller
        # (prompt positions read, prompt length), set by the engine as the prefill goes, for progress displays
        self.progress = (0, 0)

    def cancel(self) -> None:
        """Stop this request; its stream ends with a "cancelled" event (unless it had already finished)."""
        self._cancelled.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, event: Event) -> None:
        self._events.put(event)

    def _take(self, event: Event) -> Event:
        self._done = event.finish_reason is not None
        return event

    def __iter__(self) -> Iterator[Event]:
        while not self._done:
            yield self._take(self._events.get())

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self._done:
            yield self._take(await asyncio.to_thread(self._events.get))

    def result(self) -> str:
        """The (rest of the) reply's text, once it is finished; RuntimeError if the engine failed on it."""
        text, last = [], None
        for last in self:
            text.append(last.text)
        if last is not None and last.finish_reason == "error":
            raise RuntimeError(f"request {self.id} failed: {last.error}")
        return "".join(text)
