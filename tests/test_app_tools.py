"""The app's demo tools: the tools themselves (a calculator that evaluates nothing but arithmetic, a shape drawer
in the demo's colours, a random number), and a turn that calls them: driven by a scripted engine, whose replies
are fixed calls and answers, the call runs, its result reaches the model in the chat template's own format
(the form the demo model is trained on), the chat shows the call and its result, and the follow-up answer
streams. One turn on the real engine shows that offering the tools changes nothing else.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app_helpers import collect, uploads_in  # noqa: E402
from mlx_llama4 import stream_generate  # noqa: E402
from mlx_llama4.app import chat, handlers  # noqa: E402
from mlx_llama4.app.device import LoadedModel  # noqa: E402
from mlx_llama4.app.handlers import AppConfig, ChatApp  # noqa: E402
from mlx_llama4.app.history import normalize_history, to_model_messages  # noqa: E402
from mlx_llama4.app.tools import calculator, draw_shape, random_number, run_tool  # noqa: E402
from mlx_llama4.demo_tools import COLOURS, SHAPES, TOOLS  # noqa: E402
from mlx_llama4.engine import Event, Handle  # noqa: E402
from mlx_llama4.tool_calls import function_specs, parse_tool_calls  # noqa: E402

CALL = '{"name": "calculator", "parameters": {"expression": "17 * 23"}}'  # as the engine streams it (no tags)


# ---- the tools ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expression", ["17 * 23", "2 ** 10", "-(3 + 4) / 2", "1.5 * 4", "((2))", "7 - -2",
                                        "2 ** -2", "10 / 4", "+5", "3 ** 2 ** 2"])
def test_calculator_agrees_with_python(expression):
    want = eval(expression, {"__builtins__": {}})  # the reference: Python's own arithmetic, on a trusted string
    got = calculator(expression)
    assert float(got) == want and ("." not in got) == float(want).is_integer()


@pytest.mark.parametrize("expression, why", [
    ("__import__('os').system('true')", "only numbers"), ("abs(-1)", "only numbers"), ("x + 1", "only numbers"),
    ("'a' * 3", "only numbers"), ("1 < 2", "only numbers"), ("True + 1", "only numbers"), ("7 // 2", "only numbers"),
    ("7 % 2", "only numbers"), ("[1][0]", "only numbers"), ("(1).real", "only numbers"),
    ("1 +", "not an arithmetic expression"), ("1 / 0", "division by zero"), ("9 ** 9 ** 9", "too large"),
    ("(10 ** 4000) * 10 ** 4000", "too large"), ("1e308 * 10", "no finite value"), ("(-8) ** 0.5", "not a real"),
    ("1+" * 300 + "1", "longer than 500"),
])
def test_calculator_refuses_what_is_not_arithmetic(expression, why):
    result = run_tool("calculator", {"expression": expression}, Path("."))
    assert result.failed and result.result.startswith("error: ") and why in result.result


def test_tool_specs_are_the_training_ones_and_draw_the_demo_world(tmp_path):
    """The specs are in OpenAI's format with every parameter required; the shapes and colours are those of the
    demo model's pictures (``training/shapes.py``)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    try:
        import shapes
    finally:
        sys.path.pop(0)
    assert (SHAPES, COLOURS) == (shapes.SHAPES, shapes.COLOURS)
    assert [s["name"] for s in function_specs(TOOLS.values())] == ["calculator", "draw_shape", "random_number"]
    for spec in TOOLS.values():
        parameters = spec["function"]["parameters"]
        assert spec["type"] == "function" and parameters["required"] == list(parameters["properties"])

    from PIL import Image

    size = 160
    for shape in SHAPES:
        image = Image.open(draw_shape(shape, "purple", tmp_path)).convert("RGB")
        assert image.size == (size, size) and image.getpixel((size // 2, size // 2)) == COLOURS["purple"]
        assert image.getpixel((2, 2)) == (255, 255, 255)
    # A square sits inside its circle, corners on it: beside the centre, at 0.85 of the radius (0.4 of the
    # size), the circle is filled and the square's side (at 0.71) is passed.
    beside = (round(size / 2 + 0.85 * 0.4 * size), size // 2)
    assert Image.open(draw_shape("circle", "red", tmp_path)).convert("RGB").getpixel(beside) == COLOURS["red"]
    assert Image.open(draw_shape("square", "red", tmp_path)).convert("RGB").getpixel(beside) == (255, 255, 255)
    assert "not a 'hexagon'" in run_tool("draw_shape", {"shape": "hexagon", "colour": "red"}, tmp_path).result
    assert "not 'pink'" in run_tool("draw_shape", {"shape": "star", "colour": "pink"}, tmp_path).result

    assert {int(random_number(1, 3)) for _ in range(200)} == {1, 2, 3}
    assert "above high" in run_tool("random_number", {"low": 5, "high": 1}, tmp_path).result
    assert "whole number" in run_tool("random_number", {"low": "1", "high": 2}, tmp_path).result
    assert "takes low" in run_tool("random_number", {"low": 1}, tmp_path).result
    assert "no tool 'weather'" in run_tool("weather", {}, tmp_path).result


# ---- a turn that calls tools, on a scripted engine ----------------------------------------------------------


class ScriptedEngine:
    """The engine's ``submit``, answering each request with the next scripted reply, streamed 3 characters a
    token every 50 ms; it records what each request was given."""

    kv_bits = kv_group_size = None

    def __init__(self, *replies: str):
        self.replies = list(replies)
        self.requests: list[dict] = []

    def submit(self, messages, tools=None, **sampling) -> Handle:
        self.requests.append(dict(messages=copy.deepcopy(messages), tools=tools, **sampling))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        handle = Handle(len(self.requests), lambda: None)
        pieces = [reply[i: i + 3] for i in range(0, len(reply), 3)]
        usage = dict(prompt_tokens=40, cached_tokens=0, time_to_first_token=0.01)

        def stream():
            for i, piece in enumerate(pieces):
                time.sleep(0.05)
                handle._put(Event(piece, i, None, completion_tokens=i + 1, **usage))
            handle._put(Event("", None, "stop", completion_tokens=len(pieces), **usage))

        threading.Thread(target=stream, daemon=True).start()
        return handle


@pytest.fixture
def scripted(app_model, tmp_path, monkeypatch):
    """``make(*replies)``: the app's handlers on a scripted engine (the real model's tokenizer and config),
    with ``tmp_path`` as the upload folder; returns the app and the engine."""
    holder, _ = app_model
    uploads_in(tmp_path, monkeypatch)

    def make(*replies):
        engine = ScriptedEngine(*replies)
        loaded = LoadedModel("scripted", holder.current.model, holder.current.processor, engine)
        app = ChatApp(SimpleNamespace(current=loaded, loading=None), AppConfig(models_dirs=[tmp_path]))
        return app, engine
    return make


def _ask(app, text, tools, history=()):
    session = chat.ChatSession()
    _, history = app.add_message({"text": text, "files": []}, list(history), session)
    return collect(app.respond(history, session, "", 0.0, 1.0, 64, tools)), history


def test_a_tool_call_runs_and_the_model_answers_from_its_result(scripted, app_model):
    holder, _ = app_model
    app, engine = scripted("Let me see. " + CALL, "17 times 23 is 391.")
    frames, asked = _ask(app, "What is 17 times 23?", ["calculator", "random_number"])
    first, second = engine.requests
    offered = [TOOLS["calculator"], TOOLS["random_number"]]
    assert first["tools"] == second["tools"] == offered
    assert first["messages"] == [{"role": "user", "content": "What is 17 times 23?"}]  # text: the tools fit
    call, result = second["messages"][1:]
    assert call == {"role": "assistant", "tool_calls": [{"id": call["tool_calls"][0]["id"], "type": "function",
                                                          "function": {"name": "calculator",
                                                                       "arguments": {"expression": "17 * 23"}}}]}
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "391"}
    # The prompt reads as the demo model's training chats do (training/tool_chats.py on branch demotools).
    prompt = holder.current.processor.apply_chat_template(second["messages"], tools=offered)
    assert ('<|header_start|>assistant<|header_end|>\n\n<|python_start|><|python_end|>{"name": "calculator", '
            '"parameters": {"expression": "17 * 23"}}<|eot|><|header_start|>ipython<|header_end|>\n\n"391"<|eot|>'
            '<|header_start|>assistant<|header_end|>\n\n') in prompt

    final = frames[-1]
    used, reply, stats = final[len(asked):]
    assert used["metadata"]["title"] == "⚙ Used calculator"
    assert 'calculator(expression="17 * 23")' in used["content"] and "→ 391" in used["content"]
    assert reply == {"role": "assistant", "content": "17 times 23 is 391."}
    assert "first token" in stats["metadata"]["title"]
    shown = [m["content"] for f in frames for m in f[len(asked):] if m["role"] == "assistant" and "metadata" not in m]
    assert "Let me see." in shown and not any("{" in text for text in shown)  # the call never shows as text
    assert len({text for text in shown if text.startswith("17")}) > 2  # the answer streamed
    # The next turn's prompt holds the answer, not the note.
    assert to_model_messages(normalize_history(final)) == [
        {"role": "user", "content": "What is 17 times 23?"}, {"role": "assistant", "content": "17 times 23 is 391."}]


def test_a_tool_error_goes_back_to_the_model_and_shows(scripted):
    app, engine = scripted('{"name": "calculator", "parameters": {"expression": "2 +"}}', "Sorry.")
    frames, asked = _ask(app, "What is 2 plus?", ["calculator"])
    assert engine.requests[1]["messages"][-1]["content"] == "error: '2 +' is not an arithmetic expression"
    used = frames[-1][len(asked)]
    assert used["metadata"]["title"] == "⚙ Used calculator (it failed)" and "not an arithmetic" in used["content"]


def test_a_drawing_shows_in_the_chat(scripted, tmp_path):
    app, engine = scripted('{"name": "draw_shape", "parameters": {"shape": "star", "colour": "blue"}}',
                           "Here is a blue star: blue_star.png.")
    frames, asked = _ask(app, "Draw a blue star.", ["draw_shape"])
    used, picture, reply, _ = frames[-1][len(asked):]
    path = Path(picture["content"]["path"])
    assert path.name == "blue_star.png" and path.is_relative_to(tmp_path) and path.is_file()
    assert engine.requests[1]["messages"][-1]["content"] == "blue_star.png"
    assert reply["content"] == "Here is a blue star: blue_star.png."
    assert normalize_history(frames[-1])[-1].text == reply["content"]  # the picture is not part of the prompt


def test_tool_rounds_are_bounded(scripted):
    app, engine = scripted(CALL)  # calls, whatever it is told
    frames, asked = _ask(app, "What is 17 times 23?", ["calculator"])
    assert len(engine.requests) == chat.MAX_TOOL_ROUNDS + 1
    notes = [m["metadata"]["title"] for m in frames[-1][len(asked):] if m.get("metadata")]
    assert notes == ["⚙ Used calculator"] * chat.MAX_TOOL_ROUNDS + [handlers.STOPPED]


def test_without_tools_nothing_is_offered_or_parsed(scripted):
    app, engine = scripted(CALL)
    frames, asked = _ask(app, "What is 17 times 23?", [])
    assert engine.requests[0]["tools"] is None and frames[-1][len(asked)]["content"] == CALL


def test_tools_need_a_text_first_message(scripted, tmp_path):
    from app_helpers import picture

    app, engine = scripted(CALL)
    session = chat.ChatSession()
    _, history = app.add_message({"text": "Look", "files": [str(picture(tmp_path / "a.png"))]}, [], session)
    out = collect(app.respond(history, session, "", 0.0, 1.0, 64, ["calculator"]))[-1]
    assert out[-1]["metadata"]["title"] == handlers.NOT_SENT and "first message must be text" in out[-1]["content"]
    assert engine.requests == []


# ---- the real engine -------------------------------------------------------------------------------------


def test_tools_on_the_real_engine(app_model, tmp_path, monkeypatch, engine_spy):
    """With tools offered, the reply is the model's own greedy reply to the prompt with the tools (the
    one-sequence path computes it) and the tools went into the engine's request."""
    holder, folder = app_model
    monkeypatch.setattr(chat, "upload_dirs", lambda: [tmp_path])
    app = ChatApp(holder, AppConfig(models_dirs=[folder.parent], include_hf_cache=False))
    session = chat.ChatSession()
    _, history = app.add_message({"text": "What is 17 times 23?", "files": []}, [], session)
    final = collect(app.respond(history, session, "", 0.0, 1.0, 8, list(TOOLS)))[-1]
    offered = list(TOOLS.values())
    chunks = list(stream_generate(holder.current.model, holder.current.processor, to_model_messages(
        normalize_history(history)), max_tokens=8, temperature=0.0, tools=offered))
    want, calls = parse_tool_calls("".join(c.text for c in chunks), offered)
    assert not calls  # the random test model calls nothing
    assert final[-2] == {"role": "assistant", "content": want}
    assert f"prompt {chunks[-1].prompt_tokens} tok" in final[-1]["metadata"]["title"]  # the tools were in it
    (prompt, _), = engine_spy.requests
    assert prompt == to_model_messages(normalize_history(history))

