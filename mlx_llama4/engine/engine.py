"""The generation engine: many requests through one model, with continuous batching on one device thread.

Each loop iteration (1) takes a waiting request when a row is free, (2) feeds one piece (at most
``prefill_step`` tokens) of the request being prefilled, alone, through the one-sequence path, and (3) runs one
batched decode step for all running rows. A prefilled request samples its first token from its last logits
and joins the batch; a finished or cancelled one leaves it before the next step, and its KV goes to the prefix
cache. Prompt processing (template, tokenizer, images) happens in ``submit``, in the caller's thread; every
MLX operation runs on the engine's thread.

With a model split across processes (``model.sharding``), this engine runs on process 0 and sends each step's
plan to the others, which run ``follower.follow`` (plans.py says how).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..generation import kv_group_size_for, stop_tokens
from ..model import Model
from ..prompts import Prompt, prepare_prompt
from ..text_stream import TextStream, special_token_ids
from .batch_cache import BatchCache
from .plans import PlanSender
from .prefill import feed_piece
from .prefix_cache import PrefixCache
from .requests import EngineFull, Event, Handle, SamplingParams
from .sampling import Choice, RowSampler

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    """A request inside the engine."""

    handle: Handle
    prompt: Prompt
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or less where the context ends first
    text: TextStream
    submitted: float
    sampler: Optional[RowSampler] = None  # made on the device thread, when its prefill starts
    caches: Optional[list[Any]] = None  # one-sequence caches while prefilling
    cached: int = 0  # prompt positions restored from the prefix cache
    fed: int = 0  # prompt positions fed so far
    embeddings: Optional[mx.array] = None  # (L - cached, D) when the rest of the prompt holds images
    generated: list[int] = field(default_factory=list)
    first_token_at: Optional[float] = None
    final: Optional[Event] = None  # its last event, sent once its row is freed

    def fed_keys(self) -> np.ndarray:
        """Keys of the positions its cache holds: the prompt and every sampled token but the last."""
        return np.concatenate([self.prompt.keys, np.asarray(self.generated[:-1], np.int64)])


class Engine:
    """Runs requests through ``model`` together; see ``submit``. Starts its device thread at once. For a model
    split across processes, make it on process 0 while the others run ``follow(model)``."""

    def __init__(self, model: Model, processor: Any, *, max_batch: int = 8, max_queue: int = 64,
                 prefill_step: int = 512, prefix_cache_bytes: int = 2 * 2**30, kv_bits: Optional[int] = None,
                 kv_group_size: Optional[int] = None):
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                                 ("prefill_step", prefill_step, 1), ("prefix_cache_bytes", prefix_cache_bytes, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        kv_group_size = kv_group_size_for(model, kv_bits, kv_group_size)  # ValueError names a bad one
        if model.sharding is not None and model.sharding.mode != "tensor":
            raise ValueError(f"the engine runs on a model split by tensor parallelism, not {model.sharding.mode} "
                             "parallelism (which generate and chat support)")
        self.model = model
        self.processor = processor
        self.max_batch, self.max_queue, self.prefill_step = max_batch, max_queue, prefill_step
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self._defaults = getattr(processor, "generation_config", {}) or {}
        self._stop_tokens = stop_tokens(model, processor)
        self._special = special_token_ids(processor.tokenizer)
        self._entropy = np.random.default_rng()

        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()  # submitted, not yet given a row
        self._in_flight = 0  # waiting + prefilling + running
        self._closed = False
        self._next_id = 0
        self._prefilling: Optional[_Sequence] = None
        self._running: list[_Sequence] = []  # in the batch's row order
        self._batch = BatchCache(model.make_cache(), kv_bits, kv_group_size)
        self._prefix = PrefixCache(model, prefix_cache_bytes) if prefix_cache_bytes else None
        self._totals = dict(requests=0, prompt_tokens=0, cached_tokens=0, generated_tokens=0)
        self._plans = PlanSender(model.sharding.group if model.sharding is not None else None)
        self._plans.record("engine", kv_bits, kv_group_size)
        self._thread = threading.Thread(target=self._loop, name="mlx-llama4-engine", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # its arrays must be freed on its thread before the process exits

    # ---- the caller's side -----------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[dict] | Sequence[int], images: Optional[Sequence[Any]] = None,
               tools: Optional[Sequence[dict]] = None, **sampling: Any) -> Handle:
        """Queue a request and return its handle at once.

        ``prompt``: a string (one user turn, after ``images``), chat messages in the Hugging Face format (image
        parts inline or taking ``images`` in order), or token ids (a raw completion). ``tools`` (function specs)
        go into the prompt through the checkpoint's chat template. Keywords are the fields of
        ``SamplingParams`` (max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
        frequency_penalty, logit_bias, seed, stop, logprobs, top_logprobs, logits_processors).
        Raises ValueError for bad input (naming it), EngineFull when ``max_batch + max_queue`` requests are
        already in the engine, RuntimeError once the engine is closed.
        """
        params = SamplingParams(**sampling).resolved(self._defaults, self.model.config.text.vocab_size)
        prepared = prepare_prompt(self.model, self.processor, prompt, images, tools)
        room = self.model.config.text.max_position_embeddings - len(prepared)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise EngineFull(f"{self._in_flight} requests in the engine, the most it takes "
                                 f"(max_batch {self.max_batch} + max_queue {self.max_queue}); retry later")
            handle = Handle(self._next_id, self._wake)
            self._next_id += 1
            self._waiting.append(_Sequence(
                handle, prepared, params, min(params.max_tokens, room),
                TextStream(self.processor.tokenizer, self._special, params.stop), time.perf_counter(),
            ))
            self._in_flight += 1
            self._lock.notify()
        return handle

    def stats(self) -> dict:
        """Counts for monitoring: rows running, requests queued, prefix-cache use, tokens so far."""
        with self._lock:
            queued = len(self._waiting)
        prefix = self._prefix
        return dict(
            running=len(self._running), prefilling=int(self._prefilling is not None), queued=queued,
            max_batch=self.max_batch, max_queue=self.max_queue, batch_cache_bytes=self._batch.nbytes,
            prefix_cache_entries=len(prefix) if prefix else 0, prefix_cache_bytes=prefix.nbytes if prefix else 0,
            prefix_cache_max_bytes=prefix.max_bytes if prefix else 0, prefix_cache_hits=prefix.hits if prefix else 0,
            **self._totals,
        )

    def close(self) -> None:
        """Stop the device thread; requests still in the engine end with "cancelled". Split across processes,
        wait for it at most ``plans.CLOSE_WAIT`` seconds."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(self._plans.close_wait)
        if self._thread.is_alive():  # split across processes: a collective that never returns
            log.error("the engine did not stop within %s s: another process of the launch has gone",
                      self._plans.close_wait)
        atexit.unregister(self.close)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # ---- the device thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._closed or self._waiting or self._prefilling or self._running):
                        if not self._lock.wait(self._plans.beat):
                            break  # split across processes: the step sends an "idle" plan
                    if self._closed:
                        break
                    if self._prefilling is None and self._waiting and len(self._running) < self.max_batch:
                        self._prefilling = self._waiting.popleft()
                self._drop_cancelled()
                if self._prefilling is not None:
                    self._prefill_piece(self._prefilling)
                if self._running:
                    self._decode_step()
                self._plans.idle()
        except Exception as e:  # a bug: fail every request rather than leave callers waiting forever
            log.exception("engine loop failed")
            self._shut_down("error", f"engine failure: {e}")
        else:
            self._shut_down("cancelled", None)
        # Free what this thread computed and let its stream finish while the thread still runs: otherwise MLX
        # (0.32, thread-local streams) may abort the process at exit ("terminate called without an active
        # exception").
        self._batch.filter([])
        if self._prefix is not None:
            self._prefix.clear()
        mx.synchronize()
        self._plans.stop()
        mx.clear_streams()
        mx.clear_cache()

    def _shut_down(self, reason: str, error: Optional[str]) -> None:
        with self._lock:
            self._closed = True
            seqs = [*self._waiting, *([self._prefilling] if self._prefilling else []), *self._running]
            self._waiting.clear()
        self._prefilling, self._running = None, []
        for seq in seqs:
            self._finish(seq, Event("", None, reason, error=error, **self._usage(seq)))

    def _drop_cancelled(self) -> None:
        with self._lock:
            dropped = [s for s in self._waiting if s.handle.cancelled]
            for seq in dropped:
                self._waiting.remove(seq)
        if self._prefilling is not None and self._prefilling.handle.cancelled:
            dropped.append(self._prefilling)
            self._prefilling = None
            self._plans.record("drop")
        for seq in dropped:
            self._finish(seq, Event(seq.text.finish(), None, "cancelled", **self._usage(seq)))
        cancelled = [s for s in self._running if s.handle.cancelled]
        for seq in cancelled:
            seq.final = Event(seq.text.finish(), None, "cancelled", **self._usage(seq))
        self._retire(cancelled)

    def _prefill_piece(self, seq: _Sequence) -> None:
        """Feed the next piece of ``seq``'s prompt, as mlx-lm's generate_step does: all but the last token in
        pieces, then the last token alone, whose logits give the first token."""
        try:
            if seq.caches is None:
                self._start_prefill(seq)
            left = len(seq.prompt) - seq.fed
            n = min(self.prefill_step, left - 1) if left > 1 else 1
            self._plans.send("prefill", n, left == 1)
            at = seq.fed - seq.cached
            embeddings = None if seq.embeddings is None else seq.embeddings[at : at + n]
            logits = feed_piece(self.model, seq.prompt.ids[seq.fed : seq.fed + n], embeddings, seq.caches,
                                left == 1, self.kv_bits, self.kv_group_size)  # (1, n, V)
            seq.fed += n
            seq.handle.progress = (seq.fed, len(seq.prompt))
            if left > 1:
                return
            self._prefilling = None
            seq.embeddings = None
            caches, seq.caches = seq.caches, None
            if self._sample([seq], logits[:, -1, :]):  # finished at its first token
                self._store(seq, caches)
                self._plans.record("drop")
                self._finish(seq, seq.final)
                return
            self._store(seq, caches)  # the prompt's KV, for requests that share it (the batch copies it)
            self._batch.add(caches)
            self._plans.record("join")
            self._running.append(seq)
        except Exception as e:
            log.exception("prefill of request %d failed", seq.handle.id)
            self._prefilling = None
            self._plans.record("drop")
            self._finish(seq, Event("", None, "error", error=f"{type(e).__name__}: {e}", **self._usage(seq)))

    def _start_prefill(self, seq: _Sequence) -> None:
        prompt = seq.prompt
        seq.sampler = RowSampler(seq.params, prompt.ids)
        start, caches, entry = (self._prefix.fetch(prompt.keys, prompt.image_spans) if self._prefix
                                else (0, None, None))
        seq.caches = caches if caches is not None else self.model.make_cache()
        seq.cached = seq.fed = start
        seq.handle.progress = (start, len(prompt))
        later = [i for i, (s, _) in enumerate(prompt.image_spans) if s >= start]  # images still to feed
        pixels = prompt.pixel_values[prompt.first_tiles[later[0]] :] if later else None  # (tiles, 3, S, S)
        if pixels is not None:
            seq.embeddings = self.model.embed(mx.array(prompt.ids[start:])[None], mx.array(pixels))[0]  # (L - start, D)
        self._plans.record("start", prompt.ids[start:], pixels, None if entry is None else [entry, start])

    def _decode_step(self) -> None:
        rows = self._running
        last = [s.generated[-1] for s in rows]
        self._plans.send("decode", last)
        tokens = mx.array(last, dtype=mx.int32)[:, None]  # (B, 1)
        try:
            logits = self.model.language_model(tokens, cache=self._batch.layers)[:, -1, :]  # (B, V)
            finished = self._sample(rows, logits)
        except Exception as e:
            log.exception("decode step failed")
            for seq in rows:
                seq.final = Event("", None, "error", error=f"{type(e).__name__}: {e}", **self._usage(seq))
            self._retire(list(rows), store=False)  # the batch's KV may be half updated
            return
        self._retire(finished)

    def _sample(self, seqs: list[_Sequence], logits: mx.array) -> list[_Sequence]:
        """Choose each row's next token from ``logits`` (B, V) and send its event; returns the rows that
        finished, their last event kept in ``final``. A row whose own logits processor fails ends with "error",
        the others go on."""
        choices: list[Choice | Exception] = []
        for b, seq in enumerate(seqs):
            try:
                choices.append(seq.sampler.choose(logits[b : b + 1], self._entropy))
            except Exception as e:
                log.exception("sampling for request %d failed", seq.handle.id)
                choices.append(e)
        # The logits too: split across processes, their step's collectives must run even if every row failed.
        mx.eval(logits, [c.arrays() for c in choices if isinstance(c, Choice)])
        finished = []
        for seq, choice in zip(seqs, choices):
            if isinstance(choice, Exception):
                event = Event("", None, "error", error=f"{type(choice).__name__}: {choice}", **self._usage(seq))
            else:
                event = self._advance(seq, choice)
            if event.finish_reason is None:
                seq.handle._put(event)
            else:
                seq.final = event
                finished.append(seq)
        return finished

    def _advance(self, seq: _Sequence, choice: Choice) -> Event:
        """Take the chosen token into ``seq``: its event, final if it ends the reply."""
        token = choice.token.item()
        seq.sampler.accept(token)
        seq.generated.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if token in self._stop_tokens:
            text, reason = seq.text.finish(), "stop"
        else:
            text = seq.text.add(token)
            reason = "stop" if seq.text.stopped else None
            if reason is None and len(seq.generated) >= seq.max_tokens:
                text += seq.text.finish()
                reason = "stop" if seq.text.stopped else "length"
        logprob = None if choice.logprob is None else choice.logprob.item()
        top = None
        if choice.top_tokens is not None:
            top = sorted(zip(choice.top_tokens[0].tolist(), choice.top_logprobs[0].tolist()), key=lambda t: -t[1])
        return Event(text, token, reason, logprob, top, **self._usage(seq))

    def _retire(self, seqs: list[_Sequence], store: bool = True) -> None:
        """Take finished rows out of the batch, their KV to the prefix cache first."""
        if not seqs:
            return
        leaving = {id(s) for s in seqs}
        for row, seq in enumerate(self._running):
            if store and id(seq) in leaving and self._prefix is not None:
                self._store(seq, self._batch.extract(row), row)
        keep = [r for r, s in enumerate(self._running) if id(s) not in leaving]
        self._batch.filter(keep)
        self._plans.record("filter", keep)
        self._running = [self._running[r] for r in keep]
        for seq in seqs:
            self._finish(seq, seq.final)

    def _store(self, seq: _Sequence, caches: list[Any], row: Optional[int] = None) -> None:
        """Offer ``caches`` (the prompt just prefilled, or batch row ``row``) to the prefix cache."""
        if self._prefix is not None:
            mx.eval([c.state for c in caches])
            self._plans.record("keep", *self._prefix.insert(seq.fed_keys(), caches), row)

    def _finish(self, seq: _Sequence, event: Event) -> None:
        """Count a request out, then send its final event."""
        t = self._totals
        t["requests"] += 1
        t["prompt_tokens"] += len(seq.prompt)
        t["cached_tokens"] += seq.cached
        t["generated_tokens"] += len(seq.generated)
        with self._lock:
            self._in_flight -= 1
        seq.handle._put(event)

    def _usage(self, seq: _Sequence) -> dict:
        ttft = None if seq.first_token_at is None else seq.first_token_at - seq.submitted
        return dict(prompt_tokens=len(seq.prompt), cached_tokens=seq.cached, completion_tokens=len(seq.generated),
                    time_to_first_token=ttft)
