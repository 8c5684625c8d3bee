"""What every API's routes share once a request is queued: the whole reply (non-streaming) gathered while
watching for the client to leave, and server-sent events (streaming). Either way a client that goes away
cancels its generation, which frees its row in the engine.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from .engine_client import Generation


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


def sse(data: Any) -> str:
    """One server-sent event: ``data: <JSON>`` (or the literal, for ``[DONE]``) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """Stream ``events``. When the client disconnects, Starlette cancels the iteration; the iterator's
    ``finally`` must then cancel its generation."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
