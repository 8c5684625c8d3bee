"""Synthetic tool-use chats for the demo model: when to call a tool, with which arguments, and how to answer
from its result.

Three tools fit the demo's world: ``calculator(expression)`` for arithmetic, ``draw_shape(shape, colour)`` for
the shapes it knows, ``random_number(low, high)``. They are offered the OpenAI / Hugging Face way (``tools=[{"type":
"function", "function": {...}}]``, which the real Llama 4 chat template writes into the first user message), in a
random order and a random subset, so the model must read the list: a request whose tool is offered gets a call,
one whose tool is not gets :data:`NO_TOOL` (single-digit additions, which the model knows, are answered directly).
Greetings, questions about itself and pictures get their usual answers even with tools offered.

A call is the assistant message the template renders for ``tool_calls``:
``<|python_start|><|python_end|>{"name": "calculator", "parameters": {"expression": "17 * 23"}}<|eot|>``; the
result comes back in a ``tool`` message, and the next assistant turn answers from it ("17 times 23 is 391.").
OpenAI clients send a call back with ``function.arguments`` as a JSON string, which the template writes as a
quoted string; the chats use both spellings for calls in the history, so the answer does not depend on how a
server passes them on, and the model is trained to write only the dict spelling (``is_call_target``).

Every request has training phrasings and held-out ones (``HELD_OUT``): recombinations of the same words that
training never shows, for ``tests/test_demo_tools.py`` and ``training/eval_tools_server.py``. The answer strings
are the contract with them: :func:`request` gives the question, the expected call, a result and the answer.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Optional

from mlx_llama4.demo_tools import TOOL_NAMES, TOOLS

import shapes

NO_TOOL = "I have no tool for that."


# The specs (mlx_llama4/demo_tools.py, shared with the app) are deliberately plain: no enum of the colours and
# shapes, no example expression. A first training run with them (975 of 2000 steps) learnt when to call which tool
# but copied no argument from the question: its global (NoPE) layers, the only ones that reach past a 32-token
# chunk, found the question's colour among the enum's six and its numbers among the example's, and wrote
# constants ("circle", "orange") instead.

# Operators: (symbol in the expression, words a question may use, the word of the answer).
OPERATORS = {
    "+": (("plus", "+"), "plus"),
    "-": (("minus", "-"), "minus"),
    "*": (("times", "*", "multiplied by"), "times"),
    "/": (("divided by", "/"), "divided by"),
}

PHRASINGS = {
    "calculator": (
        "What is {a} {op} {b}?",
        "Calculate {a} {op} {b}.",
        "Please work out {a} {op} {b}.",
        "How much is {a} {op} {b}?",
        "Can you calculate {a} {op} {b}?",
        "{a} {op} {b} = ?",
        "Work out {a} {op} {b} for me.",
        "What is {a} {op} {b}, please?",
    ),
    "draw_shape": (
        "Draw {a_colour} {shape}.",
        "Please draw {a_colour} {shape}.",
        "Can you draw {a_colour} {shape}?",
        "Make a picture of {a_colour} {shape}.",
        "I would like a drawing of {a_colour} {shape}.",
        "Draw me a {shape} in {colour}.",
        "Make me {a_colour} {shape}, please.",
        "Can you make me {a_colour} {shape}?",
    ),
    "random_number": (
        "Pick a random number between {low} and {high}.",
        "Give me a random number from {low} to {high}.",
        "Choose a number between {low} and {high}.",
        "Can you pick a number from {low} to {high}?",
        "I would like a random number between {low} and {high}.",
        "Pick a number from {low} to {high} for me.",
        "Please choose a number between {low} and {high}.",
        "Can you give me a random number from {low} to {high}?",
    ),
}
# Held out from training: the same words in combinations that training never shows.
HELD_OUT = {
    "calculator": (
        "Please calculate {a} {op} {b}.",
        "Can you work out {a} {op} {b}?",
        "How much is {a} {op} {b}, please?",
    ),
    "draw_shape": (
        "Can you make a picture of {a_colour} {shape}?",
        "Please draw me a {shape} in {colour}.",
        "Draw {a_colour} {shape} for me.",
    ),
    "random_number": (
        "Please give me a random number between {low} and {high}.",
        "Can you choose a number from {low} to {high}?",
        "Pick a random number from {low} to {high}, please.",
    ),
}


@dataclass(frozen=True)
class Request:
    """One request for a tool, what the model must call, what the tool answers and what the model then says."""

    tool: str
    question: str
    arguments: dict
    result: str  # the tool message's content
    answer: str  # the reply after the result
    direct: Optional[str] = None  # the reply when the tool is not offered (default NO_TOOL)


def request(rng: random.Random, tool: str, held_out: bool = False) -> Request:
    """A random request for ``tool`` in a training (or held-out) phrasing."""
    template = rng.choice((HELD_OUT if held_out else PHRASINGS)[tool])
    if tool == "calculator":
        return _calculation(rng, template)
    if tool == "draw_shape":
        shape, colour = rng.choice(shapes.SHAPES), rng.choice(shapes.COLOUR_NAMES)
        question = template.format(shape=shape, colour=colour, a_colour=f"{shapes._article(colour)} {colour}")
        path = f"drawing_{rng.randint(1, 99)}.png"
        return Request(tool, _capitalised(question), {"shape": shape, "colour": colour}, path,
                       f"Here is {shapes._article(colour)} {colour} {shape}: {path}.")
    low = rng.randint(0, 20)
    high = rng.randint(low + 2, 100)
    number = rng.randint(low, high)
    return Request(tool, template.format(low=low, high=high), {"low": low, "high": high}, str(number),
                   f"Your number is {number}.")


def _calculation(rng: random.Random, template: str) -> Request:
    if rng.random() < 0.15:  # a single-digit addition: the model knows these without a calculator
        symbol, a, b = "+", rng.randint(0, 9), rng.randint(0, 9)
    else:
        symbol = rng.choice(tuple(OPERATORS))
        if symbol == "/":
            b, quotient = rng.randint(2, 12), rng.randint(2, 20)
            a = b * quotient
        else:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            if symbol == "-" and b > a:
                a, b = b, a
    words, answer_word = OPERATORS[symbol]
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[symbol]
    question = template.format(a=a, b=b, op=rng.choice(words))
    direct = shapes.addition_answer(a, b) if symbol == "+" and a < 10 and b < 10 else None
    return Request("calculator", _capitalised(question), {"expression": f"{a} {symbol} {b}"}, str(result),
                   f"{a} {answer_word} {b} is {result}.", direct)


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


# ----------------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------------


def call_message(name: str, arguments: dict, call_id: str, as_string: bool = False) -> dict:
    """The assistant's call as a chat message; ``as_string``: arguments as the JSON string OpenAI clients send."""
    return {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function", "function": {
        "name": name, "arguments": json.dumps(arguments) if as_string else arguments}}]}


def is_call_target(message: dict) -> bool:
    """Whether an assistant message is one the model is trained to write: not a call whose arguments are a
    JSON string (history in the spelling OpenAI clients send back, which the template writes quoted)."""
    return not any(isinstance(c["function"]["arguments"], str) for c in message.get("tool_calls") or ())


def offered_tools(names) -> list[dict]:
    return [TOOLS[name] for name in names]


FIRST_MIX = {"calculator": 3, "draw_shape": 2, "random_number": 2, "chat": 1}  # weights of a chat's first request


def random_dialog(rng: random.Random, first_mix: Optional[dict] = None
                  ) -> tuple[list[dict], list, Optional[list[dict]], str]:
    """(messages, scenes of their images, tools offered or None, kind of the first request) for one training chat;
    ``first_mix``: weights of the first request's kind (default ``FIRST_MIX``).

    The first user message carries the tools (the template's default), so it is text: the template would write
    an image part there as text (a limitation of the real template). Later turns may show a picture.
    """
    mix = first_mix or FIRST_MIX
    first = rng.choices(list(mix), list(mix.values()))[0]
    others = [n for n in TOOL_NAMES if n != first]
    if first != "chat" and rng.random() < 0.2:  # the tool it needs is not among those offered
        names = rng.sample(others, rng.randint(0, len(others)))
    else:
        names = rng.sample(others, rng.randint(0 if first != "chat" else 1, len(others)))
        if first != "chat":
            names.insert(rng.randint(0, len(names)), first)
    tools = offered_tools(names) or None
    messages: list[dict] = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": rng.choice(("You are a helpful assistant.", "Be brief."))})
    scenes = []
    kinds = [first] + [rng.choices(TOOL_NAMES + ("chat", "picture"), (3, 2, 2, 1, 2))[0]
                       for _ in range(rng.choice((0, 0, 1, 1, 2)))]
    task = first if first == "chat" or first in names else "no_tool"
    for turn, kind in enumerate(kinds):
        if kind == "chat":
            q, a = rng.choice(((rng.choice(shapes.GREETINGS), shapes.GREETING),
                               (rng.choice(shapes.IDENTITY_QUESTIONS), shapes.IDENTITY)))
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        elif kind == "picture":
            scene = shapes.random_scene(rng)
            scenes.append(scene)
            questions, answer = shapes.QUESTIONS[rng.choice(list(shapes.QUESTIONS))]
            messages += [shapes.image_message(rng.choice(questions), rng.random() < 0.85),
                         {"role": "assistant", "content": answer(scene)}]
        else:
            req = request(rng, kind)
            messages.append({"role": "user", "content": req.question})
            if kind in names:
                call_id = f"call_{turn}"
                messages += [call_message(kind, req.arguments, call_id, as_string=rng.random() < 0.3),
                             {"role": "tool", "tool_call_id": call_id, "content": req.result},
                             {"role": "assistant", "content": req.answer}]
            else:
                messages.append({"role": "assistant", "content": req.direct or NO_TOOL})
    return messages, scenes, tools, task


def corpus(rng: random.Random, chat_template: str, n: int = 1500) -> list[str]:
    """Text of rendered tool chats (the template's tool instructions, the tools' JSON, calls, results and
    answers), special tokens removed, for training the BPE tokenizer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    special = re.compile(r"<\|[a-z_0-9]+\|>")
    texts = []
    for _ in range(n):
        messages, _, tools, _ = random_dialog(rng)
        rendered, _ = render_jinja_template([messages], tools=tools, chat_template=chat_template, bos_token="")
        texts += [t for t in special.split(rendered[0]) if t]
    return texts
