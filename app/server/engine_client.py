"""The server's one door to the batching engine (``mlx_llama4.engine``): every engine call is in this module.

The engine runs MLX on its own device thread and hands each request's events to a blocking iterator. Here
each request gets a small pump thread that moves those events onto the event loop, so a slow client, a
disconnect or many waiting requests never block the server; cancelling a ``Generation`` (the client left)
frees its row at the engine's next step. Refusals become ``APIError``s: a full queue 429, bad input 400, a
closed engine 503.

Two request features become engine arguments here, so that no other module of the server builds MLX objects:
a JSON schema the reply must follow (``JSONOutput``: a response format or a forced tool call) becomes a
per-request logits processor (``mlx_llama4.structured.JSONConstraint``, one per request since it holds the
sequence's grammar state), and the tools offered are handed to the chat template (``tools=``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import anyio

from .errors import APIError
from .metrics import ServerMetrics


@dataclass(frozen=True)
class JSONOutput:
    """A JSON schema the reply is kept on while sampling; ``field`` names the request field it comes from, so
    that a schema the grammar engine cannot enforce is refused naming that field."""

    schema: dict
    field: str


@dataclass(frozen=True)
class Sampling:
    """How to generate one reply: the engine's ``submit`` keywords. ``None`` is the checkpoint's default."""

    max_tokens: int
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # None, or how many top alternatives to report per token (0..20)
    json_output: Optional[JSONOutput] = None  # keep the reply on a JSON schema (not an engine keyword itself)


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Generation:
    """One request's engine events as an async iterator; each event has ``text``, ``token``, ``logprob``,
    ``top_logprobs``, ``finish_reason``, ``prompt_tokens``, ``cached_tokens``, ``completion_tokens``, ``error``."""

    def __init__(self, handle: Any, metrics: ServerMetrics, submitted: float):
        self._handle, self._metrics, self._submitted = handle, metrics, submitted
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._pump, name="engine-events", daemon=True).start()

    def _pump(self) -> None:
        first, last = True, None
        try:
            for last in self._handle:
                if first and last.token is not None:
                    self._metrics.ttft.observe(time.perf_counter() - self._submitted)
                    first = False
                self._deliver(last)
        except BaseException as e:  # an engine failure: handed to the request, which answers 500
            self._deliver(_Failure(e))
        finally:
            if last is not None and last.finish_reason:
                self._metrics.sequence_finished(last.finish_reason, last.prompt_tokens or 0,
                                                last.cached_tokens or 0, last.completion_tokens or 0)
            self._deliver(_END)

    def _deliver(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (server shut down): nobody is listening any more
            self._handle.cancel()

    def cancel(self) -> None:
        """Stop generating (the client has gone); the engine frees the row at its next step."""
        self._handle.cancel()

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            raise item.error
        return item


def follow(model: str, revision: Optional[str] = None) -> bool:
    """Under ``mlx.launch``, on every process but 0: load this process's share of ``model`` and carry out process
    0's engine steps until its server stops, then return True. Alone or on process 0, False at once."""
    from mlx_llama4.engine import follow_if_launched

    return follow_if_launched(model, revision)


class EngineClient:
    """The loaded model's engine, as the HTTP routes use it."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.metrics = ServerMetrics(engine.stats)
        self._closed = False
        tokenizer = engine.processor.tokenizer
        self._byte_of_char = {c: b for b, c in _bytes_to_unicode().items()}
        self.vocab_size = len(tokenizer)
        self._end_tokens = frozenset(engine.processor.eos_token_ids)

    @classmethod
    def start(cls, model: str, *, revision: Optional[str] = None, max_batch: int = 8, max_queue: int = 64,
              prefix_cache_bytes: int = 2 * 2**30, kv_bits: Optional[int] = None,
              kv_group_size: Optional[int] = None) -> "EngineClient":
        """Load ``model`` (a folder, a Hub repo id or "demo") and start an engine on it. Under ``mlx.launch`` this
        is process 0: it loads its share, and the other processes ``follow`` (see there)."""
        from mlx_llama4 import load
        from mlx_llama4.engine import Engine
        from mlx_llama4.sharding import process_group

        loaded, processor = load(model, revision=revision, group=process_group())
        return cls(Engine(loaded, processor, max_batch=max_batch, max_queue=max_queue,
                          prefix_cache_bytes=prefix_cache_bytes, kv_bits=kv_bits, kv_group_size=kv_group_size))

    async def submit(self, prompt: str | Sequence[dict] | list[int], sampling: Sampling,
                     tools: Optional[list[dict]] = None) -> Generation:
        """Queue a request: chat messages in the Hugging Face format (images as PIL images), or token ids.
        ``tools`` (OpenAI function specs) are rendered into the prompt by the checkpoint's chat template."""
        from mlx_llama4.engine import EngineFull

        if self._closed:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        submitted = time.perf_counter()
        handles = []  # kept here: if the request is cancelled (shutdown) while submit runs, its handle is too

        params = asdict(sampling)
        top = params.pop("logprobs")  # the engine takes a flag and a count
        params.update(logprobs=top is not None, top_logprobs=top or 0)

        def call() -> None:
            keywords = dict(params)
            del keywords["json_output"]
            if sampling.json_output is not None:
                keywords["logits_processors"] = [self._json_constraint(sampling.json_output)]
            if tools:
                keywords["tools"] = tools
            handles.append(self._engine.submit(prompt, **keywords))

        try:  # tokenizing, preparing images and compiling a grammar take a moment: off the event loop
            await anyio.to_thread.run_sync(call)
        except anyio.get_cancelled_exc_class():
            for handle in handles:
                handle.cancel()
            raise
        except EngineFull:
            raise APIError(429, "the server is busy: its queue of waiting requests is full; retry shortly",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:  # bad image, prompt longer than the context, bad sampling value
            raise APIError(400, str(e)) from None
        return Generation(handles[0], self.metrics, submitted)

    def _json_constraint(self, output: JSONOutput) -> Any:
        """The logits processor keeping one reply on ``output.schema``; it may end the reply on any end token."""
        from mlx_llama4.structured import JSONConstraint

        try:
            return JSONConstraint(self._engine.processor.tokenizer, output.schema, sorted(self._end_tokens))
        except ValueError as e:  # a schema llguidance cannot enforce: named by the request field it came from
            raise APIError(400, f"{output.field}: {e}", param=output.field) from None

    def stats(self) -> dict:
        return self._engine.stats()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._engine.close()

    # ---- tokenizer facts, for raw prompts and log probabilities --------------------------------

    def encode_raw(self, text: str) -> list[int]:
        """Token ids of raw prompt text as it is (special-token strings parsed), with BOS first."""
        processor = self._engine.processor
        ids = list(processor.encode(text))
        bos = processor.bos_token_id
        return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._engine.processor.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_end_token(self, token: int) -> bool:
        return token in self._end_tokens

    def token_text(self, token: int) -> str:
        return self._engine.processor.decode([token])

    def token_bytes(self, token: int) -> list[int]:
        """The token's exact bytes (its text alone may be a broken UTF-8 sequence)."""
        piece = self._engine.processor.tokenizer.convert_ids_to_tokens(token)
        try:
            return [self._byte_of_char[c] for c in piece]
        except KeyError:  # not a byte-level piece (a special token): its text is its bytes
            return list(self.token_text(token).encode("utf-8"))


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """The byte <-> printable character table of byte-level BPE tokenizers (GPT-2's, used by Llama 4's)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()
