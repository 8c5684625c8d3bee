"""The server on the real batching engine and the demo model (float32, greedy): replies equal ``generate()``'s,
streamed deltas equal the whole reply, an image sent as a data URL answers like ``generate()`` with that
image, concurrent requests (some with images) give exactly the serial replies, bad requests get their 4xx
and the server goes on, a client leaving mid-stream frees its row, and ``mlx-llama4 serve`` stops cleanly
on Ctrl-C. ``test_server_http.py`` covers the HTTP layer alone on a fake engine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest


import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mlx_llama4.app.server.app import ServerSettings, create_app  # noqa: E402
from mlx_llama4.app.server.engine_client import EngineClient  # noqa: E402
from mlx_llama4.engine import Engine  # noqa: E402
from server_helpers import (ServerThread, expected, openai_client, picture, question,  # noqa: E402, F401
                            wait_until)

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def served(demo):
    """(url, engine client) of a server on a real engine around the demo model."""
    model, processor = demo
    engine = EngineClient(Engine(model, processor, max_batch=4, max_queue=32))
    server = ServerThread(create_app(engine, ServerSettings()))
    yield server.url, engine
    server.close()
    engine.close()


def ask(url: str, messages, max_tokens=MAX_TOKENS, **kw):
    return openai_client(url).chat.completions.create(model="demo", messages=messages, max_tokens=max_tokens,
                                               temperature=0.0, **kw)


def test_greedy_replies_equal_generate(demo, served):
    url, engine = served
    for text in ("Who are you?", "What is 3 plus 4?", "Hello!"):
        ours, theirs = question(text)
        reply = ask(url, ours)
        assert reply.choices[0].message.content == expected(demo, theirs, MAX_TOKENS), text
        assert reply.choices[0].finish_reason == "stop"
    # A raw completion of the chat prompt's own text is the same reply.
    rendered = demo[1].apply_chat_template(question("What is 3 plus 4?")[1])
    raw = openai_client(url).completions.create(model="demo", prompt=rendered, max_tokens=MAX_TOKENS, temperature=0.0)
    assert raw.choices[0].text == expected(demo, question("What is 3 plus 4?")[1], MAX_TOKENS)


def test_stream_deltas_equal_the_whole_reply(served):
    url, _ = served
    for text, image in (("Who are you?", None), ("What colour is the shape?", picture(1, count=1))):
        ours, _ = question(text, image)
        whole = ask(url, ours).choices[0].message.content
        chunks = list(ask(url, ours, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
        assert chunks[-1].usage.completion_tokens > 0


def test_an_image_as_a_data_url_answers_like_generate(demo, served):
    url, _ = served
    for seed, text in ((3, "What shape is this?"), (4, "How many shapes are there?"),
                       (5, "What colour is the shape?")):
        ours, theirs = question(text, picture(seed))
        reply = ask(url, ours)
        assert reply.choices[0].message.content == expected(demo, theirs, MAX_TOKENS), (seed, text)


def _mixed_requests() -> list[tuple[str, object]]:
    """Prompts of different lengths, some with pictures of 1 to 4 tiles."""
    return [("Who are you?", None), ("What is 3 plus 4?", None), ("What shape is this?", picture(10)),
            ("Hello!", None), ("Describe the picture.", picture(11, count=3)),
            ("How many shapes are there?", picture(12, count=2)), ("What is 2 plus 2?", None),
            ("What colour is the shape?", picture(13, count=1))]


def test_concurrent_requests_give_the_serial_replies(demo, served):
    url, engine = served
    requests = [question(text, image) for text, image in _mixed_requests()]
    serial = [expected(demo, theirs, MAX_TOKENS) for _, theirs in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda r: ask(url, r[0]).choices[0].message.content, requests))
    assert replies == serial


BAD = [
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "only n=1"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "x"}]}]},
     400, "image"),
    ({"messages": [{"role": "user", "content": "red " * 5000}]}, 400, "context"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4o"}, 404, "gpt-4o"),
]


def test_bad_requests_get_4xx_and_the_server_goes_on(demo, served):
    url, _ = served
    ours, theirs = question("Who are you?")
    for body, status, words in BAD:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
        assert ask(url, ours).choices[0].message.content == expected(demo, theirs, MAX_TOKENS)


def test_max_tokens_past_the_context_ends_with_length(demo, served):
    url, engine = served
    prompt = "red " * 4088  # about 4090 tokens (with BOS) of the demo's 4096
    length = len(demo[1](text=prompt)["input_ids"][0])
    assert 4096 - 10 < length < 4096
    out = openai_client(url).completions.create(model="demo", prompt=prompt, max_tokens=100_000, temperature=0.0)
    assert out.usage.prompt_tokens == length
    assert out.usage.prompt_tokens + out.usage.completion_tokens <= 4096
    assert out.choices[0].finish_reason in ("length", "stop")


def _cancelled(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "mlx_llama4_finished_sequences_total" and s.labels == {"reason": "cancelled"}), 0.0)


def test_a_client_leaving_mid_stream_frees_its_row(served):
    url, engine = served
    before = _cancelled(url)
    # A prompt of about 3900 tokens: its prefill (several steps) is still running when the client leaves. The
    # schema asks for a string longer than max_tokens can hold, so the reply cannot end on its own before the
    # server sees the client leave, however slow or fast this machine is.
    long_string = {"type": "object", "properties": {"a": {"type": "string", "minLength": 2000}}, "required": ["a"]}
    body = {"model": "demo", "stream": True, "max_tokens": 200, "temperature": 0.0,
            "messages": [{"role": "user", "content": "red green blue " * 1300}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": long_string}}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        lines = r.iter_lines()  # kept until the client leaves: a dropped line iterator closes the connection
        assert '"role":"assistant"' in next(lines)
        wait_until(lambda: engine.stats()["running"] == 1, what="the request to be running")
    wait_until(lambda: engine.stats()["running"] == 0 and engine.stats()["queued"] == 0, timeout=120,
               what="the row to be freed")
    wait_until(lambda: _cancelled(url) == before + 1, what="the generation to end as cancelled")


def test_serve_command_answers_and_stops_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "mlx_llama4.app.server", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        for line in proc.stderr:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                url = found.group(1)
                break
        assert url, "the server did not start"
        wait_until(lambda: _health(url), what="the server to answer")
        reply = openai_client(url).chat.completions.create(model="demo", temperature=0.0, max_tokens=20,
                                                    messages=[{"role": "user", "content": "What is 3 plus 4?"}])
        assert reply.choices[0].message.content
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _health(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        time.sleep(0.1)
        return False
