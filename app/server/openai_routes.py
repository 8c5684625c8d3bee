"""The OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

A request is validated (``openai_schemas``), its images fetched and decoded (``media``), queued on the engine
(``engine_client``), and its events turned into OpenAI's response objects, or streamed as
``chat.completion.chunk`` / ``text_completion`` server-sent events ending with ``data: [DONE]``. Field
meanings follow OpenAI's API reference (https://platform.openai.com/docs/api-reference/chat).

``max_tokens`` beyond what is left of the context is capped there by the engine, and the reply then ends with
``finish_reason: "length"``; a prompt longer than the context is refused (400), never truncated.

Tools (``tools.py``): the reply is split into ``content`` and ``tool_calls`` (streamed as ``tool_calls`` deltas:
a call's ``index``, ``id``, ``type`` and name, then its arguments), and ends with ``finish_reason:
"tool_calls"`` when it called one. ``response_format`` JSON keeps the reply on its schema while sampling; a reply
cut by ``max_tokens`` ends with ``finish_reason: "length"`` and may be incomplete JSON.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mlx_llama4.tool_calls import ToolCallParser

from .engine_client import EngineClient, Generation, JSONOutput, Sampling
from .errors import APIError, parse_body
from .media import request_image
from .openai_schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from .replies import collect, events_or_failure, generation_failed, served_model, sse, sse_response
from .tools import ToolPlan, check_tools_fit, parse_reply, plan_tools, template_call, with_json_output

router = APIRouter()


# ---- shared by both completion routes --------------------------------------------------------------------------


def _sampling(request: Request, body: SamplingFields, limit: Optional[int], logprobs: Optional[int],
              json_output: Optional[JSONOutput] = None) -> Sampling:
    return Sampling(
        max_tokens=limit or request.app.state.settings.max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=None if body.top_k is None else max(body.top_k, 0), min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, stop=tuple(body.stop or ()), seed=body.seed,
        logprobs=logprobs, json_output=json_output)


def _usage(last: Any) -> dict:
    prompt, completion = last.prompt_tokens or 0, last.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens or 0}}


def _scored(event: Any, engine: EngineClient) -> bool:
    """Whether the event's token belongs in the log probabilities (an end token does not, like its text)."""
    if event.token is None or event.logprob is None:
        return False
    return not (event.finish_reason == "stop" and engine.is_end_token(event.token))


def _envelope(head: dict, kind: str) -> dict:
    """id, object, created, model: the fields every response and chunk starts with."""
    return {"id": head["id"], "object": kind, **head}


def _chunk(head: dict, kind: str, choices: list, include_usage: bool, usage: Optional[dict] = None) -> str:
    """One streamed chunk; with ``include_usage`` every chunk has ``usage`` (null until the last one)."""
    return sse({**_envelope(head, kind), "choices": choices, **({"usage": usage} if include_usage else {})})


async def _stream(generation: Generation, head: dict, kind: str, include_usage: bool, opening: Optional[dict],
                  choices: Callable[[Any], list[dict]], finish: Callable[[str], dict]) -> AsyncIterator[str]:
    """The server-sent events of one generation: the ``opening`` choice, a chunk for each choice an event has
    to send (``choices(event)``), the ``finish`` choice, the usage chunk if asked for, then ``data: [DONE]``.
    An engine failure ends the stream with an error event instead; a client leaving cancels the generation."""
    finished = False
    try:
        if opening is not None:
            yield _chunk(head, kind, [opening], include_usage)
        async for event in events_or_failure(generation, kind):
            if event is None or event.finish_reason == "error":
                finished = True
                error = {"message": generation_failed(event).message, "type": "server_error", "param": None,
                         "code": None}
                yield sse({"error": error})
                return
            for sent in choices(event):
                yield _chunk(head, kind, [sent], include_usage)
            if event.finish_reason:
                finished = True
                yield _chunk(head, kind, [finish(event.finish_reason)], include_usage)
                if include_usage:
                    yield _chunk(head, kind, [], include_usage, _usage(event))
                yield sse("[DONE]")
    finally:
        if not finished:  # the client left mid-stream: free the row
            generation.cancel()


# ---- /v1/models ------------------------------------------------------------------------------------------------


def _model_card(request: Request) -> dict:
    settings = request.app.state.settings
    return {"id": settings.model_id, "object": "model", "created": settings.created, "owned_by": "mlx-llama4"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    if model_id != request.app.state.settings.model_id:
        raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
    return _model_card(request)


# ---- /v1/chat/completions --------------------------------------------------------------------------------------


async def _engine_messages(messages: list[ChatMessage], request: Request) -> list[dict]:
    """OpenAI messages -> the Hugging Face format, each ``image_url`` fetched and decoded into a PIL image; a
    call's arguments go to the template as an object, a tool result as its text."""
    policy = request.app.state.settings.media
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = message.content or []
        if message.tool_calls:
            calls = [template_call(call.function.name, call.function.arguments) for call in message.tool_calls]
            out.append({"role": role, "content": message.text(), "tool_calls": calls})
            continue
        if all(part.type == "text" for part in parts):  # the chat template joins text parts without a separator
            out.append({"role": role, "content": message.text()})
            continue
        content = []
        for j, part in enumerate(parts):
            if part.type == "text":
                content.append({"type": "text", "text": part.text})
                continue
            image = await request_image(part.image_url.url, policy, f"messages[{i}].content[{j}].image_url")
            content.append({"type": "image", "image": image})
        out.append({"role": role, "content": content})
    return out


def _chat_logprob(event: Any, top: int, engine: EngineClient) -> dict:
    def entry(token: int, logprob: float) -> dict:
        return {"token": engine.token_text(token), "logprob": logprob, "bytes": engine.token_bytes(token)}

    return {**entry(event.token, event.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in (event.top_logprobs or [])[:top]]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = parse_body(await request.body(), ChatCompletionRequest)
    model = served_model(request, body.model)
    engine: EngineClient = request.app.state.engine
    top = (body.top_logprobs or 0) if body.logprobs else None
    specs = [tool.model_dump(exclude_none=True, exclude={"function": {"strict"}}) for tool in body.tools or []]
    tools = plan_tools(specs, body.tool_choice)
    json_output = with_json_output(tools, body.json_schema, "response_format")
    messages = await _engine_messages(body.messages, request)
    check_tools_fit(messages, tools, "tools")
    generation = await engine.submit(messages, _sampling(request, body, body.reply_limit, top, json_output),
                                     tools=tools.offered)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if body.stream:
        return sse_response(_chat_stream(generation, head, top, body.include_usage, engine, tools))

    events = await collect(generation, request)
    last = events[-1] if events else None
    if last is None or last.finish_reason == "error":
        raise generation_failed(last)
    scored = [_chat_logprob(e, top, engine) for e in events if _scored(e, engine)] if top is not None else None
    text, finish = "".join(e.text for e in events), last.finish_reason
    message = {"role": "assistant", "content": text}
    if tools.offered is not None:
        reply = parse_reply(text, tools)
        finish = reply.finish_reason(finish)
        message["content"] = reply.content
        if reply.tool_calls:
            message = {"role": "assistant", "content": reply.content or None,
                       "tool_calls": [call.to_openai() for call in reply.tool_calls]}
    return JSONResponse({
        **_envelope(head, "chat.completion"),
        "choices": [{"index": 0, "message": message,
                     "logprobs": None if scored is None else {"content": scored, "refusal": None},
                     "finish_reason": finish}],
        "usage": _usage(last)})


def _chat_stream(generation: Generation, head: dict, top: Optional[int], include_usage: bool,
                 engine: EngineClient, tools: ToolPlan) -> AsyncIterator[str]:
    """Chat chunks; with tools in play the text goes through a ``ToolCallParser``, whose deltas (content, and
    each call once its block has closed) become the chunks."""
    parser = ToolCallParser(tools.offered) if tools.offered is not None else None

    def choices(event: Any) -> list[dict]:
        scored = [_chat_logprob(event, top, engine)] if top is not None and _scored(event, engine) else None
        if parser is None:
            deltas = [{"content": event.text}] if event.text or scored else []
        else:
            deltas = parser.feed(event.text) + (parser.finish() if event.finish_reason else [])
            deltas = deltas or ([{"content": ""}] if scored else [])
        out = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None} for delta in deltas]
        if scored:
            out[0]["logprobs"] = {"content": scored}
        return out

    def finish(reason: str) -> dict:
        return {"index": 0, "delta": {}, "logprobs": None,
                "finish_reason": parser.finish_reason(reason) if parser else reason}

    opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return _stream(generation, head, "chat.completion.chunk", include_usage, opening, choices, finish)


# ---- /v1/completions -------------------------------------------------------------------------------------------


class _TextOffsets:
    """Legacy ``logprobs`` of ``/v1/completions``: tokens, their log probabilities, the top alternatives as
    ``{token text: logprob}``, and each token's character offset in the returned text."""

    def __init__(self, engine: EngineClient, start: int):
        self.engine, self.offset = engine, start

    def entry(self, event: Any) -> dict:
        text = self.engine.token_text(event.token)
        out = {"tokens": [text], "token_logprobs": [event.logprob],
               "top_logprobs": [{self.engine.token_text(t): lp for t, lp in (event.top_logprobs or [])}],
               "text_offset": [self.offset]}
        self.offset += len(event.text)
        return out

    @staticmethod
    def merge(entries: list[dict]) -> dict:
        return {key: [v for e in entries for v in e[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                      "text_offset")}


@router.post("/v1/completions")
async def completions(request: Request):
    body = parse_body(await request.body(), CompletionRequest)
    model = served_model(request, body.model)
    engine: EngineClient = request.app.state.engine
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported (prompt log probabilities are not "
                            "computed)", param="echo")
    if isinstance(body.prompt, str):
        ids = engine.encode_raw(body.prompt)
    else:
        ids = body.prompt
        bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is outside the vocabulary (0..{engine.vocab_size - 1})",
                           param="prompt")
    echo = (body.prompt if isinstance(body.prompt, str) else engine.decode(ids)) if body.echo else ""
    generation = await engine.submit(ids, _sampling(request, body, body.reply_limit, body.logprobs))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if body.stream:
        return sse_response(_completion_stream(generation, head, echo, body.logprobs, body.include_usage, engine))

    events = await collect(generation, request)
    last = events[-1] if events else None
    if last is None or last.finish_reason == "error":
        raise generation_failed(last)
    logprobs = None
    if body.logprobs is not None:
        offsets = _TextOffsets(engine, len(echo))
        logprobs = offsets.merge([offsets.entry(e) for e in events if _scored(e, engine)])
    return JSONResponse({
        **_envelope(head, "text_completion"),
        "choices": [{"index": 0, "text": echo + "".join(e.text for e in events), "logprobs": logprobs,
                     "finish_reason": last.finish_reason}],
        "usage": _usage(last)})


def _completion_stream(generation: Generation, head: dict, echo: str, logprobs: Optional[int],
                       include_usage: bool, engine: EngineClient) -> AsyncIterator[str]:
    offsets = _TextOffsets(engine, len(echo))

    def choices(event: Any) -> list[dict]:
        scored = offsets.entry(event) if logprobs is not None and _scored(event, engine) else None
        if not (event.text or scored):
            return []
        return [{"index": 0, "text": event.text, "logprobs": scored, "finish_reason": None}]

    opening = {"index": 0, "text": echo, "logprobs": None, "finish_reason": None} if echo else None
    return _stream(generation, head, "text_completion", include_usage, opening, choices,
                   lambda reason: {"index": 0, "text": "", "logprobs": None, "finish_reason": reason})
