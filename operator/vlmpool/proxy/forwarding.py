"""Forwarding a generation to the engine: send (the body as received, or re-serialised with the
adapter version's internal name), read or relay the answer under the request timeout, map engine
errors through the error table, and self-heal once when the engine forgot a desired adapter (vLLM
restarted): re-load it, retry exactly once."""

from __future__ import annotations

import asyncio
import json
import re
import time

from aiohttp import web

from .context import CTX
from .engine import EngineTimeout, EngineUnavailable, is_unknown_model_404
from .errors import (
    UPSTREAM_MESSAGE_CHARS,
    adapter_failed,
    adapter_unavailable,
    answer_too_large,
    error_body,
    map_engine_error,
    unavailable_response,
)
from .logs import get_logger
from .metrics import ProxyMetrics
from .sending import ClientGone, finish, prepare, record, send
from .state import AdapterRegistry
from .upstream import AnswerTooLarge, Upstream, UpstreamResponse

log = get_logger()


class Forwarder:
    def __init__(self, upstream: Upstream, registry: AdapterRegistry, metrics: ProxyMetrics,
                 request_timeout: float, *, send_timeout: float, max_answer_bytes: int) -> None:
        self.upstream = upstream
        self.registry = registry
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout  # each write to the client (proxy/sending.py)
        self.max_answer_bytes = max_answer_bytes  # a non-streaming answer (and an error body) at most

    async def forward(self, request: web.Request, route: str, model: str, payload: dict | None,
                      raw: bytearray | None, stream: bool, relay: bool = True) -> web.StreamResponse:
        """Send the body to the engine: ``raw`` as received, or ``payload`` re-serialised with the
        internal model name. ``relay``: a non-streaming answer is written to the client here (under the
        send deadline); else it is returned unsent (a caller that reworks it, as crop-describe)."""
        ctx = request[CTX]
        t0 = ctx.engine_t0 = time.perf_counter()
        try:
            return await self._exchange(request, route, model, payload, raw, stream, t0, relay)
        finally:
            if not ctx.engine_s:  # streams set it when the engine's last byte arrived
                ctx.engine_s = time.perf_counter() - t0

    async def _exchange(self, request, route, model, payload, raw, stream, t0, relay):
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
                                                    t_limit, self.max_answer_bytes)
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
                body_bytes = await read_engine_body(up, resp, deadline, t_limit, self.max_answer_bytes)
                if isinstance(body_bytes, web.Response):
                    return body_bytes
                up.release(resp)  # read to its end: the engine connection is free before the client's write
                if rename is not None and "content-encoding" not in resp.headers:
                    body_bytes = rename.whole(body_bytes)
                headers = {"Content-Type": resp.headers.get("content-type", "application/json"),
                           "X-Vlmpool-Served-By": internal}
                if "content-encoding" in resp.headers:
                    headers["Content-Encoding"] = resp.headers["content-encoding"]
                out = web.Response(body=body_bytes, status=resp.status, headers=headers)
                del body_bytes
                if not relay:
                    return out
                # written here, under the send deadline (aiohttp would write it after the handler, unbounded)
                await prepare(request, out, self.send_timeout)
                await finish(request, out, self.send_timeout)
                return out
            except ClientGone as gone:
                up.abort(resp)  # no-op when released: a stream's engine request is cancelled here
                record(request, gone, self.metrics)
                log.info("client cut", extra={"reason": gone.reason})
                return web.Response(status=gone.status)  # nothing is written: the connection is gone
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
        await prepare(request, out, self.send_timeout)
        ctx = request[CTX]
        t_send = self.send_timeout
        try:
            async for chunk in resp.iter_chunks(self.request_timeout):
                if rename is not None:
                    chunk = rename.feed(chunk)
                    if not chunk:
                        continue
                await send(request, out, chunk, t_send)
            if rename is not None and (rest := rename.flush()):
                await send(request, out, rest, t_send)
            ctx.engine_s = time.perf_counter() - ctx.engine_t0
        except EngineUnavailable as e:
            up.abort(resp)
            request[CTX].status_override = 503
            log.error("engine stream broke", extra={"error": str(e)})
            err = error_body(f"engine stream broke: {e}"[:UPSTREAM_MESSAGE_CHARS], type_="engine_error", code=e.code)
            await send(request, out, b"data: " + json.dumps(err).encode() + b"\n\n", t_send)
        await finish(request, out, t_send)
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
                           t_limit: float, limit: int) -> bytes | web.Response:
    """The engine response's whole body by `deadline` and at most `limit` bytes, or the 503 (timed
    out, connection broken) or 502 (larger than `limit`) to answer; the connection is then dropped."""
    try:
        async with asyncio.timeout_at(deadline):
            return await resp.read(limit)
    except TimeoutError:
        up.abort(resp)
        return unavailable_response(EngineTimeout(""), t_limit)
    except AnswerTooLarge as e:
        up.abort(resp)
        log.warning("engine answer refused: too large", extra={"error": str(e)})
        return answer_too_large(limit)
    except EngineUnavailable as e:
        up.abort(resp)
        return unavailable_response(e, t_limit)
