"""Forwarding a generation to the engine: send (the body as received, or re-serialised with the
adapter version's internal name), read or relay the answer under the request timeout, map engine
errors through the error table, and self-heal once when the engine forgot a desired adapter (vLLM
restarted): re-load it, retry exactly once."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
from aiohttp import web

from .context import CTX
from .engine import EngineTimeout, EngineUnavailable, is_unknown_model_404
from .errors import (
    UPSTREAM_MESSAGE_CHARS,
    adapter_failed,
    adapter_unavailable,
    error_body,
    map_engine_error,
    unavailable_response,
)
from .logs import get_logger
from .metrics import ProxyMetrics
from .state import AdapterRegistry
from .upstream import Upstream, UpstreamResponse

log = get_logger()


class Forwarder:
    def __init__(self, upstream: Upstream, registry: AdapterRegistry, metrics: ProxyMetrics,
                 request_timeout: float) -> None:
        self.upstream = upstream
        self.registry = registry
        self.metrics = metrics
        self.request_timeout = request_timeout

    async def forward(self, request: web.Request, route: str, model: str, payload: dict | None,
                      raw: bytearray | None, stream: bool) -> web.StreamResponse:
        """Send the body to the engine: ``raw`` as received, or ``payload`` re-serialised with the
        internal model name."""
        ctx = request[CTX]
        t0 = ctx.engine_t0 = time.perf_counter()
        try:
            return await self._exchange(request, route, model, payload, raw, stream, t0)
        finally:
            if not ctx.engine_s:  # streams set it when the engine's last byte arrived
                ctx.engine_s = time.perf_counter() - t0

    async def _exchange(self, request, route, model, payload, raw, stream, t0):
        ctx = request[CTX]
        up = self.upstream
        t_limit = self.request_timeout
        healed = False
        while True:
            version = ctx.version
            internal = version.internal if version is not None else model
            ctx.served_by = internal
            if payload is None:
                data = raw
            else:
                payload["model"] = internal
                data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + t_limit  # non-streaming: the whole call; streams: each silence
            try:
                resp = await up.post(route, data, ctx.request_id, stream=stream, timeout=t_limit)
            except EngineUnavailable as e:
                return unavailable_response(e, t_limit)
            try:
                if resp.status >= 400:
                    answer = await read_engine_body(up, resp, deadline if not stream else loop.time() + t_limit,
                                                    t_limit)
                    if isinstance(answer, web.Response):
                        return answer
                    body = answer.decode("utf-8", errors="replace")
                    forgot = version is not None and is_unknown_model_404(resp.status, body, internal)
                    if forgot and healed:  # forgotten again right after a successful re-load: not the client's fault
                        log.warning("engine forgot the adapter again after a re-load", extra={"adapter": internal})
                        return adapter_unavailable(
                            f"adapter {model!r} is not loaded in the engine (forgotten again after a re-load)")
                    if forgot:
                        healed = True
                        up.release(resp)
                        new = await self.registry.heal(model, version)
                        if new is None:
                            return adapter_unavailable(
                                f"adapter {model!r} is not loaded in the engine and could not be re-loaded")
                        ctx.version = new
                        self.registry.release(version)
                        continue
                    log.warning("engine error", extra={"upstream_status": resp.status, "body": body[:500]})
                    if version is not None and (why := self.registry.first_use_failed(model, version, resp.status,
                                                                                       body)):
                        return adapter_failed(why, resp.status)
                    return map_engine_error(resp.status, body)
                self.metrics.observe_ttfb(route, time.perf_counter() - t0)
                if version is not None:
                    version.served_ok = True
                rename = ModelRename(internal, model) if version is not None else None
                if stream:
                    return await self._stream(request, resp, internal, rename)
                body_bytes = await read_engine_body(up, resp, deadline, t_limit)
                if isinstance(body_bytes, web.Response):
                    return body_bytes
                if rename is not None and "content-encoding" not in resp.headers:
                    body_bytes = rename.whole(body_bytes)
                headers = {"Content-Type": resp.headers.get("content-type", "application/json"),
                           "X-Vlmpool-Served-By": internal}
                if "content-encoding" in resp.headers:
                    headers["Content-Encoding"] = resp.headers["content-encoding"]
                return web.Response(body=body_bytes, status=resp.status, headers=headers)
            except BaseException:
                up.abort(resp)  # cancelled or failed half-way: never reuse this connection
                raise
            finally:
                up.release(resp)  # no-op when aborted

    async def _stream(self, request: web.Request, resp: UpstreamResponse, internal: str,
                      rename: ModelRename | None) -> web.StreamResponse:
        up = self.upstream
        headers = {
            "Content-Type": resp.headers.get("content-type", "text/event-stream"),
            "Cache-Control": "no-cache",
            "X-Vlmpool-Served-By": internal,
        }
        if "content-encoding" in resp.headers:
            headers["Content-Encoding"] = resp.headers["content-encoding"]
            rename = None  # compressed bytes are relayed as they are
        out = web.StreamResponse(status=resp.status, headers=headers)
        await out.prepare(request)
        ctx = request[CTX]
        try:
            async for chunk in resp.iter_chunks(self.request_timeout):
                if rename is not None:
                    chunk = rename.feed(chunk)
                    if not chunk:
                        continue
                await out.write(chunk)
            if rename is not None and (rest := rename.flush()):
                await out.write(rest)
            ctx.engine_s = time.perf_counter() - ctx.engine_t0
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # the client went away: drop the engine connection so the engine aborts the generation
            up.abort(resp)
            request[CTX].status_override = 499
            log.info("client disconnected during a stream")
            return out
        except EngineUnavailable as e:
            up.abort(resp)
            request[CTX].status_override = 503
            log.error("engine stream broke", extra={"error": str(e)})
            err = error_body(f"engine stream broke: {e}"[:UPSTREAM_MESSAGE_CHARS], type_="engine_error", code=e.code)
            try:
                await out.write(b"data: " + json.dumps(err).encode() + b"\n\n")
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                return out
        try:
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return out


class ModelRename:
    """Answers name the model the client asked for: the engine's ``"model": "<name>@<version>"`` becomes
    ``"model": "<name>"`` (the version stays in the X-Vlmpool-Served-By header). Inside a JSON string a
    quote is always escaped, so the pattern (real quotes around key and value) only meets real
    ``model`` members. Streams are rewritten per SSE event: bytes after the last event boundary wait
    for the next chunk, at most ``MAX_CARRY`` of them (beyond that they are relayed unchanged)."""

    MAX_CARRY = 256 * 1024

    __slots__ = ("_carry", "_pattern", "_served")

    def __init__(self, internal: str, served: str) -> None:
        self._pattern = re.compile(rb'"model"(\s*):(\s*)' + re.escape(json.dumps(internal).encode()))
        self._served = json.dumps(served).encode()
        self._carry = b""

    def _sub(self, m: re.Match[bytes]) -> bytes:
        return b'"model"' + m.group(1) + b":" + m.group(2) + self._served

    def whole(self, body: bytes) -> bytes:
        return self._pattern.sub(self._sub, body)

    def feed(self, chunk: bytes) -> bytes:
        """The complete events of what arrived so far, renamed; the rest waits for the next chunk."""
        data = self._carry + chunk if self._carry else chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)
        if end < 0:
            if len(data) <= self.MAX_CARRY:
                self._carry = data
                return b""
            self._carry = b""
            return data  # no event boundary in sight: relayed as it is (memory stays bounded)
        self._carry = data[end:]
        return self._pattern.sub(self._sub, data[:end])

    def flush(self) -> bytes:
        data, self._carry = self._carry, b""
        return self._pattern.sub(self._sub, data) if data else b""


async def read_engine_body(up: Upstream, resp: UpstreamResponse, deadline: float,
                           t_limit: float) -> bytes | web.Response:
    """The engine response's whole body by `deadline`, or the 503 to answer when it times out or
    the connection breaks (the connection is then dropped, not reused)."""
    try:
        async with asyncio.timeout_at(deadline):
            return await resp.read()
    except TimeoutError:
        up.abort(resp)
        return unavailable_response(EngineTimeout(""), t_limit)
    except EngineUnavailable as e:
        up.abort(resp)
        return unavailable_response(e, t_limit)


