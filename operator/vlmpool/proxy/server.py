"""The proxy: an OpenAI-compatible front of one pod's engine, plus the operator's admin API.

Two aiohttp applications on two ports (the admin one is reachable by the operator only, through a
NetworkPolicy, and needs a bearer token). Async end to end: one event loop, no thread pool, the only
cap on concurrency is the resizable limiter in front of the engine.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from .admin import ADMIN_MAX_BODY_BYTES, AdminAPI
from .config import ProxyConfig
from .context import CTX, RequestContext
from .crop_describe import ROUTE as CROP_DESCRIBE_ROUTE
from .crop_describe import CropDescribe
from .drain import Drain
from .engine import EngineClient, EngineHTTPError, EngineUnavailable
from .errors import (
    adapter_unavailable,
    error_response,
    http_code,
    map_engine_error,
    model_not_found,
    too_large,
    unavailable_response,
)
from .forwarding import Forwarder
from .guard import ApiKeys, BodyHold, BodyLimits, InputRefused, parse_json, read_request_body
from .limiter import ByteBudget, LimiterRejected, ResizableLimiter
from .logs import REQUEST_ID, get_logger, new_request_id
from .metrics import ProxyMetrics
from .state import AdapterRegistry, Unavailable
from .upstream import Upstream

log = get_logger()
access_log = get_logger("access")

REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
ENGINE_METRICS_ROUTE = "/metrics/engine"  # the engine's own /metrics, which listens on the pod's loopback only
# never behind the API key
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/drainz", "/metrics", ENGINE_METRICS_ROUTE})
LINGER_S = 2.0  # aiohttp's default is 10 s of reading a refused body's rest


class Proxy:
    """State and handlers of one proxy. ``build_apps()`` gives (public app, admin app)."""

    def __init__(self, config: ProxyConfig) -> None:
        config.validate()
        self.config = config
        self.metrics = ProxyMetrics()
        self.engine = EngineClient(config.engine_url, request_timeout=config.request_timeout)
        self._engine_metrics: tuple[float, str | None] = (0.0, None)  # (monotonic time, text): handle_engine_metrics
        self._engine_metrics_lock = asyncio.Lock()
        self.limiter = ResizableLimiter(config.concurrency, config.queue_limit)
        self.metrics.bind_limiter(lambda: self.limiter.active, lambda: self.limiter.waiting, lambda: self.limiter.limit)
        self.registry = AdapterRegistry(
            self.engine, self.metrics,
            base_model=lambda: self._base_model,
            on_concurrency=self._resize,
            concurrency=lambda: self.limiter.limit,
            load_parallelism=config.load_parallelism,
        )
        self._base_model: str | None = config.base_model
        self._base_lock = asyncio.Lock()
        self._created = int(time.time())
        self.shutting_down = False
        self.drain = Drain(config.drain_seconds, config.shutdown_timeout)
        self.upstream = Upstream(config.engine_url, keepalive_s=4.0)
        # memory: bodies held stay within --max-inflight-body-bytes: the oldest body still arriving may
        # take one request's maximum beyond what the others may (ByteBudget's deadlock rule), so the
        # others share the budget less that reserve
        budget = config.max_inflight_body_bytes or 2 * config.max_body_bytes
        self.body_budget = ByteBudget(max(1, budget - config.max_body_bytes), config.queue_limit)
        self.metrics.body_bytes.set_function(lambda: self.body_budget.used)
        self.bodies_arriving: dict[BodyHold, None] = {}  # oldest first (ByteBudget's deadlock rule)
        self.body_limits = BodyLimits(config.max_body_bytes, config.body_timeout, config.min_body_rate,
                                      config.body_rate_window, config.queue_timeout)
        self.api_keys = ApiKeys(config.api_key_dir) if config.api_key_dir else None
        self.metrics.bind_routing(self.registry.served_names, config.max_loras, config.base_model or "")
        self.forwarder = Forwarder(self.upstream, self.registry, self.metrics, config.request_timeout,
                                   send_timeout=config.send_timeout, max_answer_bytes=config.max_answer_bytes)
        self.crop_describe = CropDescribe(self)
        self.admin = AdminAPI(self.registry, config.admin_token or "", base_model=self.base_model,
                              adapter_root=config.adapter_root, body_timeout=config.body_timeout)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.engine.start()
        self.registry.start_retry_loop(self.config.retry_interval)

    async def close(self) -> None:
        self.registry.cancel_background()
        await self.upstream.close()
        await self.engine.close()

    def _resize(self, n: int) -> None:
        if n != self.limiter.limit:
            log.info("concurrency resized", extra={"old": self.limiter.limit, "new": n})
            self.limiter.resize(n)

    def build_apps(self) -> tuple[web.Application, web.Application]:
        public_mw = [self._middleware] + ([self._api_key_auth] if self.api_keys is not None else [])
        public = web.Application(client_max_size=self.config.max_body_bytes, middlewares=public_mw)
        public.router.add_post("/v1/chat/completions", self.handle_generation)
        public.router.add_post("/v1/completions", self.handle_generation)
        public.router.add_get("/v1/models", self.handle_models)
        public.router.add_post(CROP_DESCRIBE_ROUTE, self.crop_describe.handle)
        public.router.add_get("/healthz", self.handle_healthz)
        public.router.add_get("/readyz", self.handle_readyz)
        public.router.add_get("/drainz", self.drain.handle_drainz)
        public.router.add_get("/metrics", self.handle_metrics)
        public.router.add_get(ENGINE_METRICS_ROUTE, self.handle_engine_metrics)
        public.on_response_prepare.append(self._stamp_request_id)

        admin = web.Application(client_max_size=ADMIN_MAX_BODY_BYTES, middlewares=[self._middleware, self.admin.auth])
        self.admin.routes(admin)
        admin.on_response_prepare.append(self._stamp_request_id)
        return public, admin

    # -- middlewares --------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id")
        if not rid or not REQUEST_ID_RE.fullmatch(rid):
            rid = new_request_id()
        ctx = request[CTX] = RequestContext(rid)
        token = REQUEST_ID.set(rid)
        t0 = time.perf_counter()
        status = 500
        api = request.path.startswith("/v1/")  # the public API: what the engine's preStop hook waits for
        if api:
            self.drain.enter()
        try:
            try:
                resp = await handler(request)
            except web.HTTPException as e:
                if e.status < 400:
                    raise
                resp = error_response(e.status, e.reason, type_="invalid_request_error", code=http_code(e.status))
            except asyncio.CancelledError:
                status = 499
                raise
            except Exception:  # a bug: answer in the error shape, keep the trace in the log
                log.exception("unhandled error")
                resp = error_response(500, "internal proxy error", type_="internal_error", code="internal_error")
            status = resp.status
            return resp
        finally:
            if api:
                self.drain.exit()
            elapsed = time.perf_counter() - t0
            if ctx.status_override is not None:
                status = ctx.status_override
            if ctx.route is not None:
                self.metrics.observe_request(ctx.route, ctx.model_label, status, elapsed)
            if ctx.engine_s and ctx.route is not None:
                self.metrics.observe_overhead(ctx.route, max(0.0, elapsed - ctx.engine_s - ctx.queue_s))
            if self.config.access_log:
                extra = {
                    "method": request.method, "path": request.path, "status": status,
                    "model": ctx.model, "served_by": ctx.served_by,
                    "duration_ms": round(elapsed * 1000, 3),
                }
                if ctx.engine_s:
                    extra["queue_ms"] = round(ctx.queue_s * 1000, 3)
                    extra["engine_ms"] = round(ctx.engine_s * 1000, 3)
                access_log.info("request", extra=extra)
            REQUEST_ID.reset(token)

    @web.middleware
    async def _api_key_auth(self, request: web.Request, handler) -> web.StreamResponse:
        assert self.api_keys is not None
        if request.path not in OPEN_PATHS and not self.api_keys.accepts(request.headers.get("Authorization", "")):
            resp = error_response(
                401, "missing or invalid API key", type_="authentication_error", code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="vlmpool"'},
            )
            resp.force_close()  # the body (maybe large) is never read
            return resp
        return await handler(request)

    @staticmethod
    async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
        ctx = request.get(CTX)
        if ctx is not None:
            response.headers["X-Request-Id"] = ctx.request_id

    # -- base model ---------------------------------------------------------------------------
    async def base_model(self) -> str | None:
        """The engine's served base name: configured, else read once from the engine's /v1/models (the
        model card without a parent)."""
        if self._base_model is not None:
            return self._base_model
        async with self._base_lock:
            if self._base_model is None:
                models = await self.engine.list_models()
                for m in models:
                    if isinstance(m, dict) and not m.get("parent") and isinstance(m.get("id"), str):
                        self._base_model = m["id"]
                        log.info("base model discovered from the engine", extra={"base_model": m["id"]})
                        break
        return self._base_model

    # -- public handlers ----------------------------------------------------------------------
    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle_readyz(self, request: web.Request) -> web.Response:
        reasons = []
        if self.shutting_down:
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
            reasons.append(f"engine at {self.config.engine_url} is not healthy")
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

    async def handle_models(self, request: web.Request) -> web.Response:
        request[CTX].route = "/v1/models"
        try:
            base = await self.base_model()
        except (EngineUnavailable, EngineHTTPError) as e:
            base = None
            log.warning("base model unknown and the engine could not tell it", extra={"error": str(e)})
        data = []
        if base:
            data.append({"id": base, "object": "model", "created": self._created, "owned_by": "vlmpool", "root": base,
                         "parent": None})
        for served in self.registry.served_names():
            v = self.registry.alias.get(served)
            if v is None:
                continue
            data.append({
                "id": served, "object": "model", "created": self._created, "owned_by": "vlmpool",
                "root": v.internal, "parent": base, "version": v.version,
            })
        return web.json_response({"object": "list", "data": data})

    async def handle_generation(self, request: web.Request) -> web.StreamResponse:
        route = request.path
        ctx = request[CTX]
        ctx.route = route
        return await self.within_body_budget(request, lambda: self._generation(request, ctx, route))

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
            resp = self._rejected(e)
            resp.force_close()  # the rest of the body is never read
            return resp
        finally:
            hold.release()

    async def read_body(self, request: web.Request) -> bytearray | web.Response:
        """The request's body within the body limits (size, deadline, minimum rate) and the budget."""
        return await read_request_body(request, self.body_limits, hold=request[CTX].body_hold,
                                       on_cut=lambda why: self.metrics.client_cuts.labels(why).inc())

    async def _generation(self, request: web.Request, ctx: RequestContext, route: str) -> web.StreamResponse:
        raw: bytearray | web.Response | None
        payload: dict | None
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
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return error_response(400, "`model` is required and must be a string", type_="invalid_request_error",
                                  code="invalid_model", param="model")
        ctx.model = model
        if "response_format" in payload and payload["response_format"] is None:
            del payload["response_format"]  # some OpenAI-compatible servers reject an explicit null
            raw = None
        stream = payload.get("stream") is True
        # memory: dispatch keeps one form of the body; this frame must hold neither (a 60 MB image
        # string parsed and the bytes as received would both live until the answer is sent)
        held: list = [payload, raw]
        del payload, raw
        return await self.dispatch(request, ctx, route, model, *_handed_over(held), stream)

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
                base = await self.base_model()
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
            return self._rejected(e)
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

    def _rejected(self, e: LimiterRejected) -> web.Response:
        self.metrics.rejected.labels(e.reason).inc()
        retry_after = "1" if e.reason == "queue_full" else str(max(1, int(self.config.queue_timeout // 10)))
        return error_response(429, f"too many requests: {e}", type_="rate_limit_error", code=e.reason,
                              headers={"Retry-After": retry_after})

@dataclass
class RunningProxy:
    proxy: Proxy
    url: str
    admin_url: str
    port: int
    admin_port: int
    bind: str = ""  # the addresses really bound (0.0.0.0 stays 0.0.0.0), for the log
    admin_bind: str = ""


def _handed_over(held: list) -> tuple[dict | None, bytearray | None]:
    """``held``'s (payload, raw), ``held`` emptied: the caller keeps no reference to them."""
    payload, raw = held
    held.clear()
    return payload, raw


async def start_proxy(config: ProxyConfig) -> tuple[RunningProxy, list[web.AppRunner]]:
    proxy = Proxy(config)
    await proxy.start()
    public, admin = proxy.build_apps()
    runners = []
    try:
        ports = []
        for app, host, port in (
            (public, config.host, config.port),
            (admin, config.admin_host or config.host, config.admin_port),
        ):
            # keepalive_timeout is aiohttp's deadline for a connection's next request head, armed at
            # connect and after each response: it is the header timeout (and the keep-alive idle time);
            # after an answer given before the body was read, the rest is drained LINGER_S at most
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.shutdown_timeout, handle_signals=False,
                                   keepalive_timeout=config.header_timeout, lingering_time=LINGER_S)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True)
            await site.start()
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    except BaseException:
        for r in runners:
            await r.cleanup()
        await proxy.close()
        raise
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    ahost = (config.admin_host or config.host)
    ahost = ahost if ahost not in ("0.0.0.0", "::", "") else "127.0.0.1"
    running = RunningProxy(proxy, f"http://{host}:{ports[0]}", f"http://{ahost}:{ports[1]}", ports[0], ports[1],
                           bind=f"{config.host}:{ports[0]}",
                           admin_bind=f"{config.admin_host or config.host}:{ports[1]}")
    return running, runners


async def stop_proxy(running: RunningProxy, runners: list[web.AppRunner]) -> None:
    """Drain (proxy/drain.py): unready but serving for drain_seconds, then no new connections, then the
    requests in flight finish (shutdown_timeout at most) while the engine's preStop hook waits."""
    running.proxy.shutting_down = True
    await running.proxy.drain.begin()
    for r in runners:
        for site in list(r.sites):
            await site.stop()
    running.proxy.drain.listeners_closed()
    for r in runners:
        await r.cleanup()
    await running.proxy.close()


@asynccontextmanager
async def run_proxy(config: ProxyConfig) -> AsyncIterator[RunningProxy]:
    """Run a proxy on the running loop (tests, bench, `vlmpool dev`); ports 0 pick free ports."""
    running, runners = await start_proxy(config)
    try:
        yield running
    finally:
        await stop_proxy(running, runners)
