"""Structured output through real generation: the bundled demo model, which knows nothing of JSON, sampled at
temperature 1 with a JSON constraint, must produce JSON that ``jsonschema`` validates, for several schemas and
seeds; without the constraint the same runs are not JSON, so the constraint does the work.
"""

import json

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlx_llama4.demo_tools import TOOLS as DEMO_TOOLS
from mlx_llama4.structured import JSONConstraint, json_schema_of
from mlx_llama4.tool_calls import parse_tool_calls, tool_call_schema

# Every string, number and list is bounded: a model that knows nothing of JSON would otherwise write one string
# until max_tokens, which the constraint allows (the reply is then cut: finish_reason "length").
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]},
        "position": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}, "visible": {"type": "boolean"},
                           "note": {"type": ["string", "null"], "maxLength": 6}},
            "required": ["x", "visible", "note"],
            "additionalProperties": False,
        },
        "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
                  "minItems": 1, "maxItems": 4},
    },
    "required": ["shape", "position", "sizes"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
        "required": ["zone"], "additionalProperties": False}}},
]
SEEDS = [0, 1, 2]


def _generate(demo, constraint, seed, max_tokens, prompt="Describe the picture as JSON."):
    """(text, finish_reason) of one sampled reply, ending as ``stream_generate`` ends one."""
    model, processor = demo
    mx.random.seed(seed)
    ids = mx.array(processor(messages=prompt)["input_ids"][0])
    ends = set(processor.eos_token_ids)
    tokens = []
    for token, _ in generate_step(ids, model.language_model, max_tokens=max_tokens, sampler=make_sampler(temp=1.0),
                                  logits_processors=[constraint] if constraint else None,
                                  prompt_cache=model.make_cache()):
        if token in ends:
            return processor.decode(tokens), "stop"
        tokens.append(token)
    return processor.decode(tokens), "length"


def _constraint(demo, schema):
    _, processor = demo
    return JSONConstraint(processor.tokenizer, schema, processor.eos_token_ids)


def test_json_schema_of_response_formats():
    assert json_schema_of(None) is None
    assert json_schema_of({"type": "text"}) is None
    assert json_schema_of({"type": "json_object"}) == {"type": "object"}
    assert json_schema_of({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}) \
        == PERSON
    assert json_schema_of(PERSON) == PERSON  # a bare schema
    with pytest.raises(ValueError, match="'json_schema': {'name': ..., 'schema'"):
        json_schema_of({"type": "json_schema", "schema": PERSON})
    with pytest.raises(ValueError, match="must be a JSON object, got str"):
        json_schema_of("json")


@pytest.mark.parametrize("schema, features", [
    ({"type": "object", "not": {"required": ["a"]}}, ['"not"']),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, ['"if"', '"then"']),
    ({"type": "dict"}, ["dict"]),
])
def test_unsupported_schema_features_are_named(demo, schema, features):
    with pytest.raises(ValueError, match="unsupported JSON schema") as error:
        _constraint(demo, schema)
    for feature in features:
        assert feature in str(error.value)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("schema", [PERSON, NESTED], ids=["person", "nested"])
def test_sampled_reply_validates_against_the_schema(demo, schema, seed):
    text, finish = _generate(demo, _constraint(demo, schema), seed, max_tokens=200)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), schema)
    # Without the constraint the same run is not JSON at all.
    free, _ = _generate(demo, None, seed, max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)


def test_openai_response_format_shape(demo):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    text, finish = _generate(demo, _constraint(demo, json_schema_of(response_format)), 3, max_tokens=200)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_replies_are_objects(demo):
    """Any JSON object: unbounded, so some replies are cut; every one that ended is an object. Asked for a
    calculation with its calculator offered, the demo model writes its call, one object, and ends."""
    _, processor = demo
    calculation = processor.apply_chat_template([{"role": "user", "content": "What is 17 times 23?"}],
                                                tools=[DEMO_TOOLS["calculator"]])
    ended = 0
    for seed in range(12):
        prompt = calculation if seed % 2 else "Describe the picture as JSON."
        text, finish = _generate(demo, _constraint(demo, json_schema_of({"type": "json_object"})), seed, 24, prompt)
        assert text.startswith("{")
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
            ended += 1
    assert ended


def test_a_reply_cut_by_max_tokens_is_reported_as_cut(demo):
    text, finish = _generate(demo, _constraint(demo, PERSON), 0, max_tokens=6)
    assert finish == "length"
    assert text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("seed", SEEDS)
def test_required_tool_call(demo, seed):
    text, finish = _generate(demo, _constraint(demo, tool_call_schema(TOOLS)), seed, max_tokens=120,
                             prompt="What is the weather in Paris?")
    assert finish == "stop"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and len(calls) == 1
    (tool,) = [t for t in TOOLS if t["function"]["name"] == calls[0].name]
    jsonschema.validate(json.loads(calls[0].arguments), tool["function"]["parameters"])


def test_named_and_parallel_tool_calls(demo):
    schema = tool_call_schema(TOOLS, {"type": "function", "function": {"name": "get_time"}}, parallel=True)
    schema["maxItems"] = 3  # bounded, as above
    text, finish = _generate(demo, _constraint(demo, schema), 0, max_tokens=200, prompt="What time is it?")
    assert finish == "stop"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and calls and {c.name for c in calls} == {"get_time"}
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), TOOLS[1]["function"]["parameters"])
