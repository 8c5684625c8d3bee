"""Anthropic's Messages API, ``POST /v1/messages``, on the same engine as the OpenAI routes.

A request (``anthropic_schemas``) becomes chat messages for the checkpoint's template: ``system`` a system turn,
``tool_use`` blocks the assistant turn's ``tool_calls``, each ``tool_result`` a ``tool`` turn (before the rest of
its user turn), images fetched and decoded (``media``); tools are offered and forced as for OpenAI's
``tools`` / ``tool_choice`` (``tools.py``), and ``output_config.format`` keeps the reply on a JSON schema as
OpenAI's ``response_format`` does. The reply is a ``message`` with ``text`` and ``tool_use`` blocks,
``stop_reason`` ``end_turn``, ``max_tokens``, ``stop_sequence`` (with the ``stop_sequence`` that matched) or
``tool_use``, and ``usage`` (``input_tokens`` not taken from the prefix cache, ``cache_read_input_tokens``
taken from it, ``output_tokens``). Streamed, it is Anthropic's event sequence
(https://docs.anthropic.com/en/docs/build-with-claude/streaming): ``message_start``, ``ping``, per block
``content_block_start``, ``content_block_delta`` (``text_delta``, or ``input_json_delta`` with a tool's
arguments), ``content_block_stop``, then ``message_delta`` and ``message_stop``; a failure is an ``error``
event. Errors are in Anthropic's shape (``errors.py``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mlx_llama4.tool_calls import ToolCallParser

from .anthropic_schemas import Message, MessagesRequest
from .engine_client import EngineClient, Generation, Sampling
from .errors import ANTHROPIC_PATHS, parse_body
from .media import request_image
from .replies import collect, events_or_failure, generation_failed, served_model, sse, sse_response
from .tools import ToolPlan, check_tools_fit, parse_reply, plan_tools, template_call, with_json_output

router = APIRouter()


async def _engine_messages(body: MessagesRequest, request: Request) -> list[dict]:
    """Anthropic turns -> chat messages in the Hugging Face format."""
    policy = request.app.state.settings.media
    out = [{"role": "system", "content": body.system}] if body.system else []
    for i, message in enumerate(body.messages):
        if message.role == "assistant":
            calls = [template_call(b.name, b.input) for b in message.content if b.type == "tool_use"]
            out.append({"role": "assistant", "content": _text(message),
                        **({"tool_calls": calls} if calls else {})})
            continue
        results = [{"role": "tool", "content": b.result_text()} for b in message.content if b.type == "tool_result"]
        blocks = [(j, b) for j, b in enumerate(message.content) if b.type != "tool_result"]
        out += results
        if results and not blocks:
            continue
        if all(b.type == "text" for _, b in blocks):  # the chat template joins text parts without a separator
            out.append({"role": "user", "content": _text(message)})
            continue
        content = []
        for j, block in blocks:
            if block.type == "text":
                content.append({"type": "text", "text": block.text})
            else:
                where = f"messages[{i}].content[{j}].source"
                content.append({"type": "image", "image": await request_image(block.source.as_url(), policy, where)})
        out.append({"role": "user", "content": content})
    return out


def _text(message: Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def _usage(event: Any) -> dict:
    cached = event.cached_tokens or 0
    return {"input_tokens": (event.prompt_tokens or 0) - cached, "cache_read_input_tokens": cached,
            "output_tokens": event.completion_tokens or 0}


def _tool_use(call: Any) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
            "input": json.loads(call.arguments)}


class _Ending:
    """Why a reply ended, in Anthropic's terms; the stop sequence that matched is found in the reply's text
    (the engine says "stop" for an end token and for a stop string alike; an end token is its last token)."""

    def __init__(self, engine: EngineClient, stops: list[str]):
        self.engine, self.stops, self.tokens = engine, stops, []

    def add(self, event: Any) -> None:
        if event.token is not None:
            self.tokens.append(event.token)

    def reason(self, last: Any, called: bool) -> tuple[str, Optional[str]]:
        """(stop_reason, stop_sequence)."""
        if last.finish_reason == "length":
            return "max_tokens", None
        if called:
            return "tool_use", None
        if not self.stops or last.token is None or self.engine.is_end_token(last.token):
            return "end_turn", None
        text = self.engine.decode(self.tokens, skip_special_tokens=True)
        found = [(text.find(s), i) for i, s in enumerate(self.stops) if s in text]
        return "stop_sequence", self.stops[min(found)[1] if found else 0]


@router.post(ANTHROPIC_PATHS)
async def messages(request: Request):
    body = parse_body(await request.body(), MessagesRequest)
    served = served_model(request, body.model)
    engine: EngineClient = request.app.state.engine
    tools = plan_tools(body.openai_tools(), body.tool_choice.as_openai() if body.tool_choice else None)
    json_output = with_json_output(tools, body.json_schema, "output_config.format")
    chat = await _engine_messages(body, request)
    check_tools_fit(chat, tools, "tools")
    stops = list(body.stop_sequences or ())
    sampling = Sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                        top_k=body.top_k, stop=tuple(stops), json_output=json_output)
    generation = await engine.submit(chat, sampling, tools=tools.offered)
    head = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": served}
    ending = _Ending(engine, stops)
    if body.stream:
        return sse_response(_stream(generation, head, tools, ending))

    events = await collect(generation, request)
    last = events[-1] if events else None
    if last is None or last.finish_reason == "error":
        raise generation_failed(last)
    for event in events:
        ending.add(event)
    text, calls = "".join(e.text for e in events), []
    if tools.offered is not None:
        reply = parse_reply(text, tools)
        text, calls = reply.content, reply.tool_calls
    stop_reason, stop_sequence = ending.reason(last, bool(calls))
    content = ([{"type": "text", "text": text}] if text else []) + [_tool_use(call) for call in calls]
    return JSONResponse({**head, "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                         "usage": _usage(last)})


class _Blocks:
    """Turns the reply's deltas (``ToolCallParser``'s, or plain text) into content-block events: a text block
    opens at the first text after a tool call or at the start, a tool_use block opens with its name and closes
    after its arguments."""

    def __init__(self):
        self.count, self.text_open = 0, False

    def events(self, delta: dict) -> list[str]:
        out = []
        if delta.get("content"):
            if not self.text_open:
                out.append(self._start({"type": "text", "text": ""}))
                self.text_open = True
            out.append(_event("content_block_delta", index=self.count - 1,
                              delta={"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls", ()):
            if "id" in call:  # a new call: its name; the arguments follow in the next delta
                out += self.close_text()
                out.append(self._start({"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"),
                                        "name": call["function"]["name"], "input": {}}))
            else:
                out.append(_event("content_block_delta", index=self.count - 1,
                                  delta={"type": "input_json_delta", "partial_json": call["function"]["arguments"]}))
                out.append(_event("content_block_stop", index=self.count - 1))
        return out

    def close_text(self) -> list[str]:
        if not self.text_open:
            return []
        self.text_open = False
        return [_event("content_block_stop", index=self.count - 1)]

    def _start(self, block: dict) -> str:
        self.count += 1
        return _event("content_block_start", index=self.count - 1, content_block=block)


def _event(kind: str, **fields: Any) -> str:
    return sse({"type": kind, **fields}, event=kind)


async def _stream(generation: Generation, head: dict, tools: ToolPlan, ending: _Ending) -> AsyncIterator[str]:
    parser = ToolCallParser(tools.offered) if tools.offered is not None else None
    blocks, started, finished = _Blocks(), False, False
    try:
        async for event in events_or_failure(generation, "message"):
            if event is None or event.finish_reason == "error":
                finished = True
                yield _event("error", error={"type": "api_error", "message": generation_failed(event).message})
                return
            if not started:  # the first event carries the prompt's token counts
                started = True
                usage = {**_usage(event), "output_tokens": 0}
                yield _event("message_start", message={**head, "content": [], "stop_reason": None,
                                                       "stop_sequence": None, "usage": usage})
                yield _event("ping")
            ending.add(event)
            if parser is None:
                deltas = [{"content": event.text}]
            else:
                deltas = parser.feed(event.text) + (parser.finish() if event.finish_reason else [])
            for delta in deltas:
                for out in blocks.events(delta):
                    yield out
            if event.finish_reason:
                finished = True
                for out in blocks.close_text():
                    yield out
                stop_reason, stop_sequence = ending.reason(event, bool(parser and parser.tool_calls))
                yield _event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                             usage={"output_tokens": event.completion_tokens or 0})
                yield _event("message_stop")
    finally:
        if not finished:  # the client left mid-stream: free the row
            generation.cancel()
