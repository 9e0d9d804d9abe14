"""The operational routes of the public port, outside the pipeline and never behind the API key:
``/healthz`` (the process answers), ``/readyz`` (the pool's adapters held, the engine healthy, not
shutting down), ``/drainz`` (the engine's preStop hook: drain.py's), ``/metrics`` (the proxy's series
and the vllm:* ones routers read) and ``/metrics/engine`` (the engine's own /metrics, which listens on
the pod's loopback only)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from .drain import Drain
from .engine import EngineClient
from .metrics import ProxyMetrics
from .state import AdapterRegistry

ENGINE_METRICS_ROUTE = "/metrics/engine"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/drainz", "/metrics", ENGINE_METRICS_ROUTE})


class OpsRoutes:
    def __init__(self, engine: EngineClient, engine_url: str, registry: AdapterRegistry, metrics: ProxyMetrics,
                 drain: Drain, shutting_down: Callable[[], bool]) -> None:
        self.engine = engine
        self.engine_url = engine_url
        self.registry = registry
        self.metrics = metrics
        self.drain = drain
        self._shutting_down = shutting_down
        self._engine_metrics: tuple[float, str | None] = (0.0, None)  # (monotonic time, text): handle_engine_metrics
        self._engine_metrics_lock = asyncio.Lock()

    def attach(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/readyz", self.handle_readyz)
        app.router.add_get("/drainz", self.drain.handle_drainz)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get(ENGINE_METRICS_ROUTE, self.handle_engine_metrics)

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle_readyz(self, request: web.Request) -> web.Response:
        reasons = []
        if self._shutting_down():
            reasons.append("shutting down")
        if self.registry.generation is None:
            reasons.append("no state received from the operator yet")
        elif self.registry.first_converged_at is None:
            # a new (rolling) pod: Ready once it holds the pool's adapters, not while it would 404 them;
            # later generations (an adapter added, an engine restart) keep it Ready, serving what it holds
            c = self.registry.counts()
            reasons.append(f"loading the pool's adapters: {c['loaded']} loaded, {c['failed']} refused of "
                           f"{len(self.registry.desired)}")
        if not await self.engine.healthy():
            reasons.append(f"engine at {self.engine_url} is not healthy")
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready", "generation": self.registry.generation})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        await self.metrics.engine_gauges.refresh(self.engine.metrics_text)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    async def handle_engine_metrics(self, request: web.Request) -> web.Response:
        """vLLM's own /metrics text (all its vllm:* series), for Prometheus: the engine is reachable only
        from inside the pod. One engine read per second at most, whoever scrapes (4 MiB, 1 s bounds:
        EngineClient.metrics_text); 503 while the engine does not answer."""
        now = time.monotonic()
        async with self._engine_metrics_lock:
            at, text = self._engine_metrics
            if text is None or now - at >= 1.0:
                text = await self.engine.metrics_text()
                self._engine_metrics = (time.monotonic(), text)
        if text is None:
            return web.Response(status=503, text="the engine's /metrics did not answer\n")
        return web.Response(text=text, content_type="text/plain", charset="utf-8")
