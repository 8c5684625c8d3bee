"""Anthropic's Messages API (``POST /v1/messages``) against the fake engine (``server_helpers.FakeEngine``),
through the official ``anthropic`` client and raw HTTP: the message shape and usage, system / text / base64
image blocks, sampling fields and stop sequences, the streaming event sequence, tool use (offered, forced, the
round trip rendered in the checkpoint's own format), ``x-api-key`` auth and errors in Anthropic's shape.
``test_server_anthropic_engine.py`` runs the same client on the real engine and the demo model.
"""

from __future__ import annotations

import base64
import io
import json

import anthropic
import httpx
import jsonschema
import numpy as np
import pytest
from PIL import Image

from mlx_llama4.app.server.app import ServerSettings, create_app
from mlx_llama4.app.server.engine_client import EngineClient
from mlx_llama4.structured import JSONConstraint
from server_helpers import FakeEngine, ServerThread, wait_until

MESSAGES = "/v1/messages"
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "input_schema": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
    "additionalProperties": False}}
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'  # the checkpoint's form of a call


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def client(url: str, key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=60)


def create(url: str, **kwargs) -> anthropic.types.Message:
    return client(url).messages.create(**{"model": "demo", "max_tokens": 400, **kwargs})


@pytest.fixture
def serve():
    servers = []

    def make(engine=None, **settings):
        fake = engine or FakeEngine(context=4096)
        server = ServerThread(create_app(EngineClient(fake), ServerSettings(**settings)))
        servers.append(server)
        return server.url, fake

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(serve):
    return serve()


# ---- messages --------------------------------------------------------------------------------------------------


def test_a_text_reply_in_the_message_shape(server):
    url, fake = server
    reply = create(url, system="Be brief.", messages=user("Who are you?"))
    assert reply.id.startswith("msg_") and reply.type == "message" and reply.role == "assistant"
    assert reply.model == "demo" and reply.stop_reason == "end_turn" and reply.stop_sequence is None
    assert [(b.type, b.text) for b in reply.content] == [("text", "You said: Who are you?")]
    handle = fake.handles[-1]
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == len(handle.prompt_ids)
    assert reply.usage.cache_read_input_tokens == 3 and reply.usage.output_tokens == len(handle.reply_ids) + 1
    assert fake.submitted[-1]["prompt"] == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Who are you?"}]


def test_system_blocks_and_text_blocks(server):
    url, fake = server
    create(url, system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
           messages=[{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                     {"role": "assistant", "content": "Hello."}, *user("Again")])
    assert fake.submitted[-1]["prompt"] == [{"role": "system", "content": "Be brief.\n\nBe kind."},
                                            {"role": "user", "content": "Hi there"},
                                            {"role": "assistant", "content": "Hello."},
                                            {"role": "user", "content": "Again"}]


def test_sampling_fields_reach_the_engine(server):
    """temperature, top_p and top_k are in Anthropic's reference; the newest SDK sends them as extra fields."""
    url, fake = server
    create(url, messages=user("Hi"), max_tokens=7, stop_sequences=["zz"],
           extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20})
    call = fake.submitted[-1]
    assert {k: call[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "stop")} == dict(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=20, stop=("zz",))
    assert call["tools"] is None and call["logits_processors"] is None


def test_stop_reasons_max_tokens_and_stop_sequence(server):
    url, fake = server
    cut = create(url, messages=user("Who are you?"), max_tokens=3)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    assert cut.content[0].text == fake.processor.decode(fake.handles[-1].reply_ids[:3])
    stopped = create(url, messages=user("Who are you?"), stop_sequences=["you", "are"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "are"
    assert stopped.content[0].text == "You said: Who "


def _png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_a_base64_image_reaches_the_engine_decoded(server):
    url, fake = server
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    reply = create(url, messages=user([
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _png(picture)}},
        {"type": "text", "text": "What is this?"}]))
    assert reply.content[0].text == "You said: What is this? with a 50x30 picture"
    part = fake.submitted[-1]["prompt"][0]["content"][0]
    assert part["type"] == "image" and np.array_equal(np.asarray(part["image"]), np.asarray(picture))


# ---- streaming -------------------------------------------------------------------------------------------------


def _raw_events(url: str, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a streamed reply, checking the framing: every event is named after its type."""
    with httpx.stream("POST", url + MESSAGES, json={"model": "demo", "max_tokens": 400, "stream": True, **body},
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for chunk in raw.split("\n\n")[:-1]:
        name, data = chunk.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        events.append((name[7:], json.loads(data[6:])))
        assert events[-1][1]["type"] == events[-1][0]
    return events


def test_the_streaming_event_sequence(server):
    url, _ = server
    events = _raw_events(url, {"messages": user("Who are you?")})
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert deltas > 1 and names == ["message_start", "ping", "content_block_start", *["content_block_delta"] * deltas,
                                    "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "You said: Who are you?"
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] > 0


def test_the_sdk_stream_gives_the_whole_message(server):
    url, _ = server
    whole = create(url, messages=user("Who are you?"), stop_sequences=["are"])
    with client(url).messages.stream(model="demo", max_tokens=100, messages=user("Who are you?"),
                                     stop_sequences=["are"]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert (final.stop_reason, final.stop_sequence) == (whole.stop_reason, whole.stop_sequence) == (
        "stop_sequence", "are")
    assert final.usage.output_tokens == whole.usage.output_tokens


# ---- tools -----------------------------------------------------------------------------------------------------


def test_tools_reach_the_template_and_a_call_becomes_tool_use(server):
    url, fake = server
    reply = create(url, messages=user("REPLY:" + CALL + "<|eom|>"), tools=[WEATHER, TIME])
    assert fake.submitted[-1]["tools"][0] == {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER["input_schema"]}}
    assert "Given the following functions" in fake.processor.decode(fake.handles[-1].prompt_ids)
    (block,) = reply.content
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name == "get_weather"
    assert block.input == {"city": "Paris"} and reply.stop_reason == "tool_use"


def test_a_streamed_tool_use_equals_the_whole_reply(server):
    url, _ = server
    script = "Let me look. " + CALL + '{"name": "get_time", "parameters": {"zone": "CET"}}'
    whole = create(url, messages=user("REPLY:" + script), tools=[WEATHER, TIME])
    events = _raw_events(url, {"messages": user("REPLY:" + script), "tools": [WEATHER, TIME]})
    names = [name for name, _ in events]
    blocks = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert [b["type"] for b in blocks] == ["text", "tool_use", "tool_use"]
    assert [b.get("input") for b in blocks[1:]] == [{}, {}]
    assert names.count("content_block_stop") == 3
    for index, expected in enumerate(whole.content):  # each block's deltas add up to the whole reply's block
        deltas = [data["delta"] for name, data in events if name == "content_block_delta" and data["index"] == index]
        if expected.type == "text":
            assert "".join(d["text"] for d in deltas) == expected.text == "Let me look."
        else:
            assert {d["type"] for d in deltas} == {"input_json_delta"}
            assert json.loads("".join(d["partial_json"] for d in deltas)) == expected.input
            assert blocks[index]["name"] == expected.name
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use" == whole.stop_reason
    with client(url).messages.stream(model="demo", max_tokens=400, messages=user("REPLY:" + script),
                                     tools=[WEATHER, TIME]) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        (b.type, getattr(b, "input", None)) for b in whole.content]


def test_a_tool_round_trip_renders_the_checkpoints_own_format(server):
    url, fake = server
    first = create(url, messages=user("REPLY:" + CALL + "<|eom|>"), tools=[WEATHER])
    (call,) = first.content
    history = [*user("REPLY:" + CALL + "<|eom|>"), {"role": "assistant", "content": first.content},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "18 C"}]},
                   {"type": "text", "text": "And tomorrow?"}]}]
    final = create(url, messages=history, tools=[WEATHER])
    assert final.content[0].text == "You said: And tomorrow?" and final.stop_reason == "end_turn"
    sent = fake.submitted[-1]["prompt"]
    assert sent[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C"}, {"role": "user", "content": "And tomorrow?"}]
    prompt = fake.processor.decode(fake.handles[-1].prompt_ids)
    assert f"<|python_start|><|python_end|>{CALL}<|eot|><|header_start|>ipython<|header_end|>" in prompt


def test_tool_choice_any_tool_and_none(server):
    url, fake = server
    named = create(url, messages=user("What time is it?"), tools=[WEATHER, TIME],
                   tool_choice={"type": "tool", "name": "get_time"})
    assert isinstance(fake.submitted[-1]["logits_processors"][0], JSONConstraint)
    (block,) = named.content
    assert block.name == "get_time" and named.stop_reason == "tool_use"
    jsonschema.validate(block.input, TIME["input_schema"])
    forced = create(url, messages=user("REPLY:" + CALL), tools=[WEATHER, TIME], tool_choice={"type": "any"})
    assert [b.name for b in forced.content] == ["get_weather"]
    assert fake.submitted[-1]["logits_processors"] is not None
    free = create(url, messages=user("REPLY:" + CALL), tools=[WEATHER], tool_choice={"type": "none"})
    assert fake.submitted[-1]["tools"] is None and free.content[0].text == CALL and free.stop_reason == "end_turn"


SHAPE = {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]}, "filled": {"type": "boolean"}},
         "required": ["shape", "filled"], "additionalProperties": False}


def test_structured_output_bends_the_reply_into_valid_json(server):
    url, fake = server
    reply = create(url, messages=user("Describe it."),
                   output_config={"format": {"type": "json_schema", "schema": SHAPE}})
    assert isinstance(fake.submitted[-1]["logits_processors"][0], JSONConstraint)
    assert reply.stop_reason == "end_turn"
    jsonschema.validate(json.loads(reply.content[0].text), SHAPE)
    cut = create(url, messages=user("Describe it."), max_tokens=2,
                 output_config={"format": {"type": "json_schema", "schema": SHAPE}})
    assert cut.stop_reason == "max_tokens" and cut.content[0].text.startswith("{")


# ---- auth and errors -------------------------------------------------------------------------------------------


def test_x_api_key_auth(serve):
    url, _ = serve(api_key="s3cret")
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(url, "wrong").messages.create(model="demo", max_tokens=10, messages=user("Hi"))
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error", "message": "invalid API key"}}
    r = httpx.post(url + MESSAGES, json={"model": "demo", "max_tokens": 5, "messages": user("Hi")})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    reply = client(url, "s3cret").messages.create(model="demo", max_tokens=10, messages=user("Hi"))
    assert reply.content[0].text.startswith("You said")
    r = httpx.post(url + MESSAGES, json={"model": "demo", "max_tokens": 5, "messages": user("Hi")},
                   headers={"x-api-key": "s3cret", "anthropic-version": "2023-06-01"})
    assert r.status_code == 200
    # The OpenAI routes take the key the Anthropic way too, and keep their own error shape.
    assert httpx.get(url + "/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200
    assert "param" in httpx.get(url + "/v1/models", headers={"x-api-key": "wrong"}).json()["error"]


BAD = [
    ("missing max_tokens", {"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
    ("temperature above 1", {"temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ("unknown block", {"messages": user([{"type": "document", "source": {}}])}, 400, "invalid_request_error",
     "messages[0].content[0].type"),
    ("image in an assistant turn", {"messages": [*user("Hi"), {"role": "assistant", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x"}}]}]}, 400, "invalid_request_error",
     "assistant messages hold"),
    ("undecodable image", {"messages": user([{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "bm90IGFuIGltYWdl"}}])}, 400, "invalid_request_error",
     "messages[0].content[0].source"),
    ("image URL to loopback", {"messages": user([{"type": "image", "source": {
        "type": "url", "url": "http://127.0.0.1:9/x.png"}}])}, 400, "invalid_request_error", "non-public"),
    ("tool choice without tools", {"tool_choice": {"type": "any"}}, 400, "invalid_request_error", "needs tools"),
    ("unknown tool named", {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "fly"}}, 400,
     "invalid_request_error", "'fly'"),
    ("server tool", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400,
     "invalid_request_error", "tools[0]"),
    ("extended thinking", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "invalid_request_error",
     "thinking"),
    ("output format and a forced call", {"tools": [WEATHER], "tool_choice": {"type": "any"}, "output_config": {
        "format": {"type": "json_schema", "schema": SHAPE}}}, 400, "invalid_request_error", "output_config.format"),
    ("output format without a schema", {"output_config": {"format": {"type": "json_schema"}}}, 400,
     "invalid_request_error", "output_config.format.schema"),
    ("unknown model", {"model": "claude-x"}, 404, "not_found_error", "claude-x"),
    ("prompt too long", {"messages": user("word " * 5000)}, 400, "invalid_request_error", "context"),
]


@pytest.mark.parametrize("name,fields,status,kind,words", BAD, ids=[b[0] for b in BAD])
def test_errors_in_anthropics_shape(server, name, fields, status, kind, words):
    url, fake = server
    body = {"model": "demo", "max_tokens": 10, "messages": user("Hi"), **fields}
    r = httpx.post(url + MESSAGES, json={k: v for k, v in body.items() if v is not None}, timeout=30)  # None: left out
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind and words in body["error"]["message"], body


def test_more_errors_in_anthropics_shape(serve):
    url, fake = serve(max_body_bytes=10_000)
    assert httpx.post(url + MESSAGES, content=b'{"model": ').json()["error"]["type"] == "invalid_request_error"
    big = httpx.post(url + MESSAGES, json={"model": "demo", "max_tokens": 5, "messages": user("x" * 20_000)})
    assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
    unknown = httpx.post(url + MESSAGES + "/nothing", json={})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    failed = httpx.post(url + MESSAGES, json={"model": "demo", "max_tokens": 50, "messages": user("FAIL")})
    assert failed.status_code == 500 and failed.json() == {
        "type": "error", "error": {"type": "api_error", "message": "generation failed: fake failure"}}
    crashed = httpx.post(url + MESSAGES, json={"model": "demo", "max_tokens": 50, "messages": user("CRASH")})
    assert crashed.status_code == 500 and "secret" not in crashed.text
    with pytest.raises(anthropic.APIStatusError, match="fake failure"):
        with client(url).messages.stream(model="demo", max_tokens=50, messages=user("FAIL")) as stream:
            list(stream)
    events = _raw_events(url, {"messages": user("FAIL")})
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error",
                                                               "message": "generation failed: fake failure"}})
    with pytest.raises(anthropic.NotFoundError):
        client(url).messages.create(model="claude-x", max_tokens=5, messages=user("Hi"))


def test_a_full_queue_is_a_rate_limit_error_and_leaving_frees_the_row(serve):
    url, fake = serve(FakeEngine(max_batch=1, max_queue=1, paused=True))
    body = {"model": "demo", "max_tokens": 500, "stream": True, "messages": user("a long story")}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + MESSAGES, json=body) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            assert next(lines) == "event: message_start"
            wait_until(lambda: fake.stats()["running"] == 1, what="the first request to run")
            with http.stream("POST", url + MESSAGES, json=body) as waiting:
                assert waiting.status_code == 200
                wait_until(lambda: fake.stats()["queued"] == 1, what="the second request to wait")
                refused = http.post(url + MESSAGES, json=body)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["type"] == "rate_limit_error"
    wait_until(lambda: fake.handles[0].finish == "cancelled", what="the first stream's generation to be cancelled")
    fake.resume()
    wait_until(lambda: fake.stats()["running"] + fake.stats()["queued"] == 0, what="the rows to be freed")
