"""The simulator's HTTP server: vLLM's OpenAI-compatible surface on CPU (aiohttp).

Public API for in-process use::

    from vlmpool.sim.server import SimConfig, create_app, running_sim

    async with running_sim(SimConfig(model="Qwen/Qwen2.5-VL-3B-Instruct", enable_lora=True,
                                     runtime_lora=True)) as base_url:
        ...  # http://127.0.0.1:<ephemeral port>

Routes (vLLM): ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``, ``GET /version``, and — only when runtime LoRA updating is
allowed, as vLLM mounts them — ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``.
Routes (simulator control, not vLLM): ``GET|POST /sim/faults``, ``POST /sim/forget``,
``GET /sim/stats``, ``POST /sim/stats/reset``.

See :mod:`vlmpool.sim.contract` for the vLLM sources each answer follows.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from vlmpool.sim import adapters as adapters_mod
from vlmpool.sim import contract
from vlmpool.sim.config import Faults, SimConfig
from vlmpool.sim.engine import Engine
from vlmpool.sim.parsing import RequestError, error_response
from vlmpool.sim.routes_lora import LoraRoutes
from vlmpool.sim.routes_openai import OpenAIRoutes
from vlmpool.sim.routes_sim import SimControlRoutes

__all__ = ["ENGINE_KEY", "Faults", "SimConfig", "SimServer", "create_app", "running_sim"]

ENGINE_KEY: web.AppKey[Engine] = web.AppKey("engine", Engine)


class SimServer(OpenAIRoutes, LoraRoutes, SimControlRoutes):
    """The application: the route groups over one shared :class:`~vlmpool.sim.state.SimState`."""

    # -- plumbing

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024,
                              middlewares=[self._auth_middleware, self._errors_middleware])
        app[ENGINE_KEY] = self.engine
        r = app.router
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_post("/v1/completions", self.completions)
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/version", self.version)
        if self.runtime_lora:
            r.add_post("/v1/load_lora_adapter", self.load_lora_adapter)
            r.add_post("/v1/unload_lora_adapter", self.unload_lora_adapter)
        r.add_get("/sim/faults", self.get_faults)
        r.add_post("/sim/faults", self.set_faults)
        r.add_post("/sim/forget", self.forget)
        r.add_get("/sim/stats", self.get_stats)
        r.add_post("/sim/stats/reset", self.reset_stats)
        app.on_startup.append(self._load_static_loras)
        return app

    async def _load_static_loras(self, app: web.Application) -> None:
        for name, path in self.config.lora_modules:
            if not self.config.enable_lora:
                raise RuntimeError("--lora-modules needs --enable-lora")
            try:
                info = await self.engine.read_adapter(name, path)
            except adapters_mod.AdapterError as e:
                raise RuntimeError(f"static LoRA {name}={path} failed to load: {e.reason}") from None
            self.engine.register(name, path, info)

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # vLLM's --api-key: every /v1 route needs "Authorization: Bearer <key>".
        key = self.config.api_key
        if key and request.path.startswith("/v1"):
            if request.headers.get("Authorization", "") != f"Bearer {key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    @web.middleware
    async def _errors_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestError as e:
            return error_response(e.pair)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)

    # -- info routes

    async def health(self, request: web.Request) -> web.Response:
        if self.faults.unhealthy or self.engine.dead:
            return web.Response(status=503)
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        # vLLM answers {"version": "<release>"}; the simulator answers the release whose contract it follows
        return web.json_response({"version": contract.VLLM_RELEASE})

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.engine.prometheus(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: SimConfig) -> web.Application:
    """Build the simulator's aiohttp application (engine state lives in ``app[ENGINE_KEY]``)."""
    return SimServer(config).app()


@contextlib.asynccontextmanager
async def running_sim(config: SimConfig) -> AsyncIterator[str]:
    """Run the simulator on an ephemeral loopback port; yields its base URL (no trailing slash).

    ``config.host`` is honoured; ``config.port`` is ignored (port 0 is bound).
    """
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host or "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]  # the bound (ephemeral) port
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
