"""The FastAPI application: settings, middlewares, ``/health``, ``/metrics``, the OpenAI routes and
Anthropic's ``/v1/messages``, both routers on the same ``app.state.engine`` and ``app.state.settings``.

Requests pass, outermost first: the request counter (metrics), CORS (only with ``--cors-origin``), the API key
guard (only with ``--api-key``), the body limit, then the routes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from .anthropic_routes import router as anthropic_router
from .engine_client import EngineClient
from .errors import install_handlers
from .media import MediaPolicy
from .metrics import CONTENT_TYPE, RequestCounter
from .openai_routes import router as openai_router
from .security import ApiKeyGuard, BodyLimit

COUNTED_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/messages")


@dataclass(frozen=True)
class ServerSettings:
    """Everything the routes need to know besides the engine."""

    model_id: str = "demo"  # the id /v1/models reports and requests may name
    api_key: Optional[str] = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 50 * 2**20
    max_tokens: int = 4096  # reply length for requests that set none (the engine caps it at the context)
    media: MediaPolicy = MediaPolicy()
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine: EngineClient, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="mlx-llama4", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings = engine, settings
    install_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.closed:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(openai_router)
    app.include_router(anthropic_router)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # each middleware added wraps the ones before
    if settings.api_key:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"])
    app.add_middleware(RequestCounter, metrics=engine.metrics, routes=COUNTED_ROUTES)
    return app
