"""Tools and structured output in ``/v1/chat/completions``, through the official ``openai`` client, against the
fake engine (``server_helpers.FakeEngine``): tools reach the chat template (or not, for ``tool_choice: "none"``),
replies are split into content and ``tool_calls`` (streamed as deltas whose concatenation is the whole call),
past calls and tool results are rendered in the checkpoint's own format, ``required`` / named choices and
``response_format`` hand the engine a JSON constraint that really bends the reply, and bad tool fields get a 400
naming the field. ``test_server_tools_engine.py`` runs round trips on the real engine and the demo model.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from mlx_llama4.structured import JSONConstraint
from server_helpers import FakeEngine
from server_helpers import fake_server  # noqa: F401  (the "server" fixture)
from server_helpers import openai_client as client

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
CALL = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'  # the checkpoint's form


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def rendered_prompt(fake: FakeEngine) -> str:
    return fake.processor.decode(fake.handles[-1].prompt_ids)


# ---- tools in the prompt ---------------------------------------------------------------------------------------


def test_tools_reach_the_chat_template(server):
    url, fake = server
    client(url).chat.completions.create(model="demo", messages=ask("Weather in Paris?"),
                                        tools=[{**WEATHER, "function": {**WEATHER["function"], "strict": True}}])
    assert fake.submitted[-1]["tools"] == [WEATHER]  # OpenAI's function format, as transformers' templates take
    prompt = rendered_prompt(fake)
    assert "Given the following functions" in prompt and '"name": "get_weather"' in prompt
    assert fake.submitted[-1]["logits_processors"] is None  # "auto": the model chooses, unconstrained


def test_tool_choice_none_leaves_tools_out_and_replies_unparsed(server):
    url, fake = server
    reply = client(url).chat.completions.create(model="demo", messages=ask("REPLY:" + CALL), tools=TOOLS,
                                                tool_choice="none")
    assert fake.submitted[-1]["tools"] is None and "get_weather" not in rendered_prompt(fake).split("REPLY:")[0]
    message = reply.choices[0].message
    assert message.content == CALL and message.tool_calls is None and reply.choices[0].finish_reason == "stop"


# ---- calls in the reply ----------------------------------------------------------------------------------------


def test_a_call_becomes_tool_calls_and_finish_reason_tool_calls(server):
    url, _ = server
    reply = client(url).chat.completions.create(model="demo", messages=ask("REPLY:" + CALL + "<|eom|>"),
                                                tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_prose_then_a_call_and_calls_to_unknown_tools(server):
    url, _ = server
    reply = client(url).chat.completions.create(model="demo", messages=ask("REPLY:Let me look. " + CALL),
                                                tools=TOOLS)
    message = reply.choices[0].message
    assert message.content == "Let me look." and [c.function.name for c in message.tool_calls] == ["get_weather"]
    unknown = '{"name": "launch", "parameters": {"target": "moon"}}'
    reply = client(url).chat.completions.create(model="demo", messages=ask("REPLY:" + unknown), tools=TOOLS)
    assert reply.choices[0].message.content == unknown and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


def _streamed(url: str, **kwargs) -> tuple[list, dict]:
    """The chunks of a streamed reply, and its tool calls assembled from their deltas by index."""
    chunks = list(client(url).chat.completions.create(model="demo", stream=True, **kwargs))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id is not None:
                assert call["id"] in (None, delta.id)  # the id never changes
                call["id"] = delta.id
            if delta.function and delta.function.name:
                call["name"] += delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
    return chunks, calls


def test_streamed_calls_equal_the_whole_reply(server):
    url, _ = server
    two = CALL + '{"name": "get_time", "parameters": {"zone": "CET"}}'
    # One call ended by <|eom|>; prose and two calls; a call that never closes (held back while it may still
    # become one, then content).
    for script, finish in ((CALL + "<|eom|>", "tool_calls"), ("Sure. " + two, "tool_calls"),
                           ('Try [get_weather(city="Paris"', "stop")):
        whole = client(url).chat.completions.create(model="demo", messages=ask("REPLY:" + script), tools=TOOLS)
        chunks, calls = _streamed(url, messages=ask("REPLY:" + script), tools=TOOLS)
        expected = whole.choices[0].message.tool_calls or []
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
            (c.function.name, c.function.arguments) for c in expected]
        assert sorted(calls) == list(range(len(expected)))
        assert all(c["id"].startswith("call_") for c in calls.values())
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == (whole.choices[0].message.content or "")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [finish] == [whole.choices[0].finish_reason]


def test_a_streamed_call_arrives_in_openai_delta_order(server):
    """The raw deltas: index, id, type and name with empty arguments first, then the arguments."""
    url, _ = server
    body = {"messages": ask("REPLY:" + CALL + "<|eom|>"), "tools": TOOLS, "stream": True}
    with httpx.stream("POST", url + CHAT, json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"]["tool_calls"] for e in events if "tool_calls" in e["choices"][0]["delta"]]
    (opening,), (arguments,) = deltas
    assert opening["index"] == 0 and opening["type"] == "function" and opening["id"].startswith("call_")
    assert opening["function"] == {"name": "get_weather", "arguments": ""}
    assert arguments == {"index": 0, "function": {"arguments": '{"city": "Paris", "unit": "celsius"}'}}


# ---- the history: past calls and their results -----------------------------------------------------------------


def test_a_round_trip_renders_the_checkpoints_own_format(server):
    """The call the server returned, sent back as an assistant message (content null) with a tool result, reads
    in the prompt exactly as the model wrote it, and the result follows in an ipython turn."""
    url, fake = server
    c = client(url)
    first = c.chat.completions.create(model="demo", messages=ask("REPLY:" + CALL + "<|eom|>"), tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    history = [*ask("REPLY:" + CALL + "<|eom|>"),
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    final = c.chat.completions.create(model="demo", messages=history, tools=TOOLS)
    assert final.choices[0].message.content == "You said: 18 degrees" and final.choices[0].finish_reason == "stop"
    prompt = rendered_prompt(fake)
    assert (f"<|header_start|>assistant<|header_end|>\n\n<|python_start|><|python_end|>{CALL}<|eot|>"
            '<|header_start|>ipython<|header_end|>\n\n"18 degrees"<|eot|>') in prompt
    sent = fake.submitted[-1]["prompt"]
    assert sent[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]}
    assert sent[2] == {"role": "tool", "content": "18 degrees"}


# ---- forced calls and structured output: a JSON constraint reaches the engine ----------------------------------


def test_a_named_tool_choice_forces_a_valid_call(server):
    """The fake's reply ("You said: ...") is bent by the constraint into a call of the named tool, whose
    arguments validate against its schema (an enum: every step of the call is forced or chosen from it)."""
    url, fake = server
    reply = client(url).chat.completions.create(model="demo", messages=ask("What time is it?"), tools=TOOLS,
                                                tool_choice={"type": "function", "function": {"name": "get_time"}})
    (processor,) = fake.submitted[-1]["logits_processors"]
    assert isinstance(processor, JSONConstraint)
    assert fake.submitted[-1]["tools"] == TOOLS
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time" and reply.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_required_lets_a_valid_call_through_and_a_cut_one_says_length(server):
    url, fake = server
    reply = client(url).chat.completions.create(model="demo", messages=ask("REPLY:" + CALL), tools=TOOLS,
                                                tool_choice="required")
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]
    cut = client(url).chat.completions.create(model="demo", messages=ask("Weather?"), tools=TOOLS,
                                              tool_choice="required", max_tokens=4)
    choice = cut.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith('{"n')  # on its way to a call, and cut: no claim of validity


SHAPE = {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]},
                                          "filled": {"type": "boolean"}},
         "required": ["shape", "filled"], "additionalProperties": False}


def test_response_format_json_schema_bends_the_reply_into_valid_json(server):
    url, fake = server
    response_format = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE, "strict": True}}
    reply = client(url).chat.completions.create(model="demo", messages=ask("Describe it."),
                                                response_format=response_format)
    assert isinstance(fake.submitted[-1]["logits_processors"][0], JSONConstraint)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SHAPE)
    chunks = list(client(url).chat.completions.create(model="demo", messages=ask("Describe it."), stream=True,
                                                      response_format=response_format))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content


def test_json_object_cut_by_max_tokens_says_length(server):
    url, _ = server
    reply = client(url).chat.completions.create(model="demo", messages=ask("Hello"), max_tokens=3,
                                                response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.choices[0].message.content)


# ---- refusals --------------------------------------------------------------------------------------------------

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1P"
                                                   "eAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"}}
BAD = [
    ("required without tools", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("named tool not offered", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
     "tool_choice", "'fly'"),
    ("bad tool_choice", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'required'"),
    ("tool without a function", {"tools": [{"type": "function"}]}, "tools[0].function", "required"),
    ("bad tool name", {"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
     "tools[0].function.name", "pattern"),
    ("forced call and JSON output", {"tools": TOOLS, "tool_choice": "required",
                                     "response_format": {"type": "json_object"}}, "response_format", "forced"),
    ("schema the grammar cannot enforce", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "dict"}}}}, "response_format", "unsupported JSON schema"),
    ("json_schema without a schema", {"response_format": {"type": "json_schema"}}, "response_format", "'schema'"),
    ("image before the tools", {"tools": TOOLS, "messages": [{"role": "user", "content": [
        IMAGE, {"type": "text", "text": "What is it?"}]}]}, "tools", "first user message"),
    ("arguments not JSON", {"messages": [*ask("Hi"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{zone: UTC"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    ("arguments not an object", {"messages": [*ask("Hi"), {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "[1]"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "JSON object"),
    ("tool result with an image", {"messages": [*ask("Hi"), {"role": "tool", "tool_call_id": "c",
                                                             "content": [IMAGE]}]}, "messages[1]", "text only"),
    ("user message with tool_calls", {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0]",
     "only assistant"),
    ("assistant without content or calls", {"messages": [*ask("Hi"), {"role": "assistant", "content": None}]},
     "messages[1]", "content is required"),
]


@pytest.mark.parametrize("name,fields,param,words", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_fields_get_a_400_naming_the_field(server, name, fields, param, words):
    url, fake = server
    submitted = len(fake.submitted)
    r = httpx.post(url + CHAT, json={"messages": ask("Hi"), **fields}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert len(fake.submitted) == submitted  # refused before the engine
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model="demo", **{"messages": ask("Hi"), **fields})
