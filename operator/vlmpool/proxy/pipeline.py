"""The request pipeline every generation route runs through, in explicit stages:

1. body admission (``within_body_budget``, ``read_body``): the body is taken from the in-flight body
   budget as it arrives, within the body limits (size, deadline, minimum rate); 413, 408, 429;
2. the model (``BaseName``, ``dispatch``): the engine's base name or a desired adapter, else 404;
3. engine admission (``dispatch``): a slot of the resizable limiter, within the queue's bounds; 429;
4. routing (``dispatch``): a desired adapter's served name to the version its alias points at now,
   counted in flight until the answer ends (the registry's), so a swap never unloads it under a request;
5. forwarding (forwarding.py's ``Forwarder``): to the engine and back, self-heal included.

Routes attach to the pipeline (routes_openai.py, crop_describe.py) and call its stages; none of them
reaches into the proxy that wires them (server.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from .config import ProxyConfig
from .context import CTX, RequestContext
from .engine import EngineClient, EngineHTTPError, EngineUnavailable
from .errors import (
    adapter_unavailable,
    error_response,
    map_engine_error,
    model_not_found,
    too_large,
    unavailable_response,
)
from .forwarding import Forwarder
from .guard import BodyHold, BodyLimits, InputRefused, parse_json, read_request_body
from .limiter import ByteBudget, LimiterRejected, ResizableLimiter
from .logs import get_logger
from .metrics import ProxyMetrics
from .state import AdapterRegistry, Unavailable

log = get_logger()


class BaseName:
    """The engine's served base name: configured, else read once from the engine's /v1/models (the
    model card without a parent)."""

    def __init__(self, engine: EngineClient, configured: str | None) -> None:
        self.engine = engine
        self.known: str | None = configured
        self._lock = asyncio.Lock()

    async def get(self) -> str | None:
        if self.known is not None:
            return self.known
        async with self._lock:
            if self.known is None:
                models = await self.engine.list_models()
                for m in models:
                    if isinstance(m, dict) and not m.get("parent") and isinstance(m.get("id"), str):
                        self.known = m["id"]
                        log.info("base model discovered from the engine", extra={"base_model": m["id"]})
                        break
        return self.known


class Pipeline:
    """The stages of a generation request (the module's docstring), shared by every generation route."""

    def __init__(self, config: ProxyConfig, metrics: ProxyMetrics, base: BaseName, limiter: ResizableLimiter,
                 registry: AdapterRegistry, forwarder: Forwarder) -> None:
        self.config = config
        self.metrics = metrics
        self.base = base
        self.limiter = limiter
        self.registry = registry
        self.forwarder = forwarder
        # memory: bodies held stay within --max-inflight-body-bytes: the oldest body still arriving may
        # take one request's maximum beyond what the others may (ByteBudget's deadlock rule), so the
        # others share the budget less that reserve
        budget = config.max_inflight_body_bytes or 2 * config.max_body_bytes
        self.body_budget = ByteBudget(max(1, budget - config.max_body_bytes), config.queue_limit)
        metrics.body_bytes.set_function(lambda: self.body_budget.used)
        self.bodies_arriving: dict[BodyHold, None] = {}  # oldest first (ByteBudget's deadlock rule)
        self.body_limits = BodyLimits(config.max_body_bytes, config.body_timeout, config.min_body_rate,
                                      config.body_rate_window, config.queue_timeout)

    # -- 1. body admission --------------------------------------------------------------------
    async def within_body_budget(self, request: web.Request,
                                 run: Callable[[], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """``run()`` with the request's body taken from the in-flight body budget as it arrives (through
        :meth:`read_body`) and given back when the request ends; 413 for an announced body too large,
        429 when the budget stayed full."""
        announced = request.content_length
        if announced is not None and announced > self.config.max_body_bytes:
            return too_large(self.config.max_body_bytes)
        hold = request[CTX].body_hold = BodyHold(self.body_budget, self.bodies_arriving, self.config.max_body_bytes)
        try:
            return await run()
        except LimiterRejected as e:
            resp = self.rejected(e)
            resp.force_close()  # the rest of the body is never read
            return resp
        finally:
            hold.release()

    async def read_body(self, request: web.Request) -> bytearray | web.Response:
        """The request's body within the body limits (size, deadline, minimum rate) and the budget."""
        return await read_request_body(request, self.body_limits, hold=request[CTX].body_hold,
                                       on_cut=lambda why: self.metrics.client_cuts.labels(why).inc())

    async def read_json_object(self, request: web.Request) -> tuple[bytearray, dict] | web.Response:
        """The request's body (:meth:`read_body`) as received and parsed: a JSON object, else 400."""
        raw = await self.read_body(request)
        if isinstance(raw, web.Response):
            return raw
        try:
            payload = parse_json(raw)
        except InputRefused as e:
            return error_response(400, str(e), type_="invalid_request_error", code=e.code)
        if not isinstance(payload, dict):
            return error_response(400, "request body must be a JSON object", type_="invalid_request_error",
                                  code="invalid_json")
        return raw, payload

    # -- 2. to 5.: the model, engine admission, routing, forwarding -------------------------------
    async def dispatch(self, request: web.Request, ctx: RequestContext, route: str, model: str,
                       payload: dict | None, raw: bytearray | None, stream: bool,
                       relay: bool = True) -> web.StreamResponse:
        """One generation for ``model`` (the base or a desired adapter) through the limiter, the adapter
        routing and the forwarder; the body is ``raw`` as received, or ``payload`` (``raw`` None)."""
        adapter = self.registry.is_desired(model)
        if adapter:
            ctx.model_label = model
        else:
            try:
                base = await self.base.get()
            except EngineUnavailable as e:
                return unavailable_response(e)
            except EngineHTTPError as e:
                return map_engine_error(e.status, e.body)
            if model != base:
                return model_not_found(model)
            ctx.model_label = model
        # memory: keep one form of the body while it waits and runs, the bytes as received (base
        # model, nothing rewritten) or the parsed object (the model name is rewritten)
        if adapter or raw is None:
            raw = None
        else:
            payload = None

        t_wait = time.perf_counter()
        lora, served = self.metrics.lora, model if adapter else None  # the LoRA view routers read
        lora.queued(served)
        try:
            await self.limiter.acquire(self.config.queue_timeout)
        except LimiterRejected as e:
            return self.rejected(e)
        finally:
            lora.dequeued(served)
        lora.started(served)
        ctx.queue_s = time.perf_counter() - t_wait
        self.metrics.queue_wait.observe(ctx.queue_s)
        try:
            if adapter:
                # route only now, when the request goes to the engine: a request that waited in the
                # queue through a swap gets the new version, and never delays the old one's unload
                if not self.registry.is_desired(model):
                    return model_not_found(model)  # removed while it waited
                try:
                    ctx.version = self.registry.acquire(model)
                except Unavailable as e:
                    return adapter_unavailable(str(e))
            return await self.forwarder.forward(request, route, model, payload, raw, stream, relay)
        finally:
            self.limiter.release()
            lora.finished(served)
            if ctx.version is not None:
                self.registry.release(ctx.version)
                ctx.version = None

    def rejected(self, e: LimiterRejected) -> web.Response:
        self.metrics.rejected.labels(e.reason).inc()
        retry_after = "1" if e.reason == "queue_full" else str(max(1, int(self.config.queue_timeout // 10)))
        return error_response(429, f"too many requests: {e}", type_="rate_limit_error", code=e.reason,
                              headers={"Retry-After": retry_after})
