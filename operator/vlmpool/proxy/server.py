"""The proxy: an OpenAI-compatible front of one pod's engine, plus the operator's admin API.

Two aiohttp applications on two ports (the admin one is reachable by the operator only, through a
NetworkPolicy, and needs a bearer token). Async end to end: one event loop, no thread pool, the only
cap on concurrency is the resizable limiter in front of the engine.

This module wires the parts and runs them: ``Proxy`` builds the request pipeline (pipeline.py: body
admission, the model, engine admission, routing to an adapter version, forwarding) and the state applier
(the registry, which the admin API feeds), and attaches the routes to them (routes_openai.py,
crop_describe.py, routes_ops.py, admin.py); its middleware gives every request its context, metrics and
access-log line. ``start_proxy``/``stop_proxy``/``run_proxy`` run it with the drain.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from .admin import ADMIN_MAX_BODY_BYTES, AdminAPI
from .config import ProxyConfig
from .context import CTX, RequestContext
from .crop_describe import CropDescribe
from .drain import Drain
from .engine import EngineClient
from .errors import error_response, http_code
from .forwarding import Forwarder
from .guard import ApiKeys
from .limiter import ResizableLimiter
from .logs import REQUEST_ID, get_logger, new_request_id
from .metrics import ProxyMetrics
from .pipeline import BaseName, Pipeline
from .routes_openai import OpenAIRoutes
from .routes_ops import OPEN_PATHS, OpsRoutes
from .state import AdapterRegistry
from .upstream import Upstream

__all__ = ["Proxy", "ProxyConfig", "RunningProxy", "run_proxy", "start_proxy", "stop_proxy"]

log = get_logger()
access_log = get_logger("access")

REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
LINGER_S = 2.0  # aiohttp's default is 10 s of reading a refused body's rest


class Proxy:
    """One proxy: its parts, wired. ``build_apps()`` gives (public app, admin app)."""

    def __init__(self, config: ProxyConfig) -> None:
        config.validate()
        self.config = config
        self.metrics = ProxyMetrics()
        self.engine = EngineClient(config.engine_url, request_timeout=config.request_timeout)
        self.limiter = ResizableLimiter(config.concurrency, config.queue_limit)
        self.metrics.bind_limiter(lambda: self.limiter.active, lambda: self.limiter.waiting, lambda: self.limiter.limit)
        self.base = BaseName(self.engine, config.base_model)
        # the state applier: the admin API's pushes converge here; the pipeline routes through it
        self.registry = AdapterRegistry(
            self.engine, self.metrics,
            base_model=lambda: self.base.known,
            on_concurrency=self._resize,
            concurrency=lambda: self.limiter.limit,
            load_parallelism=config.load_parallelism,
        )
        self.shutting_down = False
        self.drain = Drain(config.drain_seconds, config.shutdown_timeout)
        self.upstream = Upstream(config.engine_url, keepalive_s=4.0)
        self.api_keys = ApiKeys(config.api_key_dir) if config.api_key_dir else None
        self.metrics.bind_routing(self.registry.served_names, config.max_loras, config.base_model or "")
        forwarder = Forwarder(self.upstream, self.registry, self.metrics, config.request_timeout,
                              send_timeout=config.send_timeout, max_answer_bytes=config.max_answer_bytes)
        self.pipeline = Pipeline(config, self.metrics, self.base, self.limiter, self.registry, forwarder)
        self.body_budget = self.pipeline.body_budget
        self.bodies_arriving = self.pipeline.bodies_arriving
        # the public port's routes, in this order
        self.routes = (
            OpenAIRoutes(self.pipeline),
            CropDescribe(self.pipeline),
            OpsRoutes(self.engine, config.engine_url, self.registry, self.metrics, self.drain,
                      lambda: self.shutting_down),
        )
        self.admin = AdminAPI(self.registry, config.admin_token or "", base_model=self.base.get,
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
        for routes in self.routes:
            routes.attach(public)
        public.on_response_prepare.append(self._stamp_request_id)

        admin = web.Application(client_max_size=ADMIN_MAX_BODY_BYTES, middlewares=[self._middleware, self.admin.auth])
        self.admin.attach(admin)
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


@dataclass
class RunningProxy:
    proxy: Proxy
    url: str
    admin_url: str
    port: int
    admin_port: int
    bind: str = ""  # the addresses really bound (0.0.0.0 stays 0.0.0.0), for the log
    admin_bind: str = ""


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
