"""For the server tests: a fake engine with the real engine's API, a server running in a thread, and the
demo model's questions (OpenAI parts for the server, Hugging Face parts for ``generate()``).

``FakeEngine`` answers deterministically without a model ("You said: <last message's text>", one token per
piece of the demo tokenizer; a last message holding ``REPLY:`` gets the text after it, special tokens parsed,
so ``REPLY:{"name": ...}<|eom|>`` is a tool call ended by ``<|eom|>``) and honours what the HTTP layer relies
on: ``max_tokens`` (capped at its small context), ``stop`` strings, ``cancel()``, ``EngineFull`` when
``max_queue`` requests wait, ``ValueError`` for a prompt longer than the context or a bad sampling value, log
probabilities, ``tools`` (rendered by the chat template), ``logits_processors`` (each token is the argmax of
logits preferring the scripted one, after the processors, so a JSON constraint bends the reply as it would a
model's), and an error event or an exception on request (prompts containing ``FAIL`` / ``CRASH``). It records
every submission for inspection.
"""

from __future__ import annotations

import base64
import io
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import openai
import pytest
import uvicorn

import mlx_llama4
from mlx_llama4 import generate
from mlx_llama4.engine import EngineFull
from mlx_llama4.processor import load_processor

DEMO = Path(mlx_llama4.__file__).parent / "demo"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import shapes  # noqa: E402  (the pictures the demo model was trained on)


@dataclass
class FakeEvent:
    text: str
    token: Optional[int]
    logprob: Optional[float]
    top_logprobs: Optional[list]
    finish_reason: Optional[str]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    error: Optional[str] = None


class FakeHandle:
    def __init__(self, engine: "FakeEngine", prompt_ids: list[int], reply: str, max_tokens: int, stop, logprobs,
                 crash: bool = False, fail: bool = False, logits_processors=()):
        self.engine, self.prompt_ids, self.max_tokens, self.stop = engine, prompt_ids, max_tokens, tuple(stop)
        self.logprobs, self.crash, self.fail = logprobs, crash, fail
        self.logits_processors = list(logits_processors or ())
        self.reply_ids = engine.processor.encode(reply)
        self.cancelled = threading.Event()
        self.finish: Optional[str] = None

    def cancel(self) -> None:
        self.cancelled.set()

    def _event(self, token, text, n, finish=None, error=None) -> FakeEvent:
        lp = None if self.logprobs is None or token is None else -0.25 * ((n - 1) % 4 + 1)
        top = None if lp is None else [(token + k, lp - k) for k in range(self.logprobs)]
        return FakeEvent(text, token, lp, top, finish, len(self.prompt_ids), 3, n, error)

    def __iter__(self):
        engine = self.engine
        engine.rows.acquire()
        with engine.lock:
            engine.queued -= 1
            engine.running += 1
        try:
            yield from self._generate()
        finally:
            with engine.lock:
                engine.running -= 1
            engine.rows.release()

    def _next_token(self, generated: list[int]) -> int:
        """The scripted token (the end token after the script), or with logits processors the argmax of logits
        that prefer it, after the processors."""
        n = len(generated)
        wanted = self.reply_ids[n] if n < len(self.reply_ids) else self.engine.end_token
        if not self.logits_processors:
            return wanted
        vocab = len(self.engine.processor.tokenizer)
        logits = (mx.arange(vocab) == wanted).astype(mx.float32)[None]  # (1, V)
        history = mx.array(self.prompt_ids + generated)
        for process in self.logits_processors:
            logits = process(history, logits)
        return int(mx.argmax(logits, axis=-1).item())

    def _generate(self):
        text, generated = "", []  # text is decoded from all tokens so far, so a character split over tokens comes whole
        ends = set(self.engine.processor.eos_token_ids)
        while True:
            n = len(generated)
            if self.cancelled.is_set():
                self.finish = "cancelled"
                yield self._event(None, "", n, "cancelled")
                return
            time.sleep(self.engine.delay)
            while n == 1 and not self.engine.running_freely.wait(0.01) and not self.cancelled.is_set():
                pass
            if self.crash and n == 2:
                raise RuntimeError("fake engine crash\nTraceback (most recent call last): secret")
            if self.fail and n == 2:
                self.finish = "error"
                yield self._event(None, "", n, "error", error="fake failure")
                return
            token = self._next_token(generated)
            if token in ends:
                self.finish = "stop"
                yield self._event(token, "", n + 1, "stop")
                return
            generated.append(token)
            n += 1
            full = self.engine.processor.decode(generated)
            full = full if not full.endswith("\ufffd") else text
            hit = next((s for s in self.stop if s in full), None)
            if hit is not None:
                self.finish = "stop"
                yield self._event(token, full[len(text):full.index(hit)], n, "stop")
                return
            piece, text = full[len(text):], full
            self.finish = "length" if n == self.max_tokens else None
            yield self._event(token, piece, n, self.finish)
            if self.finish:
                return


class FakeEngine:
    """The engine's API without a model; ``context`` tokens of context, ``delay`` seconds per token. With
    ``paused`` set, every generation holds its row before its second token until ``resume()``."""

    def __init__(self, max_batch: int = 2, max_queue: int = 4, context: int = 512, delay: float = 0.0,
                 paused: bool = False):
        self.processor = load_processor(DEMO)
        self.end_token = self.processor.token_id("<|eot|>")
        self.max_batch, self.max_queue, self.context, self.delay = max_batch, max_queue, context, delay
        self.running_freely = threading.Event()
        if not paused:
            self.running_freely.set()
        self.rows = threading.Semaphore(max_batch)
        self.lock = threading.Lock()
        self.running = self.queued = 0
        self.submitted: list[dict] = []
        self.handles: list[FakeHandle] = []
        self.closed = False

    def submit(self, prompt, images=None, max_tokens=256, temperature=None, top_p=None, top_k=None, min_p=0.0,
               repetition_penalty=None, presence_penalty=0.0, frequency_penalty=0.0, stop=(), seed=None,
               logprobs=False, top_logprobs=0, logits_processors=None, tools=None) -> FakeHandle:
        call = dict(prompt=prompt, images=images, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, stop=stop, seed=seed,
                    logprobs=logprobs, top_logprobs=top_logprobs, logits_processors=logits_processors, tools=tools)
        logprobs = top_logprobs if logprobs else None  # how many alternatives to report, as the fake handle takes it
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids, last = list(prompt), self.processor.decode(prompt[-3:])
        else:
            rendered = self.processor(messages=prompt, **({"tools": tools} if tools else {}))  # checks images too
            ids = rendered["input_ids"][0].tolist()
            message = prompt[-1] if isinstance(prompt, list) else {"content": prompt}
            content = message["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            last = " ".join(p["text"] for p in parts if p["type"] == "text")
            pictures = [p["image"] for p in parts if p["type"] == "image"]
            if pictures:
                last += " with " + " and ".join(f"a {im.size[0]}x{im.size[1]} picture" for im in pictures)
        if len(ids) >= self.context:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.context} positions")
        with self.lock:
            if self.queued >= self.max_queue:
                raise EngineFull(f"{self.queued} requests are waiting")
            self.queued += 1
        self.submitted.append(call)
        reply = "la " * 300 if "long story" in last else f"You said: {last}"
        if "REPLY:" in last:
            reply = last[last.index("REPLY:") + len("REPLY:"):]
        handle = FakeHandle(self, ids, reply, min(max_tokens, self.context - len(ids)), stop, logprobs,
                            crash="CRASH" in last, fail="FAIL" in last, logits_processors=logits_processors)
        self.handles.append(handle)
        return handle

    def resume(self) -> None:
        self.running_freely.set()

    def stats(self) -> dict:
        with self.lock:
            return {"running": self.running, "queued": self.queued, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "prefix_cache_bytes": 0}

    def close(self) -> None:
        self.closed = True


class ServerThread:
    """A uvicorn server for ``app`` on 127.0.0.1 (a free port), in a daemon thread."""

    def __init__(self, app: Any):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition()`` until true; fail (not assert a duration) if it never becomes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---- the demo model's questions, for the end-to-end tests ---------------------------------------------------------


@pytest.fixture(scope="module", name="server")
def fake_server():
    """``(url, FakeEngine)``: a module's server on a fake engine of 4096 positions; import it to use it."""
    from mlx_llama4.app.server.app import ServerSettings, create_app
    from mlx_llama4.app.server.engine_client import EngineClient

    fake = FakeEngine(context=4096)
    thread = ServerThread(create_app(EngineClient(fake), ServerSettings()))
    yield thread.url, fake
    thread.close()


def openai_client(url: str, key: str = "none", timeout: float = 300) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def picture(seed: int, count=None):
    """A picture of ``count`` (default: 1 to 3) coloured shapes, as the demo model was trained on."""
    return shapes.random_scene(random.Random(seed), count=count).image


def data_url(image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def question(text: str, image=None) -> tuple[list[dict], list[dict]]:
    """The same user turn for the server (OpenAI parts) and for ``generate()`` (Hugging Face parts)."""
    if image is None:
        return [{"role": "user", "content": text}], [{"role": "user", "content": text}]
    return ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                          {"type": "text", "text": text}]}],
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}])


def expected(demo_model, messages, max_tokens: int) -> str:
    """The serial greedy reply: ``generate()`` on the one-sequence path."""
    model, processor = demo_model
    return generate(model, processor, messages, max_tokens=max_tokens, temperature=0.0)
