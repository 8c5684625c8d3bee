"""``stream_generate`` / ``generate`` with ``response_format=``, on the bundled demo model (float32), which knows
nothing of JSON: sampled replies (several seeds, temperature 1) and greedy ones, with text, an image and a
prompt cache, must parse and validate with ``jsonschema`` whenever they end with ``finish_reason == "stop"``; a
reply cut by ``max_tokens`` says ``"length"``; bad formats fail before the prompt is read.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from mlx_llama4 import PromptCache, generate, stream_generate
from mlx_llama4.demo_tools import TOOLS as DEMO_TOOLS
from server_helpers import picture

# Bounded strings and lists: a model that knows nothing of JSON would otherwise write one string until max_tokens.
SHAPE = {"type": "object",
         "properties": {"shape": {"enum": ["circle", "square", "triangle"]},
                        "colour": {"type": "string", "maxLength": 8},
                        "count": {"type": "integer", "minimum": 1, "maximum": 4},
                        "filled": {"type": "boolean"}},
         "required": ["shape", "colour", "count", "filled"], "additionalProperties": False}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE, "strict": True}}


def reply(demo, prompt, **kwargs) -> tuple[str, str]:
    """(text, finish_reason) of one ``stream_generate`` run."""
    model, processor = demo
    chunks = list(stream_generate(model, processor, prompt, **kwargs))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_replies_validate_against_the_schema(demo, seed):
    text, finish = reply(demo, "Describe the picture as JSON.", max_tokens=120, temperature=1.0, seed=seed,
                         response_format=AS_SCHEMA)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), SHAPE)
    model, processor = demo  # generate() takes the same keyword and gives the same reply
    assert generate(model, processor, "Describe the picture as JSON.", max_tokens=120, temperature=1.0, seed=seed,
                    response_format=AS_SCHEMA) == text


def test_greedy_with_an_image_and_a_prompt_cache(demo):
    model, _ = demo
    cache = PromptCache(model)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(7)},
                                             {"type": "text", "text": "What shape is this?"}]}]
    first, finish = reply(demo, messages, max_tokens=120, temperature=0.0, prompt_cache=cache, response_format=SHAPE)
    assert finish == "stop"
    jsonschema.validate(json.loads(first), SHAPE)  # a bare schema works as well
    follow_up = [*messages, {"role": "assistant", "content": first},
                 {"role": "user", "content": "And how many shapes are there?"}]
    second, finish = reply(demo, follow_up, max_tokens=120, temperature=0.0, prompt_cache=cache,
                           response_format=AS_SCHEMA)
    assert finish == "stop"
    jsonschema.validate(json.loads(second), SHAPE)
    assert second == reply(demo, follow_up, max_tokens=120, temperature=0.0, response_format=AS_SCHEMA)[0]


def test_json_object_replies_are_objects_when_they_end(demo):
    """Every reply that ended is an object; asked for a calculation with its calculator offered, the demo model
    writes its call, one object, and ends."""
    _, processor = demo
    calculation = processor.apply_chat_template([{"role": "user", "content": "What is 17 times 23?"}],
                                                tools=[DEMO_TOOLS["calculator"]])
    ended = 0
    for seed in range(6):
        text, finish = reply(demo, calculation if seed % 2 else "Hello!", max_tokens=24, temperature=1.0, seed=seed,
                             response_format={"type": "json_object"})
        assert text.startswith("{")
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
            ended += 1
    assert ended


def test_a_reply_cut_by_max_tokens_says_length(demo):
    text, finish = reply(demo, "Describe the picture as JSON.", max_tokens=5, temperature=0.0,
                         response_format=AS_SCHEMA)
    assert finish == "length" and text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_text_format_is_free_text(demo):
    model, processor = demo
    free = generate(model, processor, "Who are you?", max_tokens=20, temperature=0.0)
    assert reply(demo, "Who are you?", max_tokens=20, temperature=0.0, response_format={"type": "text"})[0] == free
    with pytest.raises(json.JSONDecodeError):  # so the constraint is what makes the replies above JSON
        json.loads(free)


@pytest.mark.parametrize("response_format, words", [
    ({"type": "json_schema", "schema": SHAPE}, "'json_schema': {'name': ..., 'schema'"),
    ({"type": "object", "not": {"required": ["a"]}}, "unsupported JSON schema"),
    ("json", "must be a JSON object"),
])
def test_bad_formats_fail_before_the_prompt_is_read(demo, response_format, words):
    model, processor = demo
    with pytest.raises(ValueError) as error:  # the missing image would raise otherwise, if the prompt were read
        generate(model, processor, "Describe it.", images=["/no/such/picture.png"], response_format=response_format)
    assert words in str(error.value)
