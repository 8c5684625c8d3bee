"""Errors with the right HTTP status, in the shape of the API the client called: OpenAI's
``{"error": {"message", "type", "param", "code"}}``, or under ``/v1/messages`` Anthropic's
``{"type": "error", "error": {"type", "message"}}``.

Every refusal in the server is an ``APIError``; request bodies are parsed here so that malformed JSON and
wrong fields become a 400 naming the field. The exception handlers installed by ``install_handlers`` make
sure that nothing else reaches a client: an unexpected exception is answered with a bare 500 (Starlette then
re-raises it, so uvicorn logs its traceback on the server) and the server keeps serving.
"""

from __future__ import annotations

from typing import Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

M = TypeVar("M", bound=BaseModel)

# OpenAI's error types by status (https://platform.openai.com/docs/guides/error-codes).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "server_error"}
# Anthropic's (https://docs.anthropic.com/en/api/errors); 503, the server shutting down, is its "overloaded".
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
ANTHROPIC_PATHS = "/v1/messages"  # the routes (this path and below it) that answer in Anthropic's shape


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PATHS or path.startswith(ANTHROPIC_PATHS + "/")


class APIError(Exception):
    """A refusal to send to the client: HTTP ``status``, a message that names the problem, and optionally the
    request field at fault (``param``), a machine-readable ``code`` and extra response headers."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str = "") -> JSONResponse:
        """The error for a request to ``path``, in the shape of the API that path belongs to."""
        body = self.anthropic_body() if is_anthropic(path) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def field_path(loc: tuple) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_body(body: bytes, schema: type[M]) -> M:
    """The request body validated against ``schema``; a 400 naming the first bad field otherwise."""
    try:
        return schema.model_validate_json(body or b"")
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            detail = first.get("ctx", {}).get("error", first["msg"])
            raise APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json") from None
        if not first["loc"]:
            raise APIError(400, "the request body must be a JSON object") from None
        path = field_path(first["loc"])
        message = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
        if first["type"] == "missing":
            message = "this field is required"
        raise APIError(400, f"{path}: {message}", param=path) from None


def install_handlers(app: FastAPI) -> None:
    """Answer every error in the shape of the API called, and never with a traceback."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 404:
            return APIError(404, f"no route {request.method} {path}", code="unknown_url").response(path)
        if exc.status_code == 405:
            return APIError(405, f"{path} does not accept {request.method}",
                            code="method_not_allowed", headers=exc.headers).response(path)
        return APIError(exc.status_code, str(exc.detail)).response(path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, "internal server error (the server log has the details)").response(request.url.path)
