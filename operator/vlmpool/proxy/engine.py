"""Admin-side HTTP client of the in-pod engine (vLLM, or `vlmpool sim`): LoRA load/unload, the model
list and /health, on one aiohttp session; plus the engine error helpers (body parsing, the self-heal
trigger). Generations use the lean client in upstream.py.

The session's connection pool is unbounded and keep-alive connections are dropped after
``keepalive_s`` (shorter than uvicorn's 5 s default), so a call never goes out on a connection the
engine has already closed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp

from vlmpool.vllm_contract import ALREADY_LOADED, UNKNOWN_MODEL_MARKS

from .logs import REQUEST_ID, get_logger

log = get_logger("engine")


class EngineError(Exception):
    """Base of engine failures: the one hierarchy of the proxy's two engine clients (this module's for
    admin calls, upstream.py's for generations)."""


class EngineUnavailable(EngineError):
    """The engine could not answer: connection refused or broken, or a protocol error. ``code`` is the
    error table's code."""

    code = "engine_unreachable"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class EngineProtocolError(EngineUnavailable):
    """The engine's answer breaks HTTP/1.1 framing (status line, headers, Content-Length, chunk sizes):
    answered 502, the connection dropped."""

    code = "engine_protocol_error"


class EngineTimeout(EngineUnavailable):
    """The engine did not answer in time."""

    code = "engine_timeout"


@dataclass
class EngineHTTPError(EngineError):
    """The engine answered with an HTTP error status."""

    status: int
    body: str

    def __str__(self) -> str:
        return f"engine answered HTTP {self.status}: {self.body[:500]}"

    def parsed(self) -> tuple[str, str | None, str | None]:
        """(message, type, code) read from vLLM's error body in any of its shapes."""
        return parse_error_body(self.body)


def parse_error_body(body: str) -> tuple[str, str | None, str | None]:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip(), None, None
    if isinstance(data, dict):
        err = data.get("error")
        if not isinstance(err, dict):
            err = data
        msg = err.get("message")
        if msg is None and "detail" in data:
            msg = data["detail"]
        if not isinstance(msg, str):
            msg = json.dumps(msg) if msg is not None else body.strip()
        etype = err.get("type")
        code = err.get("code")
        return msg, (str(etype) if etype is not None else None), (str(code) if code is not None else None)
    return body.strip(), None, None


def is_unknown_model_404(status: int, body: str, internal_name: str) -> bool:
    """The self-heal trigger, exactly as the roboflow proxy: 404, the (internal) name in the body, and
    "does not exist" / "not found" in it. Anything else (other 404s, 5xx, connection errors) is not it."""
    if status != 404:
        return False
    text = body.lower()
    return internal_name.lower() in text and any(mark in text for mark in UNKNOWN_MODEL_MARKS)


class EngineClient:
    def __init__(self, base_url: str, *, request_timeout: float, connect_timeout: float = 10.0,
                 keepalive_s: float = 4.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self.timeout_total = aiohttp.ClientTimeout(total=request_timeout, connect=connect_timeout)

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=self._keepalive_s,
                                             ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout_total, auto_decompress=True, raise_for_status=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # an engine sets no cookies; skip the jar on the hot path
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("EngineClient.start() was not awaited")
        return self._session

    def headers(self, request_id: str | None = None) -> dict[str, str]:
        rid = request_id or REQUEST_ID.get()
        h = {"Content-Type": "application/json"}
        if rid:
            h["X-Request-Id"] = rid
        return h

    # -- admin calls ---------------------------------------------------------------------------
    async def _post_json(self, path: str, payload: dict, request_id: str | None) -> tuple[int, str]:
        try:
            async with self.session.post(
                self.base_url + path, data=json.dumps(payload), headers=self.headers(request_id),
                timeout=self.timeout_total,
            ) as resp:
                return resp.status, await resp.text()
        except TimeoutError as e:
            raise EngineTimeout(f"engine timed out on {path} after {self.request_timeout:g}s") from e
        except aiohttp.ClientError as e:
            raise EngineUnavailable(f"could not reach the engine at {self.base_url}: {e}") from e

    async def load_lora(self, lora_name: str, lora_path: str, request_id: str | None = None) -> None:
        """Idempotent: vLLM's 400 "already been loaded" counts as success."""
        status, body = await self._post_json(
            "/v1/load_lora_adapter", {"lora_name": lora_name, "lora_path": lora_path}, request_id
        )
        if status == 200:
            return
        if status == 400 and ALREADY_LOADED in body:
            return
        raise EngineHTTPError(status, body)

    async def unload_lora(self, lora_name: str, request_id: str | None = None) -> bool:
        """True when unloaded, False when the engine did not know it (404): both leave it unloaded."""
        status, body = await self._post_json("/v1/unload_lora_adapter", {"lora_name": lora_name}, request_id)
        if status == 200:
            return True
        if status == 404:
            return False
        raise EngineHTTPError(status, body)

    async def list_models(self) -> list[dict]:
        try:
            async with self.session.get(self.base_url + "/v1/models", headers=self.headers()) as resp:
                if resp.status != 200:
                    raise EngineHTTPError(resp.status, await resp.text())
                data = await resp.json(content_type=None)
        except TimeoutError as e:
            raise EngineTimeout("engine timed out on /v1/models") from e
        except aiohttp.ClientError as e:
            raise EngineUnavailable(f"could not reach the engine at {self.base_url}: {e}") from e
        return list(data.get("data") or []) if isinstance(data, dict) else []

    async def metrics_text(self, timeout: float = 1.0, limit: int = 4 << 20) -> str | None:
        """The engine's /metrics text (at most ``limit`` bytes), or None when it does not answer 200 in
        time; never raises."""
        try:
            async with self.session.get(self.base_url + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.content.read(limit + 1)
                if resp.status != 200 or len(body) > limit:
                    return None
                return body.decode("utf-8", errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def healthy(self, timeout: float = 2.0) -> bool:
        """vLLM's /health: True iff 200; never raises."""
        try:
            async with self.session.get(self.base_url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
