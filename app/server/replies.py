"""What every API's routes share: the model a request names, the whole reply (non-streaming) gathered while
watching for the client to leave, server-sent events (streaming), and the error for a failed generation.
Either way a client that goes away cancels its generation, which frees its row in the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from .engine_client import Generation
from .errors import APIError

log = logging.getLogger("mlx_llama4.server")


def served_model(request: Request, named: Optional[str]) -> str:
    """The model id to report; a 404 if the request names another model."""
    served = request.app.state.settings.model_id
    if named is not None and named != served:
        raise APIError(404, f"the model '{named}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")
    return served


def generation_failed(last: Any) -> APIError:
    """The 500 for a generation that ended in an error (``last`` is None when the engine raised)."""
    return APIError(500, f"generation failed: {getattr(last, 'error', None) or 'engine error (see the server log)'}")


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(generation: Generation, request: Request) -> list[Any]:
    """Every event of ``generation``; if the client leaves first, the generation is cancelled (its last event
    then says "cancelled")."""
    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(lambda task: task.cancelled() or generation.cancel())
    try:
        return [event async for event in generation]
    finally:
        watcher.cancel()


async def events_or_failure(generation: Generation, kind: str) -> AsyncIterator[Optional[Any]]:
    """The generation's events for a stream; an engine failure is logged and ends the iteration with None."""
    try:
        async for event in generation:
            yield event
    except Exception:
        log.exception("the engine failed during a streamed %s", kind)
        yield None


def sse(data: Any, event: Optional[str] = None) -> str:
    """One server-sent event: ``data: <JSON>`` (or the literal, for ``[DONE]``), after ``event: <name>`` when
    named (Anthropic's streams name every event), and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """Stream ``events``. When the client disconnects, Starlette cancels the iteration; the iterator's
    ``finally`` must then cancel its generation."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
