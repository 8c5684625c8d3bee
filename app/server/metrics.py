"""``GET /metrics`` in the Prometheus text format: requests, tokens, finished sequences, time to first token,
and the engine's running and queued sequences (read from the engine when scraped).

Each server owns its registry (not prometheus-client's global one), so several servers in one process (tests)
count separately.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "mlx_llama4"
CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineGauges(Collector):
    """Sequences running and waiting, and the engine's limits, as the engine reports them now."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily]:
        stats = self.stats()
        for key, help_text in (("running", "sequences being generated now"),
                               ("queued", "requests waiting for a free row"),
                               ("max_batch", "most sequences generated together"),
                               ("max_queue", "most requests waiting before new ones are refused")):
            name = f"{PREFIX}_{key}_sequences" if key in ("running", "queued") else f"{PREFIX}_{key}"
            yield GaugeMetricFamily(name, help_text, value=float(stats.get(key, 0)))


class ServerMetrics:
    """The server's counters; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, engine_stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of finished requests",
                                     registry=self.registry)
        self.cached_tokens = Counter(f"{PREFIX}_cached_prompt_tokens",
                                     "prompt tokens taken from the prefix cache instead of computed",
                                     registry=self.registry)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "tokens generated",
                                         registry=self.registry)
        self.finished = Counter(f"{PREFIX}_finished_sequences", "sequences ended, by finish reason",
                                ["reason"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "seconds from a request's submission to its first token (queueing and prefill)",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.registry.register(_EngineGauges(engine_stats))

    def sequence_finished(self, reason: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.completion_tokens.inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware counting answered requests by route (known routes only, so the label set stays small)
    and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Iterable[str]):
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500  # what the client gets if the app fails before answering

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
