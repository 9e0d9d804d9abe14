"""The proxy: an OpenAI-compatible front of one pod's engine, plus the operator's admin API.

Two aiohttp applications on two ports (the admin one is reachable by the operator only, through a
NetworkPolicy, and needs a bearer token). Async end to end: one event loop, no thread pool, the only
cap on concurrency is the resizable limiter in front of the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from .defaults import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_QUEUE_LIMIT,
    DEFAULT_QUEUE_TIMEOUT_S,
    DEFAULT_REQUEST_TIMEOUT_S,
)
from .engine import EngineClient, EngineHTTPError, EngineUnavailable, is_unknown_model_404, parse_error_body
from .limiter import LimiterRejected, ResizableLimiter
from .logs import REQUEST_ID, get_logger, new_request_id
from .metrics import ProxyMetrics
from .upstream import Upstream, UpstreamError, UpstreamResponse, UpstreamTimeout
from .state import AdapterRegistry, DesiredState, LoadedVersion, Unavailable

log = get_logger()
access_log = get_logger("access")

UPSTREAM_MESSAGE_CHARS = 300
MODERATION_MARKERS = ("data_inspection_failed", "inappropriate")
REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")


@dataclass(slots=True)
class RequestContext:
    """What the middleware and the handlers know about one request."""

    request_id: str
    route: str | None = None  # metrics label; None: not counted
    model: str | None = None  # as the client sent it
    model_label: str = "unknown"  # metrics label: a served name, or "unknown"
    served_by: str | None = None  # the engine-side name that answered
    version: LoadedVersion | None = None  # the adapter version counted as in flight
    status_override: int | None = None  # a stream's real outcome (headers already sent as 200)
    queue_s: float = 0.0  # waiting for a limiter slot
    engine_t0: float = 0.0
    engine_s: float = 0.0  # from the first byte sent to the engine to the last byte received from it


CTX = web.RequestKey("vlmpool_request", RequestContext)


@dataclass
class ProxyConfig:
    engine_url: str = "http://127.0.0.1:8000"
    host: str = "0.0.0.0"
    port: int = 8080
    admin_host: str | None = None  # defaults to host
    admin_port: int = 8081
    admin_token: str | None = None
    base_model: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    access_log: bool = True
    shutdown_timeout: float = 30.0
    retry_interval: float = 5.0  # re-try loads that met an unreachable engine this often (0: never)

    def validate(self) -> None:
        problems = []
        if not self.admin_token:
            problems.append(
                "an admin token is required: set VLMPOOL_ADMIN_TOKEN or VLMPOOL_ADMIN_TOKEN_FILE "
                "(the admin API is never served without one)"
            )
        if self.concurrency < 1:
            problems.append(f"concurrency must be >= 1 (got {self.concurrency})")
        if self.queue_limit < 0:
            problems.append(f"queue limit must be >= 0 (got {self.queue_limit})")
        if self.queue_timeout <= 0:
            problems.append(f"queue timeout must be > 0 seconds (got {self.queue_timeout})")
        if self.request_timeout <= 0:
            problems.append(f"request timeout must be > 0 seconds (got {self.request_timeout})")
        if not self.engine_url.startswith(("http://", "https://")):
            problems.append(f"engine URL must be http(s)://host:port (got {self.engine_url!r})")
        if problems:
            raise ValueError("; ".join(problems))


def error_response(
    status: int, message: str, *, type_: str, code: str | None, param: str | None = None,
    headers: dict[str, str] | None = None, **extra: object,
) -> web.Response:
    err: dict[str, object] = {"message": message, "type": type_, "param": param, "code": code}
    err.update(extra)
    return web.Response(
        body=json.dumps({"error": err}).encode(), status=status, content_type="application/json", headers=headers
    )


def map_engine_error(status: int, body: str) -> web.Response:
    """The error table for an engine answer >= 400: 4xx -> 422 (a per-request problem; the upstream
    status, code and message and a moderation flag travel in the error object), 5xx -> 503."""
    message, etype, ecode = parse_error_body(body)
    message = message[:UPSTREAM_MESSAGE_CHARS]
    if 400 <= status < 500:
        lowered = body.lower()
        moderated = any(m in lowered for m in MODERATION_MARKERS)
        return error_response(
            422, message, type_="upstream_client_error", code="vlm_client_error",
            kind="vlm_client_error", upstream_status=status, upstream_code=ecode, upstream_type=etype,
            moderated=moderated,
        )
    return error_response(
        503, message or f"engine answered HTTP {status}", type_="engine_error", code="engine_error",
        upstream_status=status, upstream_code=ecode, upstream_type=etype, headers={"Retry-After": "1"},
    )


def unavailable_response(e: EngineUnavailable) -> web.Response:
    return error_response(503, str(e)[:UPSTREAM_MESSAGE_CHARS], type_="engine_error", code=e.code, headers={"Retry-After": "1"})


class Proxy:
    """State and handlers of one proxy. ``build_apps()`` gives (public app, admin app)."""

    def __init__(self, config: ProxyConfig) -> None:
        config.validate()
        self.config = config
        self.metrics = ProxyMetrics()
        self.engine = EngineClient(config.engine_url, request_timeout=config.request_timeout)
        self.limiter = ResizableLimiter(config.concurrency, config.queue_limit)
        self.metrics.bind_limiter(lambda: self.limiter.active, lambda: self.limiter.waiting, lambda: self.limiter.limit)
        self.registry = AdapterRegistry(
            self.engine, self.metrics,
            base_model=lambda: self._base_model,
            on_concurrency=self._resize,
            concurrency=lambda: self.limiter.limit,
        )
        self._base_model: str | None = config.base_model
        self._base_lock = asyncio.Lock()
        self._token = (config.admin_token or "").encode()
        self._created = int(time.time())
        self.shutting_down = False
        self.upstream = Upstream(config.engine_url, keepalive_s=4.0)

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
        public = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._middleware])
        public.router.add_post("/v1/chat/completions", self.handle_generation)
        public.router.add_post("/v1/completions", self.handle_generation)
        public.router.add_get("/v1/models", self.handle_models)
        public.router.add_get("/healthz", self.handle_healthz)
        public.router.add_get("/readyz", self.handle_readyz)
        public.router.add_get("/metrics", self.handle_metrics)
        public.on_response_prepare.append(self._stamp_request_id)

        admin = web.Application(client_max_size=8 * 1024 * 1024, middlewares=[self._middleware, self._admin_auth])
        admin.router.add_get("/admin/v1/state", self.handle_get_state)
        admin.router.add_put("/admin/v1/state", self.handle_put_state)
        admin.on_response_prepare.append(self._stamp_request_id)
        return public, admin

    # -- middlewares --------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id")
        if not rid or not REQUEST_ID_RE.match(rid):
            rid = new_request_id()
        ctx = request[CTX] = RequestContext(rid)
        token = REQUEST_ID.set(rid)
        t0 = time.perf_counter()
        status = 500
        try:
            try:
                resp = await handler(request)
            except web.HTTPException as e:
                if e.status < 400:
                    raise
                resp = error_response(e.status, e.reason, type_="invalid_request_error", code=_http_code(e.status))
            except asyncio.CancelledError:
                status = 499
                raise
            except Exception:  # a bug: answer in the error shape, keep the trace in the log
                log.exception("unhandled error")
                resp = error_response(500, "internal proxy error", type_="internal_error", code="internal_error")
            status = resp.status
            return resp
        finally:
            elapsed = time.perf_counter() - t0
            if ctx.status_override is not None:
                status = ctx.status_override
            if ctx.route is not None:
                self.metrics.observe_request(ctx.route, ctx.model_label, status, elapsed)
            if ctx.engine_s:
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
    async def _admin_auth(self, request: web.Request, handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            log.warning("admin request refused: bad or missing bearer token", extra={"path": request.path})
            return error_response(
                401, "missing or invalid bearer token", type_="authentication_error", code="invalid_token",
                headers={"WWW-Authenticate": 'Bearer realm="vlmpool-proxy-admin"'},
            )
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
        if not await self.engine.healthy():
            reasons.append(f"engine at {self.config.engine_url} is not healthy")
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready", "generation": self.registry.generation})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    async def handle_models(self, request: web.Request) -> web.Response:
        request[CTX].route = "/v1/models"
        try:
            base = await self.base_model()
        except (EngineUnavailable, EngineHTTPError) as e:
            base = None
            log.warning("base model unknown and the engine could not tell it", extra={"error": str(e)})
        data = []
        if base:
            data.append({"id": base, "object": "model", "created": self._created, "owned_by": "vlmpool", "root": base, "parent": None})
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
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body larger than {self.config.max_body_bytes} bytes",
                                  type_="invalid_request_error", code="request_too_large")
        try:
            payload = json.loads(raw)
        except ValueError:
            return error_response(400, "request body is not valid JSON", type_="invalid_request_error", code="invalid_json")
        if not isinstance(payload, dict):
            return error_response(400, "request body must be a JSON object", type_="invalid_request_error", code="invalid_json")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return error_response(400, "`model` is required and must be a string", type_="invalid_request_error",
                                  code="invalid_model", param="model")
        ctx.model = model
        rewrite = False
        if "response_format" in payload and payload["response_format"] is None:
            del payload["response_format"]  # some OpenAI-compatible servers reject an explicit null
            rewrite = True

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
                return _model_not_found(model)
            ctx.model_label = model

        t_wait = time.perf_counter()
        try:
            await self.limiter.acquire(self.config.queue_timeout)
        except LimiterRejected as e:
            self.metrics.rejected.labels(e.reason).inc()
            retry_after = "1" if e.reason == "queue_full" else str(max(1, int(self.config.queue_timeout // 10)))
            return error_response(429, f"too many requests: {e}", type_="rate_limit_error", code=e.reason,
                                  headers={"Retry-After": retry_after})
        ctx.queue_s = time.perf_counter() - t_wait
        self.metrics.queue_wait.observe(ctx.queue_s)
        try:
            if adapter:
                # route only now, when the request goes to the engine: a request that waited in the
                # queue through a swap gets the new version, and never delays the old one's unload
                if not self.registry.is_desired(model):
                    return _model_not_found(model)  # removed while it waited
                try:
                    ctx.version = self.registry.acquire(model)
                except Unavailable as e:
                    return error_response(503, str(e)[:UPSTREAM_MESSAGE_CHARS], type_="engine_error",
                                          code="adapter_unavailable", param="model", headers={"Retry-After": "5"})
            return await self._forward(request, route, payload, raw, rewrite, model)
        finally:
            self.limiter.release()
            if ctx.version is not None:
                self.registry.release(ctx.version)
                ctx.version = None

    async def _forward(self, request, route, payload, raw, rewrite, model) -> web.StreamResponse:
        stream = payload.get("stream") is True
        ctx = request[CTX]
        up = self.upstream
        t_limit = self.config.request_timeout
        t0 = ctx.engine_t0 = time.perf_counter()
        try:
            return await self._exchange(request, route, payload, raw, rewrite, model, stream, ctx, up, t_limit, t0)
        finally:
            if not ctx.engine_s:  # streams set it when the engine's last byte arrived
                ctx.engine_s = time.perf_counter() - t0

    async def _exchange(self, request, route, payload, raw, rewrite, model, stream, ctx, up, t_limit, t0):
        healed = False
        while True:
            version = ctx.version
            internal = version.internal if version is not None else model
            ctx.served_by = internal
            if version is None and not rewrite:
                data = raw
            else:
                payload["model"] = internal
                data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + t_limit  # non-streaming: the whole call; streams: each silence
            try:
                resp = await up.post(route, data, ctx.request_id, stream=stream, timeout=t_limit)
            except UpstreamError as e:
                return unavailable_response(EngineUnavailable(_upstream_message(e, t_limit), code=e.code))
            try:
                if resp.status >= 400:
                    raw = await _read_body(up, resp, deadline if not stream else loop.time() + t_limit, t_limit)
                    if isinstance(raw, web.Response):
                        return raw
                    body = raw.decode("utf-8", errors="replace")
                    if not healed and version is not None and is_unknown_model_404(resp.status, body, internal):
                        healed = True
                        up.release(resp)
                        new = await self.registry.heal(model, version)
                        if new is None:
                            return error_response(
                                503, f"adapter {model!r} is not loaded in the engine and could not be re-loaded",
                                type_="engine_error", code="adapter_unavailable", param="model",
                                headers={"Retry-After": "5"},
                            )
                        ctx.version = new
                        self.registry.release(version)
                        continue
                    log.warning("engine error", extra={"upstream_status": resp.status, "body": body[:500]})
                    if version is not None and (why := self.registry.first_use_failed(model, version, resp.status, body)):
                        return error_response(502, why[:UPSTREAM_MESSAGE_CHARS], type_="engine_error",
                                              code="adapter_failed", param="model", upstream_status=resp.status)
                    return map_engine_error(resp.status, body)
                self.metrics.observe_ttfb(route, time.perf_counter() - t0)
                if version is not None:
                    version.served_ok = True
                if stream:
                    return await self._stream(request, resp, internal)
                body_bytes = await _read_body(up, resp, deadline, t_limit)
                if isinstance(body_bytes, web.Response):
                    return body_bytes
                headers = {"Content-Type": resp.headers.get("content-type", "application/json"), "X-Vlmpool-Served-By": internal}
                if "content-encoding" in resp.headers:
                    headers["Content-Encoding"] = resp.headers["content-encoding"]
                return web.Response(body=body_bytes, status=resp.status, headers=headers)
            except BaseException:
                up.abort(resp)  # cancelled or failed half-way: never reuse this connection
                raise
            finally:
                up.release(resp)  # no-op when aborted

    async def _stream(self, request: web.Request, resp: UpstreamResponse, internal: str) -> web.StreamResponse:
        up = self.upstream
        headers = {
            "Content-Type": resp.headers.get("content-type", "text/event-stream"),
            "Cache-Control": "no-cache",
            "X-Vlmpool-Served-By": internal,
        }
        if "content-encoding" in resp.headers:
            headers["Content-Encoding"] = resp.headers["content-encoding"]
        out = web.StreamResponse(status=resp.status, headers=headers)
        await out.prepare(request)
        ctx = request[CTX]
        try:
            async for chunk in resp.iter_chunks(self.config.request_timeout):
                await out.write(chunk)
            ctx.engine_s = time.perf_counter() - ctx.engine_t0
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # the client went away: drop the engine connection so the engine aborts the generation
            up.abort(resp)
            request[CTX].status_override = 499
            log.info("client disconnected during a stream")
            return out
        except UpstreamError as e:
            up.abort(resp)
            request[CTX].status_override = 503
            log.error("engine stream broke", extra={"error": str(e)})
            err = {"error": {"message": f"engine stream broke: {e}"[:UPSTREAM_MESSAGE_CHARS], "type": "engine_error",
                             "param": None, "code": e.code}}
            try:
                await out.write(b"data: " + json.dumps(err).encode() + b"\n\n")
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                return out
        try:
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return out

    # -- admin handlers -----------------------------------------------------------------------
    async def handle_get_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.registry.snapshot())

    async def handle_put_state(self, request: web.Request) -> web.Response:
        try:
            raw = await request.read()
            data = json.loads(raw)
        except ValueError:
            return error_response(400, "request body is not valid JSON", type_="invalid_request_error", code="invalid_json")
        try:
            state = DesiredState.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in e.errors()
            )
            return error_response(400, f"invalid state: {problems}", type_="invalid_request_error", code="invalid_state")
        base = None
        try:
            base = await self.base_model()
        except (EngineUnavailable, EngineHTTPError):
            pass  # unknown for now; the apply goes on (loads will report the engine's state)
        clash = [a.name for a in state.adapters if base is not None and a.name == base]
        if clash:
            return error_response(400, f"invalid state: adapter name {clash[0]!r} is the base model's name",
                                  type_="invalid_request_error", code="invalid_state")
        applied, snap = await self.registry.apply(state, request[CTX].request_id)
        if not applied:
            return web.json_response(snap, status=409)
        return web.json_response(snap)


def _model_not_found(model: str) -> web.Response:
    return error_response(404, f"The model `{model}` does not exist.", type_="invalid_request_error",
                          code="model_not_found", param="model")


async def _read_body(up: Upstream, resp: UpstreamResponse, deadline: float, t_limit: float) -> bytes | web.Response:
    """The engine response's whole body by `deadline`, or the 503 to answer when it times out or
    the connection breaks (the connection is then dropped, not reused)."""
    try:
        async with asyncio.timeout_at(deadline):
            return await resp.read()
    except TimeoutError:
        up.abort(resp)
        return unavailable_response(EngineUnavailable(_upstream_message(UpstreamTimeout(""), t_limit), code="engine_timeout"))
    except UpstreamError as e:
        up.abort(resp)
        return unavailable_response(EngineUnavailable(_upstream_message(e, t_limit), code=e.code))


def _upstream_message(e: UpstreamError, timeout: float) -> str:
    if isinstance(e, UpstreamTimeout):
        return f"engine timed out after {timeout:g}s"
    return str(e)


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status, f"http_{status}")


@dataclass
class RunningProxy:
    proxy: Proxy
    url: str
    admin_url: str
    port: int
    admin_port: int


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
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.shutdown_timeout, handle_signals=False)
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
    running = RunningProxy(proxy, f"http://{host}:{ports[0]}", f"http://{ahost}:{ports[1]}", ports[0], ports[1])
    return running, runners


async def stop_proxy(running: RunningProxy, runners: list[web.AppRunner]) -> None:
    running.proxy.shutting_down = True
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


def read_admin_token(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    token = env.get("VLMPOOL_ADMIN_TOKEN")
    if token:
        return token.strip()
    path = env.get("VLMPOOL_ADMIN_TOKEN_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"VLMPOOL_ADMIN_TOKEN_FILE {path} is empty")
        return token
    return None
