"""Tools and structured output through the official ``openai`` client, on the real engine and the bundled demo
model (float32, greedy). The reference for every reply is the one-sequence path: ``generate()`` on the prompt
the checkpoint's template renders with the same tools (and, for forced calls and JSON output, the same JSON
schema as ``response_format=``), so the server must hand the engine exactly that prompt and constraint.

- a forced call (``tool_choice`` ``required`` or named) of tools the model was not trained on, its ``tool``
  result and the final answer: the constraint forces the call;
- ``response_format`` ``json_schema``: the reply validates with ``jsonschema``;
- streamed tool calls: their deltas add up to the whole call;
- ``<|eom|>`` after a call ends the turn on the engine;
- ``tool_choice`` ``auto``: the demo model, trained to use its tools, chooses to call, then answers from the
  result.
"""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import pytest


from mlx_llama4 import generate  # noqa: E402
from mlx_llama4.app.server.app import ServerSettings, create_app  # noqa: E402
from mlx_llama4.app.server.engine_client import EngineClient  # noqa: E402
from mlx_llama4.demo_tools import TOOLS as DEMO_TOOLS  # noqa: E402
from mlx_llama4.engine import Engine  # noqa: E402
from mlx_llama4.tool_calls import parse_tool_calls, tool_call_schema  # noqa: E402
from server_helpers import ServerThread, openai_client  # noqa: E402, F401  (demo: a fixture)

MAX_TOKENS = 60
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two whole numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
COUNT = {"type": "function", "function": {
    "name": "count_shapes", "description": "Count the shapes of one colour in the picture",
    "parameters": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue", "yellow"]}},
                   "required": ["colour"], "additionalProperties": False}}}
TOOLS = [ADD, COUNT]
QUESTION = [{"role": "user", "content": "What is 3 plus 4?"}]


@pytest.fixture(scope="module")
def served(demo):  # noqa: F811
    model, processor = demo
    engine = EngineClient(Engine(model, processor, max_batch=4, max_queue=16))
    server = ServerThread(create_app(engine, ServerSettings()))
    yield server.url
    server.close()
    engine.close()


def ask(url: str, messages: list[dict], **kwargs):
    return openai_client(url).chat.completions.create(
        **{"model": "demo", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0, **kwargs})


def serial(demo, messages: list[dict], tools=None, schema=None) -> str:  # noqa: F811
    """The one-sequence reply to ``messages`` (Hugging Face format) with ``tools`` in the prompt, greedy."""
    model, processor = demo
    prompt = processor.apply_chat_template(messages, tools=tools) if tools else messages
    return generate(model, processor, prompt, max_tokens=MAX_TOKENS, temperature=0.0, response_format=schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
def test_a_forced_call_round_trip_equals_the_serial_path(demo, served, choice):  # noqa: F811
    reply = ask(served, QUESTION, tools=TOOLS, tool_choice=choice)
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    (call,) = reply.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    spec = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(arguments, spec["function"]["parameters"])
    if choice != "required":
        assert call.function.name == "add"
    # The same call on the one-sequence path, constrained by the same schema.
    _, (reference,) = parse_tool_calls(serial(demo, QUESTION, TOOLS, tool_call_schema(TOOLS, choice)), TOOLS)
    assert (reference.name, reference.arguments) == (call.function.name, call.function.arguments)

    # The result goes back; the model answers (unconstrained), exactly as generate() on the same history does.
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "7"}]
    final = ask(served, history, tools=TOOLS)
    ours = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}]},
        {"role": "tool", "content": "7"}]
    content, calls = parse_tool_calls(serial(demo, ours, TOOLS), TOOLS)
    message = final.choices[0].message
    assert (message.content or "") == content
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        (c.name, c.arguments) for c in calls]
    assert final.choices[0].finish_reason in ("stop", "tool_calls", "length")


def test_a_streamed_forced_call_equals_the_whole_call(served):
    whole = ask(served, QUESTION, tools=TOOLS, tool_choice="required").choices[0].message.tool_calls
    chunks = list(ask(served, QUESTION, tools=TOOLS, tool_choice="required", stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert {d.index for d in deltas} == {0} and len({d.id for d in deltas if d.id}) == 1
    assert "".join(d.function.name or "" for d in deltas) == whole[0].function.name
    assert "".join(d.function.arguments or "" for d in deltas) == whole[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


SHAPE = {"type": "object",
         "properties": {"shape": {"enum": ["circle", "square", "triangle"]},
                        "count": {"type": "integer", "minimum": 1, "maximum": 4},
                        "note": {"type": "string", "maxLength": 12}},
         "required": ["shape", "count", "note"], "additionalProperties": False}


def test_response_format_json_schema_validates_and_equals_the_serial_path(demo, served):  # noqa: F811
    response_format = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE, "strict": True}}
    messages = [{"role": "user", "content": "Describe the picture as JSON."}]
    reply = ask(served, messages, response_format=response_format)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SHAPE)
    assert reply.choices[0].message.content == serial(demo, messages, schema=response_format)
    cut = ask(served, messages, response_format=response_format, max_tokens=4)
    assert cut.choices[0].finish_reason == "length"


def test_tool_choice_none_is_the_plain_reply(demo, served):  # noqa: F811
    reply = ask(served, QUESTION, tools=TOOLS, tool_choice="none")
    assert reply.choices[0].message.content == serial(demo, QUESTION)


def test_the_demo_calls_a_tool_on_its_own_and_answers_from_the_result(demo, served):  # noqa: F811
    """``tool_choice`` auto: the demo model, trained on the tools of ``mlx_llama4.demo_tools``, calls the
    calculator for a phrasing it was not trained on, with the request's numbers, and answers from the result:
    the README's round trip, through the official client."""
    tools = [DEMO_TOOLS["calculator"], DEMO_TOOLS["draw_shape"]]
    question = [{"role": "user", "content": "Can you work out 36 divided by 12?"}]
    first = ask(served, question, tools=tools)
    assert first.choices[0].finish_reason == "tool_calls" and not first.choices[0].message.content
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "36 / 12"}
    history = [*question, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "3"}]
    final = ask(served, history, tools=tools)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert final.choices[0].message.content == "36 divided by 12 is 3."


def test_eom_ends_a_calling_turn_on_the_engine(demo):  # noqa: F811
    """A call followed by <|eom|> (Meta's end of a turn that waits for a tool result) stops generation there: the
    engine's replies end on it as on <|eot|>, so the server answers with the call and finish_reason tool_calls."""
    model, processor = demo
    eom = processor.token_id("<|eom|>")
    call = '{"name": "add", "parameters": {"a": 3, "b": 4}}'
    script = [*processor.encode(call), eom, *processor.encode(" and more")]
    steps = iter(script)

    def scripted(tokens, logits):  # the next scripted token, whatever the model prefers
        return mx.where(mx.arange(logits.shape[-1]) == next(steps), 0.0, -mx.inf)[None]

    engine = Engine(model, processor, max_batch=1, max_queue=1)
    try:
        events = list(engine.submit(QUESTION, max_tokens=100, temperature=0.0, logits_processors=[scripted]))
    finally:
        engine.close()
    assert events[-1].finish_reason == "stop" and events[-1].token == eom
    assert events[-1].completion_tokens == len(script) - len(processor.encode(" and more"))
    content, (parsed,) = parse_tool_calls("".join(e.text for e in events), TOOLS)
    assert content == "" and (parsed.name, json.loads(parsed.arguments)) == ("add", {"a": 3, "b": 4})
