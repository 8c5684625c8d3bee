"""Prompt inputs: an already templated string is used as it is (never wrapped in a second user turn), and
malformed chat messages are refused with a ``ProcessorError`` (a ``ValueError``) naming the message and the
problem, through ``Processor.__call__`` and through ``mlx_llama4.generate`` on the bundled demo model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from mlx_llama4 import generate
from mlx_llama4.processor import ProcessorError

BOS, HEADER = "<|begin_of_text|>", "<|header_start|>"


@pytest.fixture(scope="module")
def processor(demo):
    return demo[1]


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 90, 3), dtype=np.uint8))


def ids(out) -> list[int]:
    return out["input_ids"][0].tolist()


def image_turn(question: str, image=None) -> dict:
    part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return {"role": "user", "content": [part, {"type": "text", "text": question}]}


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "What is 2 plus 3?"}]


# ---- an already templated string ---------------------------------------------------------------------------


def test_templated_string_is_used_as_it_is(processor):
    rendered = processor.apply_chat_template(CHAT)
    assert rendered.startswith(BOS)
    got = ids(processor(messages=rendered))
    assert got == ids(processor(messages=CHAT))
    assert got.count(processor.bos_token_id) == 1
    assert processor.decode(got).count(HEADER) == rendered.count(HEADER) == 5  # no turn nested in a user turn


def test_templated_string_placeholders_take_the_images(processor):
    rendered = processor.apply_chat_template([image_turn("What colour is it?")])
    out = processor(messages=rendered, images=[picture()])
    want = processor(messages=[image_turn("What colour is it?", picture())])
    assert ids(out) == ids(want) and out["grids"] == want["grids"]
    assert np.array_equal(out["pixel_values"], want["pixel_values"])


def test_templated_without_bos_and_plain_strings(processor):
    rendered = processor.apply_chat_template(CHAT)
    without_bos = rendered[len(BOS):]  # still template output: it holds <|header_start|>
    assert ids(processor(messages=without_bos)) == ids(processor(messages=CHAT))
    plain = "What is 2 plus 3?"  # a plain string is still one user turn
    assert ids(processor(messages=plain)) == ids(processor(messages=[{"role": "user", "content": plain}]))


def test_templated_string_with_template_options_is_refused(processor):
    with pytest.raises(ProcessorError, match=r"already chat-template output; template options \(tools\)"):
        processor(messages=processor.apply_chat_template(CHAT), tools=[{"name": "f"}])


# ---- malformed messages ------------------------------------------------------------------------------------

MALFORMED = {
    "empty": ([], "no chat messages"),
    "not a list": (5, "chat messages must be a list of dicts with 'role' and 'content', got int"),
    "not a dict": (["hello"], "message 0: a chat message must be a dict with 'role' and 'content', got str"),
    "no role": ([{"content": "hi"}], "message 0: no 'role'; the roles are system, user, assistant, ipython, tool"),
    "unknown role": ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
                     "message 1: unknown role 'bot'; the roles are system, user, assistant, ipython, tool"),
    "no content": ([{"role": "user"}], r"message 0 \(user\): no 'content'"),
    "content not text": ([{"role": "user", "content": 42}],
                         r"message 0 \(user\): 'content' must be a string or a list of parts, got int"),
    "part not a dict": ([{"role": "user", "content": [7]}],
                        r"message 0 \(user\), part 0: a content part must be a string or a dict with a 'type'"),
    "part without type": ([{"role": "user", "content": [{"text": "hi"}]}], r"part 0: no 'type'"),
    "unknown part type": ([{"role": "user", "content": ["a", {"type": "video", "video": "v.mp4"}]}],
                          r"message 0 \(user\), part 1: unknown type 'video'; the part types are text, image"),
    "text part without text": ([{"role": "user", "content": [{"type": "text", "txt": "hi"}]}],
                               "part 0: a text part needs a string 'text'"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_messages_name_message_and_problem(processor, name):
    messages, message = MALFORMED[name]
    with pytest.raises(ProcessorError, match=message):
        processor(messages=messages)
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template(messages)


def test_well_formed_variants_still_pass(processor):
    tool_call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    dialog = [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},  # OpenAI style: no content
        {"role": "tool", "content": {"sum": 5}},  # tool results: any JSON
        {"role": "ipython", "content": [{"sum": 5}, 5]},
        {"role": "user", "content": ["Thanks, ", {"type": "text", "text": "and 4 plus 4?"}]},
    ]
    rendered = processor.apply_chat_template(dialog)
    assert '{"sum": 5}' in rendered and "Thanks, and 4 plus 4?" in rendered


# ---- through generate on the demo model ----------------------------------------------------------------------


def test_generate_with_a_templated_prompt(demo):
    model, processor = demo
    kw = dict(max_tokens=12, temperature=0.0)
    assert generate(model, processor, processor.apply_chat_template(CHAT), **kw) == generate(model, processor, CHAT,
                                                                                             **kw)
    image = picture(1)
    question = [image_turn("How many shapes are there?")]
    templated = generate(model, processor, processor.apply_chat_template(question), images=[image], **kw)
    assert templated == generate(model, processor, question, images=[image], **kw)
    assert templated == generate(model, processor, "How many shapes are there?", images=[image], **kw)


@pytest.mark.parametrize("name", ["empty", "not a dict", "unknown role", "unknown part type"])
def test_generate_refuses_malformed_messages(demo, name):
    model, processor = demo
    messages, message = MALFORMED[name]
    with pytest.raises(ProcessorError, match=message):
        generate(model, processor, messages, max_tokens=4)


def test_long_prompts_do_not_trip_the_tokenizer_length_warning(processor, caplog):
    """The context limit is the model's; tokenizer_config.json's model_max_length (4096 for the demo) must not
    make transformers log "Token indices sequence length is longer than ..." on every long prompt."""
    with caplog.at_level(logging.WARNING):
        assert len(processor.encode("shape " * 5000)) > 4096
    assert not [r for r in caplog.records if "sequence length" in r.getMessage()]


def test_tools_reach_the_chat_template(demo):
    """``tools=`` renders the function specs through the checkpoint's template, as transformers would."""
    model, processor = demo
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                               "parameters": {"type": "object",
                                                              "properties": {"expression": {"type": "string"}},
                                                              "required": ["expression"]}}}]
    question = [{"role": "user", "content": "What is 17 times 23?"}]
    templated = processor.apply_chat_template(question, tools=tools)
    assert '"name": "calculator"' in templated
    kw = dict(max_tokens=6, temperature=0.0)
    assert generate(model, processor, question, tools=tools, **kw) == generate(model, processor, templated, **kw)
    assert processor(messages=question, tools=tools)["input_ids"].shape[1] > processor(messages=question)[
        "input_ids"].shape[1]
