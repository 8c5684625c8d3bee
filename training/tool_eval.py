"""Held-out measurement of the demo model's tool use, the same cases through any front door.

``measure(ask)`` takes ``ask(messages, tools) -> (content, [(name, arguments)])``: one assistant reply to OpenAI
chat messages with the tools offered (None: no tools), its content and its tool calls with ``arguments`` the JSON
string OpenAI's ``function.arguments`` holds. ``tests/test_demo_tools.py`` answers it through ``generate`` and
``parse_tool_calls``, ``training/eval_tools_server.py`` through a running server and the ``openai`` client.

Scores, each a fraction of its cases (the phrasings are ``tool_chats.HELD_OUT``, the numbers fresh):

- ``select``: a request whose tool is offered (among 1 to 3 tools in a random order) gets exactly one call, to
  that tool, whatever its arguments;
- ``call``: the same, with exactly the expected arguments (compared as JSON values); ``call_<tool>``: ``call``
  for one tool's requests;
- ``answer``: given that call (arguments as the JSON string clients send back) and the tool's result, the next
  reply is exactly the expected answer, without a call;
- ``no_call``: with all tools offered, a greeting or a question about the model gets its usual reply, no call;
- ``not_offered``: a request whose tool is not offered gets ``NO_TOOL`` (or, for a single-digit addition, the
  answer), no call.
"""

from __future__ import annotations

import json
import random
from typing import Callable, Optional

import shapes
import tool_chats

Reply = tuple[str, list[tuple[str, str]]]
Ask = Callable[[list[dict], Optional[list[dict]]], Reply]

SEED = 31_337  # training draws chats from random.Random(seed * 1_000_003 + step) streams, never from this one


def _offered(rng: random.Random, needed: str) -> list[str]:
    names = rng.sample([t for t in tool_chats.TOOL_NAMES if t != needed], rng.randint(0, 2))
    names.insert(rng.randint(0, len(names)), needed)
    return names


def _openai_call(name: str, arguments: dict, call_id: str = "call_0") -> dict:
    """The assistant message an OpenAI client sends back after a call: arguments as a JSON string."""
    return {**tool_chats.call_message(name, arguments, call_id, as_string=True), "content": None}


def _is_call(reply: Reply, name: str, arguments: dict) -> bool:
    _, calls = reply
    if len(calls) != 1 or calls[0][0] != name:
        return False
    try:
        return json.loads(calls[0][1]) == arguments
    except ValueError:
        return False


def measure(ask: Ask, n: int = 20, seed: int = SEED) -> tuple[dict, list]:
    """({score: fraction}, misses as (score, what was asked, expected, reply)); ``n`` requests per tool for
    ``call`` and ``answer``, ``n`` cases for ``no_call`` and for ``not_offered``."""
    rng = random.Random(seed)
    right = {"select": 0, "call": 0, "answer": 0, "no_call": 0, "not_offered": 0, **{f"call_{t}": 0 for t in tool_chats.TOOL_NAMES}}
    total = dict.fromkeys(right, 0)
    misses = []

    def score(kind: str, ok: bool, asked, expected, reply: Reply) -> None:
        total[kind] += 1
        right[kind] += ok
        if not ok:
            misses.append((kind, asked, expected, reply))

    for tool in tool_chats.TOOL_NAMES:
        for _ in range(n):
            req = tool_chats.request(rng, tool, held_out=True)
            tools = tool_chats.offered_tools(_offered(rng, tool))
            question = [{"role": "user", "content": req.question}]
            reply = ask(question, tools)
            called = _is_call(reply, tool, req.arguments)
            score("select", [name for name, _ in reply[1]] == [tool], req.question, tool, reply)
            score("call", called, req.question, (tool, req.arguments), reply)
            total[f"call_{tool}"] += 1
            right[f"call_{tool}"] += called
            messages = question + [_openai_call(tool, req.arguments),
                                   {"role": "tool", "tool_call_id": "call_0", "content": req.result}]
            reply = ask(messages, tools)
            score("answer", reply == (req.answer, []), (req.question, req.result), req.answer, reply)
    everything = tool_chats.offered_tools(tool_chats.TOOL_NAMES)
    for i in range(n):
        question, expected = ((rng.choice(shapes.GREETINGS), shapes.GREETING) if i % 2 == 0
                              else (rng.choice(shapes.IDENTITY_QUESTIONS), shapes.IDENTITY))
        reply = ask([{"role": "user", "content": question}], everything)
        score("no_call", reply == (expected, []), question, expected, reply)
    for i in range(n):
        tool = tool_chats.TOOL_NAMES[i % len(tool_chats.TOOL_NAMES)]
        req = tool_chats.request(rng, tool, held_out=True)
        names = rng.sample([t for t in tool_chats.TOOL_NAMES if t != tool], rng.randint(0, 2))
        expected = req.direct or tool_chats.NO_TOOL
        reply = ask([{"role": "user", "content": req.question}], tool_chats.offered_tools(names) or None)
        score("not_offered", reply == (expected, []), (req.question, names), expected, reply)
    return {k: right[k] / total[k] for k in right}, misses


def generate_ask(model, processor, max_tokens: int = 48) -> Ask:
    """``ask`` through mlx-llama4's own pipeline: the chat template with ``tools``, greedy ``generate``,
    ``parse_tool_calls``."""
    from mlx_llama4 import generate
    from mlx_llama4.tool_calls import parse_tool_calls

    def ask(messages: list[dict], tools: Optional[list[dict]]) -> Reply:
        prompt = processor.apply_chat_template(messages, tools=tools)
        text = generate(model, processor, prompt, max_tokens=max_tokens, temperature=0.0)
        content, calls = parse_tool_calls(text, tools)
        return content.strip(), [(c.name, c.arguments) for c in calls]

    return ask
