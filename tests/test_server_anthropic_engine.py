"""Anthropic's Messages API through the official ``anthropic`` client, on the real engine and the bundled demo
model (float32, greedy): text, a base64 image, streaming and a tool round trip, each reply equal to the
one-sequence path (``generate()`` on the same chat, rendered by the checkpoint's template with the same tools).
"""

from __future__ import annotations

import base64
import io
import json

import pytest


import anthropic  # noqa: E402
import jsonschema  # noqa: E402

from mlx_llama4 import generate  # noqa: E402
from mlx_llama4.app.server.app import ServerSettings, create_app  # noqa: E402
from mlx_llama4.app.server.engine_client import EngineClient  # noqa: E402
from mlx_llama4.engine import Engine  # noqa: E402
from mlx_llama4.tool_calls import parse_tool_calls  # noqa: E402
from server_helpers import ServerThread, picture  # noqa: E402, F401  (demo: a fixture)

MAX_TOKENS = 60
ADD = {"name": "add", "description": "Add two whole numbers",
       "input_schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["a", "b"], "additionalProperties": False}}
AS_FUNCTION = {"type": "function", "function": {"name": "add", "description": ADD["description"],
                                                "parameters": ADD["input_schema"]}}


@pytest.fixture(scope="module")
def served(demo):  # noqa: F811
    model, processor = demo
    engine = EngineClient(Engine(model, processor, max_batch=4, max_queue=16))
    server = ServerThread(create_app(engine, ServerSettings()))
    yield anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=300)
    server.close()
    engine.close()


def create(client: anthropic.Anthropic, messages, **kwargs) -> anthropic.types.Message:
    return client.messages.create(model="demo", max_tokens=MAX_TOKENS, messages=messages,
                                  extra_body={"temperature": 0.0}, **kwargs)


def serial(demo, messages, tools=None) -> str:  # noqa: F811
    model, processor = demo
    prompt = processor.apply_chat_template(messages, tools=tools) if tools else messages
    return generate(model, processor, prompt, max_tokens=MAX_TOKENS, temperature=0.0)


def test_text_with_a_system_prompt(demo, served):  # noqa: F811
    reply = create(served, [{"role": "user", "content": "Who are you?"}], system="Be brief.")
    expected = serial(demo, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}])
    assert reply.content[0].text == expected and reply.stop_reason == "end_turn"
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) > 0 and reply.usage.output_tokens


def test_a_base64_image(demo, served):  # noqa: F811
    image = picture(21, count=1)
    out = io.BytesIO()
    image.save(out, "PNG")
    data = base64.b64encode(out.getvalue()).decode()
    reply = create(served, [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "What colour is the shape?"}]}])
    expected = serial(demo, [{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": "What colour is the shape?"}]}])
    assert reply.content[0].text == expected


def test_streaming_gives_the_whole_reply(served):
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    whole = create(served, messages)
    with served.messages.stream(model="demo", max_tokens=MAX_TOKENS, messages=messages,
                                extra_body={"temperature": 0.0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_a_tool_round_trip(demo, served):  # noqa: F811
    question = [{"role": "user", "content": "What is 3 plus 4?"}]
    first = create(served, question, tools=[ADD], tool_choice={"type": "tool", "name": "add"})
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "add" and first.stop_reason == "tool_use"
    jsonschema.validate(call.input, ADD["input_schema"])
    history = [*question, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "7"}]}]
    final = create(served, history, tools=[ADD])
    ours = [*question, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": call.input}}]}, {"role": "tool", "content": "7"}]
    content, calls = parse_tool_calls(serial(demo, ours, [AS_FUNCTION]), [AS_FUNCTION])
    assert [b.text for b in final.content if b.type == "text"] == ([content] if content else [])
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        (c.name, json.loads(c.arguments)) for c in calls]
