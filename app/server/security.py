"""Who may use the server and how much they may send: the bind-address rule, the API key, the body limit.

- ``bind_refusal``: the server listens on loopback unless told otherwise, and refuses to listen on any other
  address without an API key unless the operator says, with a flag, that an open server is intended.
- ``ApiKeyGuard``: with a key set, every route but ``GET /health`` needs it, as OpenAI clients send it
  (``Authorization: Bearer KEY``) or as Anthropic clients do (``x-api-key: KEY``), compared in constant time; a
  request without it gets 401 before any routing, so an unauthenticated client learns nothing about the routes.
- ``BodyLimit``: a request body above the limit gets 413, read no further than the limit.

Both middlewares answer in the error shape of the API the path belongs to (``errors.APIError.response``).
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

OPEN_PATHS = frozenset({"/health"})


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (``localhost`` counts; ``0.0.0.0`` does not)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def bind_refusal(host: str, api_key: Optional[str], open_server: bool) -> Optional[str]:
    """Why the server must not listen on ``host`` as configured, or None when it may."""
    if is_loopback(host) or api_key or open_server:
        return None
    return (f"refusing to listen on {host}, which other machines can reach, without an API key: set --api-key "
            "(or MLX_LLAMA4_API_KEY), or pass --insecure-no-api-key to run an open server on purpose")


class ApiKeyGuard:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key, self.bearer = app, api_key.encode(), f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = [(headers[name], expected) for name, expected in ((b"authorization", self.bearer),
                                                                  (b"x-api-key", self.key)) if name in headers]
        if not given:
            error = APIError(401, "missing API key: send it as the header 'Authorization: Bearer KEY' (or "
                                  "'x-api-key: KEY')", code="invalid_api_key")
        elif not any(hmac.compare_digest(value, expected) for value, expected in given):
            error = APIError(401, "invalid API key", code="invalid_api_key")
        else:
            await self.app(scope, receive, send)
            return
        error.headers = {"WWW-Authenticate": "Bearer"}
        await error.response(scope["path"])(scope, receive, send)


class BodyLimit:
    """Reads the whole body (at most ``max_bytes``) before the app runs, then hands it on unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, scope: Scope) -> ASGIApp:
        return APIError(413, f"the request body is larger than the limit of {self.max_bytes} bytes "
                             "(the server's --max-body-mb)", code="request_too_large").response(scope["path"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope)(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(scope)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client disconnecting
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)
