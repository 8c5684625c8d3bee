"""The HTTP server against a fake engine: OpenAI response shapes, streaming, errors, limits, security, media,
metrics and cancellation on disconnect. The fake engine (``server_helpers.FakeEngine``) has the real engine's
API; ``test_server_engine.py`` runs the same server on the real engine and the demo model.

Every server listens on 127.0.0.1; image URLs are served by a local http.server, never the internet.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mlx_llama4.app.server import cli
from mlx_llama4.app.server.app import ServerSettings, create_app
from mlx_llama4.app.server.engine_client import EngineClient
from mlx_llama4.app.server.media import MediaPolicy
from server_helpers import FakeEngine, ServerThread, wait_until
from server_helpers import openai_client as client

USER = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture
def serve():
    """``serve(engine=None, **ServerSettings fields) -> (url, fake engine)``; servers close after the test."""
    servers = []

    def make(engine=None, **settings):
        fake = engine or FakeEngine()
        server = ServerThread(create_app(EngineClient(fake), ServerSettings(**settings)))
        servers.append(server)
        return server.url, fake

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(serve):
    return serve()


def answers_normally(url, headers=None):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER}, headers=headers, timeout=30)
    return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "You said: Who are you?"


def png(w=40, h=30, colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(url: str, text="What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


# ---- the OpenAI shapes -----------------------------------------------------------------------------------------


def test_health_and_models(server):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert client(url).models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("gpt-4")


def test_chat_reply_usage_and_ids(server):
    url, fake = server
    reply = client(url).chat.completions.create(model="demo", messages=USER)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "demo"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "You said: Who are you?"
    assert choice.finish_reason == "stop" and choice.logprobs is None
    handle = fake.handles[-1]
    assert reply.usage.prompt_tokens == len(handle.prompt_ids)
    assert reply.usage.completion_tokens == len(handle.reply_ids) + 1  # the end token counts, as the engine says
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens == 3
    assert fake.submitted[-1]["prompt"] == USER  # a text-only message goes as a string, like generate()'s prompt


def test_stream_deltas_equal_the_reply_and_usage_comes_last(server):
    url, _ = server
    whole = client(url).chat.completions.create(model="demo", messages=USER).choices[0].message.content
    chunks = list(client(url).chat.completions.create(model="demo", messages=USER, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])

    # The raw framing: "data: <json>" events separated by blank lines, then "data: [DONE]"; no usage key
    # unless asked for.
    with httpx.stream("POST", url + "/v1/chat/completions", json={"messages": USER, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all("usage" not in json.loads(e[6:]) for e in events[:-2])


def test_sampling_fields_reach_the_engine(server):
    url, fake = server
    client(url).chat.completions.create(
        model="demo", messages=[{"role": "developer", "content": "Be brief."}, *USER], max_tokens=5,
        max_completion_tokens=7, temperature=0.3, top_p=0.9, presence_penalty=0.5, frequency_penalty=-0.5,
        stop=["zzz"], seed=11, logprobs=True, top_logprobs=2,
        extra_body={"top_k": -1, "min_p": 0.05, "repetition_penalty": 1.1, "some_unknown_field": {"x": 1}})
    call = fake.submitted[-1]
    assert call["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert {k: call[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                 "presence_penalty", "frequency_penalty", "stop", "seed", "logprobs",
                                 "top_logprobs")} == dict(
        max_tokens=7, temperature=0.3, top_p=0.9, top_k=0, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=-0.5, stop=("zzz",), seed=11, logprobs=True, top_logprobs=2)
    client(url).chat.completions.create(model="demo", messages=USER)
    call = fake.submitted[-1]
    assert call["max_tokens"] == 4096 and call["temperature"] is None and call["logprobs"] is False


def test_max_tokens_stop_and_context_cap(serve):
    url, fake = serve(FakeEngine(context=64))
    c = client(url)
    short = c.chat.completions.create(model="demo", messages=USER, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].message.content == fake.processor.decode(fake.handles[-1].reply_ids[:3])
    stopped = c.chat.completions.create(model="demo", messages=USER, stop=["are"])
    assert stopped.choices[0].message.content == "You said: Who " and stopped.choices[0].finish_reason == "stop"
    # Far more than the context: generation runs to the end of the context and says "length".
    capped = c.chat.completions.create(model="demo", max_tokens=10**6,
                                       messages=[{"role": "user", "content": "a long story"}])
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage.prompt_tokens + capped.usage.completion_tokens == 64


def test_chat_logprobs_in_the_openai_shape(server):
    url, fake = server
    reply = client(url).chat.completions.create(model="demo", messages=USER, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    handle = fake.handles[-1]
    assert [e.token for e in content] == [fake.processor.decode([t]) for t in handle.reply_ids]  # no end token
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    assert all(bytes(e.bytes).decode() == e.token for e in content)
    assert [e.logprob for e in content[:5]] == [-0.25, -0.5, -0.75, -1.0, -0.25]
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob for e in content)

    chunks = list(client(url).chat.completions.create(model="demo", messages=USER, stream=True, logprobs=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in streamed)


def test_token_bytes_are_exact_for_a_split_character(server):
    url, fake = server
    reply = client(url).chat.completions.create(model="demo", messages=[{"role": "user", "content": "héllo"}],
                                                logprobs=True)
    pieces = reply.choices[0].logprobs.content
    assert b"".join(bytes(e.bytes) for e in pieces).decode() == reply.choices[0].message.content
    assert any(e.token == "\ufffd" for e in pieces)  # "é" spans two tokens: each alone is not valid UTF-8


def test_completions_raw_prompt(server):
    url, fake = server
    c = client(url)
    out = c.completions.create(model="demo", prompt="Once upon a time")
    bos = fake.processor.bos_token_id
    assert fake.submitted[-1]["prompt"] == [bos, *fake.processor.encode("Once upon a time")]
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == "You said: " + fake.processor.decode(fake.submitted[-1]["prompt"][-3:])
    # BOS is not doubled, token ids go as they are, echo prepends the prompt.
    c.completions.create(model="demo", prompt="<|begin_of_text|>Hi")
    assert fake.submitted[-1]["prompt"] == [bos, *fake.processor.encode("Hi")]
    c.completions.create(model="demo", prompt=[5, 6, 7])
    assert fake.submitted[-1]["prompt"] == [5, 6, 7]
    echoed = c.completions.create(model="demo", prompt="Hi there", echo=True, max_tokens=2)
    assert echoed.choices[0].text == "Hi there" + fake.processor.decode(fake.handles[-1].reply_ids[:2])
    assert echoed.choices[0].finish_reason == "length"
    # Streaming gives the same text; legacy logprobs have one entry per token with offsets into the text.
    whole = c.completions.create(model="demo", prompt="Hi", logprobs=2)
    chunks = list(c.completions.create(model="demo", prompt="Hi", stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 2 for top in lp.top_logprobs)


# ---- refusals --------------------------------------------------------------------------------------------------

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS = [
    # (name, method, path, body (bytes: sent raw), status, param or None, words in the message)
    ("malformed JSON", "POST", CHAT, b'{"messages": [', 400, None, "not valid JSON"),
    ("not an object", "POST", CHAT, b"[1, 2]", 400, None, "JSON object"),
    ("missing messages", "POST", CHAT, {}, 400, "messages", "required"),
    ("wrong type", "POST", CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature", "number"),
    ("out of range", "POST", CHAT, {"messages": USER, "top_logprobs": 99, "logprobs": True}, 400, "top_logprobs",
     "20"),
    ("bad part", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400,
     "messages[0].content[0].type", "'text' or 'image_url'"),
    ("bad role", "POST", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "user"),
    ("n=2", "POST", CHAT, {"messages": USER, "n": 2}, 400, "n", "only n=1"),
    ("legacy functions", "POST", CHAT, {"messages": USER, "functions": [{"name": "f"}]}, 400, "functions",
     "send 'tools'"),
    ("unknown response format", "POST", CHAT, {"messages": USER, "response_format": {"type": "xml"}}, 400,
     "response_format", "'json_schema'"),
    ("logit_bias", "POST", CHAT, {"messages": USER, "logit_bias": {"5": 10}}, 400, "logit_bias", "not supported"),
    ("undecodable image", "POST", CHAT, {"messages": image_message("data:image/png;base64,bm90IGFuIGltYWdl")},
     400, "messages[0].content[0].image_url", "not a recognised image"),
    ("prompt too long", "POST", CHAT, {"messages": [{"role": "user", "content": "word " * 600}]}, 400, None,
     "context"),
    ("engine refuses a value", "POST", COMPLETIONS, {"prompt": "Hi", "top_k": -2}, 400, "top_k", "-1"),
    ("two prompts", "POST", COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("token out of vocabulary", "POST", COMPLETIONS, {"prompt": [1, 10**9]}, 400, "prompt", "vocabulary"),
    ("echo with logprobs", "POST", COMPLETIONS, {"prompt": "Hi", "echo": True, "logprobs": 1}, 400, "echo", "echo"),
    ("best_of", "POST", COMPLETIONS, {"prompt": "Hi", "best_of": 3}, 400, "best_of", "best_of=1"),
    ("unknown model", "POST", CHAT, {"messages": USER, "model": "gpt-4o"}, 404, "model", "gpt-4o"),
    ("unknown route", "GET", "/v1/nothing", None, 404, None, "/v1/nothing"),
    ("wrong method", "GET", CHAT, None, 405, None, "does not accept GET"),
]


@pytest.mark.parametrize("name,method,path,body,status,param,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, name, method, path, body, status, param,
                                                                 words):
    url, _ = server
    kwargs = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
    r = httpx.request(method, url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"] and "Traceback" not in r.text
    assert answers_normally(url)


def test_the_openai_client_raises_on_a_refusal(server):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="demo", messages=USER, n=3)
    assert e.value.body["param"] == "n"


def test_engine_failures_become_500_without_a_traceback(server):
    url, _ = server
    failed = httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": "FAIL"}]})
    assert failed.status_code == 500 and failed.json()["error"]["message"] == "generation failed: fake failure"
    crashed = httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": "CRASH"}]})
    assert crashed.status_code == 500 and crashed.json()["error"]["type"] == "server_error"
    assert "secret" not in crashed.text and "Traceback" not in crashed.text
    with pytest.raises(openai.APIError, match="fake failure"):
        list(client(url).chat.completions.create(model="demo", stream=True,
                                                 messages=[{"role": "user", "content": "FAIL"}]))
    crash = {"stream": True, "messages": [{"role": "user", "content": "CRASH"}]}
    with httpx.stream("POST", url + CHAT, json=crash) as r:
        raw = r.read().decode()
    assert '"error"' in raw and "secret" not in raw and "[DONE]" not in raw
    assert answers_normally(url)


def test_api_key(serve):
    url, _ = serve(api_key="s3cret")
    assert httpx.get(url + "/health").status_code == 200  # open, for load balancers
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        for path in ("/v1/models", "/metrics", "/v1/unknown"):
            r = httpx.get(url + path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    assert client(url, "s3cret").chat.completions.create(model="demo", messages=USER).choices[0].message.content
    assert answers_normally(url, {"Authorization": "Bearer s3cret"})


def test_oversized_bodies_get_413(serve):
    url, _ = serve(max_body_bytes=10_000)
    big = {"messages": [{"role": "user", "content": "x" * 20_000}]}
    r = httpx.post(url + CHAT, json=big)
    assert r.status_code == 413 and "10000 bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit holds while reading
        yield json.dumps(big).encode()

    r = httpx.post(url + CHAT, content=chunked())
    assert r.status_code == 413
    assert answers_normally(url)


def test_a_full_queue_gets_429(serve):
    url, fake = serve(FakeEngine(max_batch=1, max_queue=1, paused=True))
    story = {"messages": [{"role": "user", "content": "a long story"}], "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + CHAT, json=story) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            next(lines)
            wait_until(lambda: fake.stats()["running"] == 1, what="the first request to run")
            with http.stream("POST", url + CHAT, json=story) as waiting:
                assert waiting.status_code == 200
                wait_until(lambda: fake.stats()["queued"] == 1, what="the second request to wait")
                refused = http.post(url + CHAT, json=story)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "queue_full"
    fake.resume()
    wait_until(lambda: fake.stats()["running"] + fake.stats()["queued"] == 0, what="the rows to be freed")
    assert answers_normally(url)


# ---- disconnects free rows -------------------------------------------------------------------------------------


def _cancelled_count(url) -> float:
    text = httpx.get(url + "/metrics").text
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "mlx_llama4_finished_sequences_total" and s.labels == {"reason": "cancelled"}), 0.0)


def test_a_client_leaving_mid_stream_frees_its_row(serve):
    url, fake = serve(FakeEngine(paused=True))  # each generation holds its row after one token
    with httpx.stream("POST", url + CHAT, json={"stream": True, "messages": [{"role": "user",
                                                                              "content": "a long story"}]},
                      timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        while '"content":"l' not in next(lines):  # the first piece of "la la ...", however it is tokenized
            pass
    wait_until(lambda: fake.handles[-1].finish == "cancelled", what="the generation to be cancelled")
    wait_until(lambda: fake.stats()["running"] == 0, what="the row to be freed")
    assert _cancelled_count(url) == 1


def test_a_client_leaving_before_a_plain_reply_frees_its_row(serve):
    url, fake = serve(FakeEngine(paused=True))  # each generation holds its row after one token
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + CHAT, json={"messages": [{"role": "user", "content": "a long story"}]}, timeout=0.3)
    wait_until(lambda: fake.handles[-1].finish == "cancelled", what="the generation to be cancelled")
    wait_until(lambda: fake.stats()["running"] == 0, what="the row to be freed")


# ---- CORS and metrics ------------------------------------------------------------------------------------------


def test_cors_is_off_unless_an_origin_is_given(serve):
    url, _ = serve()
    r = httpx.post(url + CHAT, json={"messages": USER}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    assert "access-control-allow-origin" not in httpx.options(url + CHAT, headers=preflight).headers

    url, _ = serve(cors_origins=("http://app.example",), api_key="k")
    r = httpx.options(url + CHAT, headers=preflight)  # a preflight carries no key
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.post(url + CHAT, json={"messages": USER},
                   headers={"Origin": "http://app.example", "Authorization": "Bearer k"})
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.post(url + CHAT, json={"messages": USER},
                   headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
    assert "access-control-allow-origin" not in r.headers


def test_metrics_in_the_prometheus_text_format(server):
    url, fake = server
    c = client(url)
    c.chat.completions.create(model="demo", messages=USER)
    list(c.chat.completions.create(model="demo", messages=USER, stream=True))
    httpx.post(url + CHAT, content=b"{")
    r = httpx.get(url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples[("mlx_llama4_requests_total", (("route", CHAT), ("status", "200")))] == 2
    assert samples[("mlx_llama4_requests_total", (("route", CHAT), ("status", "400")))] == 1
    tokens = 2 * (len(fake.handles[-1].reply_ids) + 1)
    assert samples[("mlx_llama4_completion_tokens_total", ())] == tokens
    assert samples[("mlx_llama4_prompt_tokens_total", ())] == 2 * len(fake.handles[-1].prompt_ids)
    assert samples[("mlx_llama4_cached_prompt_tokens_total", ())] == 6
    assert samples[("mlx_llama4_finished_sequences_total", (("reason", "stop"),))] == 2
    assert samples[("mlx_llama4_time_to_first_token_seconds_count", ())] == 2
    assert samples[("mlx_llama4_running_sequences", ())] == 0
    assert samples[("mlx_llama4_queued_sequences", ())] == 0
    assert samples[("mlx_llama4_max_batch", ())] == 2


# ---- images ----------------------------------------------------------------------------------------------------


def test_a_data_url_image_reaches_the_engine_decoded(server):
    url, fake = server
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    out = io.BytesIO()
    picture.save(out, "PNG")
    reply = client(url).chat.completions.create(model="demo", messages=image_message(data_url(out.getvalue())))
    assert reply.choices[0].message.content == "You said: What is this? with a 50x30 picture"
    part = fake.submitted[-1]["prompt"][0]["content"][0]
    assert part["type"] == "image" and np.array_equal(np.asarray(part["image"]), np.asarray(picture))


class _ImageSite(BaseHTTPRequestHandler):
    """/red.png, /big.png (a 200 kB image), /slow.png (answers after 3 s), /missing.png (404),
    /to-private.png (a redirect to a private address), /to-red.png (a redirect to /red.png)."""

    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(3)
        if self.path in ("/to-private.png", "/to-red.png"):
            self.send_response(302)
            self.send_header("Location", "http://10.255.255.1/x.png" if self.path == "/to-private.png" else "/red.png")
            self.end_headers()
            return
        body = {"/red.png": png(), "/slow.png": png(), "/big.png": png(400, 400) + b"\0" * 200_000}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a download the server under test aborted on purpose
        pass


@pytest.fixture(scope="module")
def image_site():
    site = _QuietServer(("127.0.0.1", 0), _ImageSite)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def _image_error(url, image_url) -> str:
    r = httpx.post(url + CHAT, json={"messages": image_message(image_url)}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].content[0].image_url"
    return r.json()["error"]["message"]


def test_image_urls_to_loopback_are_refused_unless_allowed(serve, image_site):
    url, fake = serve()
    assert "non-public" in _image_error(url, image_site + "/red.png")
    assert "non-public" in _image_error(url, image_site.replace("127.0.0.1", "localhost") + "/red.png")
    assert not fake.submitted

    url, fake = serve(media=MediaPolicy.build(100_000, 1.0, allowed_networks=["127.0.0.0/8"]))
    reply = client(url).chat.completions.create(model="demo", messages=image_message(image_site + "/red.png"))
    assert reply.choices[0].message.content == "You said: What is this? with a 40x30 picture"
    assert np.asarray(fake.submitted[-1]["prompt"][0]["content"][0]["image"])[0, 0].tolist() == [200, 30, 30]
    assert client(url).chat.completions.create(model="demo", messages=image_message(image_site + "/to-red.png"))
    assert "HTTP 404" in _image_error(url, image_site + "/missing.png")
    assert "100000 bytes" in _image_error(url, image_site + "/big.png")
    assert "within 1 s" in _image_error(url, image_site + "/slow.png")
    redirected = _image_error(url, image_site + "/to-private.png")  # each redirect's address is checked too
    assert "10.255.255.1" in redirected and "non-public" in redirected
    assert "unsupported image URL" in _image_error(url, "ftp://example.com/a.png")
    assert answers_normally(url)


def test_addresses_image_urls_may_reach():
    policy = MediaPolicy()
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "::ffff:127.0.0.1",
                    "fd00::1", "0.0.0.0", "100.64.0.1", "224.0.0.1"):
        assert not policy.address_allowed(address), address
    for address in ("8.8.8.8", "2606:4700::1111"):
        assert policy.address_allowed(address), address
    allowed = MediaPolicy.build(1, 1.0, allowed_networks=["10.0.0.0/8"])
    assert allowed.address_allowed("10.1.2.3") and not allowed.address_allowed("192.168.0.1")


def test_local_files_only_below_allowed_folders(serve, tmp_path):
    allowed, outside = tmp_path / "pictures", tmp_path / "private"
    allowed.mkdir(), outside.mkdir()
    (allowed / "red.png").write_bytes(png())
    (outside / "secret.png").write_bytes(png(colour=(0, 0, 0)))
    (allowed / "link.png").symlink_to(outside / "secret.png")

    url, _ = serve()
    assert "--allowed-local-media" in _image_error(url, str(allowed / "red.png"))
    url, fake = serve(media=MediaPolicy.build(10**6, 1.0, local_dirs=[allowed]))
    for ok in (str(allowed / "red.png"), (allowed / "red.png").as_uri()):
        reply = client(url).chat.completions.create(model="demo", messages=image_message(ok))
        assert reply.choices[0].message.content.endswith("with a 40x30 picture")
    for escape in (str(outside / "secret.png"), str(allowed / ".." / "private" / "secret.png"),
                   str(allowed / "link.png"), (outside / "secret.png").as_uri()):
        assert "outside the folders" in _image_error(url, escape)
    assert "no such file" in _image_error(url, str(allowed / "nothing.png"))


# ---- the command line ------------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(EngineClient, "start", refuse)


def test_cli_refuses_an_open_non_loopback_server(no_loading, capsys):
    assert cli.main(["--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_cli_reports_a_busy_port_before_loading(no_loading, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


def test_cli_usage_errors(no_loading, capsys, tmp_path):
    assert cli.main(["--allowed-local-media", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["--allow-media-network", "10.0.0.300/8"]) == 2
    assert cli.main(["--max-batch", "0"]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["--kv-bits", "7"])
    assert e.value.code == 2


def test_default_model_id(tmp_path):
    (tmp_path / "scout-4bit").mkdir()
    assert cli.default_model_id(str(tmp_path / "scout-4bit")) == "scout-4bit"
    assert cli.default_model_id("demo") == "demo"
    hub_id = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    assert cli.default_model_id(hub_id) == hub_id
