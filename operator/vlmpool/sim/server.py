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

import asyncio
import base64
import binascii
import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import Any

from aiohttp import web

from vlmpool.sim import adapters as adapters_mod
from vlmpool.sim import contract
from vlmpool.sim import schema as schema_mod
from vlmpool.sim.engine import Engine, Seq

ENGINE_KEY: web.AppKey[Engine] = web.AppKey("engine", Engine)


@dataclass
class Faults:
    """Run-time fault switches (``POST /sim/faults``, or ``--fault-*`` flags)."""

    fail_next_loads: int = 0          # next N load_lora_adapter calls answer 500
    fail_next_requests: int = 0       # next N generation requests answer 500 (engine error)
    close_next: int = 0               # next N generation requests: connection closed, no answer
    stall_seconds: float = 0.0        # every generation stalls this long once admitted (ended early
                                      # by any POST /sim/faults)
    moderation_phrase: str | None = None  # prompt containing it (case-insensitive) → 400
    unhealthy: bool = False           # /health answers 503

    def update(self, data: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown fault switch(es): {', '.join(unknown)}; known: {', '.join(known)}")
        for key, value in data.items():
            current = getattr(self, key)
            if key == "moderation_phrase":
                if value is not None and not isinstance(value, str):
                    raise ValueError("moderation_phrase must be a string or null")
                setattr(self, key, value or None)
            elif isinstance(current, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be a boolean")
                setattr(self, key, value)
            elif isinstance(current, int):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative integer")
                setattr(self, key, value)
            else:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative number")
                setattr(self, key, float(value))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SimConfig:
    model: str
    served_model_name: str | list[str] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    enable_lora: bool = False
    # None: read VLLM_ALLOW_RUNTIME_LORA_UPDATING from the environment, as vLLM does.
    runtime_lora: bool | None = None
    max_loras: int = 4
    max_cpu_loras: int | None = None  # None: = max_loras (vLLM's default)
    max_lora_rank: int = 64
    max_num_seqs: int = 256
    max_model_len: int = 32768
    ttft_ms: float = 20.0
    tpot_ms: float = 2.0
    lora_load_ms: float = 0.0
    family: str = "auto"  # auto: from the model name (Qwen3-VL → qwen3_vl, ...), else qwen2_5_vl
    strict_layout: bool = True
    # "load": refuse A/B shapes that do not fit at load (a labelled sim extra); "first-use": load them (200)
    # and fail the first request that uses them by killing the engine, as vLLM's set_lora does
    lora_shape_check: str = "load"
    image_tokens: int = 64
    lora_modules: list[tuple[str, str]] = field(default_factory=list)  # static, loaded at start
    api_key: str | None = None
    enable_request_id_headers: bool = False
    faults: Faults = field(default_factory=Faults)

    def served_names(self) -> list[str]:
        if self.served_model_name is None:
            return [self.model]
        if isinstance(self.served_model_name, str):
            return [self.served_model_name]
        return list(self.served_model_name) or [self.model]

    def check(self) -> None:
        if self.max_lora_rank not in contract.MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {contract.MAX_LORA_RANKS}, got {self.max_lora_rank}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras ({self.max_loras}) must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.lora_shape_check not in adapters_mod.SHAPE_CHECKS:
            raise ValueError(f"lora_shape_check must be one of {adapters_mod.SHAPE_CHECKS}")
        if self.ttft_ms < 0 or self.tpot_ms < 0 or self.lora_load_ms < 0:
            raise ValueError("latencies must be >= 0")
        adapters_mod.family(self.resolved_family())

    def resolved_family(self) -> str:
        return adapters_mod.detect_family(self.model) if self.family == "auto" else self.family


# ---- small helpers ---------------------------------------------------------------------------------

def _json_response(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def _error(pair: tuple[int, str]) -> web.Response:
    return _json_response(*pair)


_WORD = re.compile(r"\S+")
_PIECE = re.compile(r"\s*\S+")


def _count_words(text: str) -> int:
    return len(_WORD.findall(text))


class RequestError(Exception):
    def __init__(self, pair: tuple[int, str]) -> None:
        super().__init__(pair[1])
        self.pair = pair


_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise RequestError(contract.bad_request("Invalid data URL: expected 'data:<mime>;base64,<data>'"))
    mime = header[5:].split(";", 1)[0]
    if ";base64" not in header:
        raise RequestError(contract.bad_request("Invalid data URL: only base64 data URLs are supported"))
    if not mime.startswith("image/"):
        raise RequestError(contract.bad_request(f"Invalid image data URL: media type {mime!r} is not an image"))
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(contract.bad_request(f"Failed to decode base64 image data: {e}")) from None
    if not (data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        raise RequestError(contract.bad_request("Failed to load image: cannot identify image file"))
    return data


@dataclass
class Prompt:
    tokens: int
    images: int
    text: str  # the text the moderation fault looks at
    echo: str  # the last user text, echoed into the answer


def _chat_prompt(messages: Any, image_tokens: int) -> Prompt:
    if not isinstance(messages, list) or not messages:
        raise RequestError(contract.bad_request("'messages' must be a non-empty list", param="messages"))
    tokens, images = 0, 0
    texts: list[str] = []
    last_user = ""
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise RequestError(contract.bad_request(f"messages[{i}] must be an object with a 'role'",
                                                    param="messages"))
        tokens += 4
        content = msg.get("content")
        parts: list[str] = []
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise RequestError(contract.bad_request(f"messages[{i}].content[{j}] must be an object"))
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise RequestError(contract.bad_request(f"messages[{i}].content[{j}].text must be a string"))
                    parts.append(part["text"])
                elif kind in ("image_url", "video_url"):
                    ref = part.get(kind)
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise RequestError(contract.bad_request(f"messages[{i}].content[{j}].{kind}.url is required"))
                    if kind == "image_url" and url.startswith("data:"):
                        _decode_data_url(url)
                    images += 1
                    tokens += image_tokens
                else:
                    raise RequestError(contract.bad_request(f"Unknown part type: {kind}"))
        elif content is not None:
            raise RequestError(contract.bad_request(f"messages[{i}].content must be a string or a list"))
        text = " ".join(parts)
        tokens += _count_words(text)
        texts.append(text)
        if msg.get("role") == "user":
            last_user = text
    return Prompt(tokens=tokens, images=images, text="\n".join(texts), echo=last_user)


# ---- the application ---------------------------------------------------------------------------------

class SimServer:
    def __init__(self, config: SimConfig) -> None:
        config.check()
        self.config = config
        self.names = config.served_names()
        self.base_name = self.names[0]
        self.faults = config.faults
        self.runtime_lora = (config.runtime_lora if config.runtime_lora is not None
                             else contract.env_flag(os.environ.get(contract.RUNTIME_LORA_ENV)))
        self.engine = Engine(
            model_name=self.base_name, max_num_seqs=config.max_num_seqs, max_loras=config.max_loras,
            max_cpu_loras=config.max_cpu_loras or config.max_loras, max_lora_rank=config.max_lora_rank,
            family=config.resolved_family(), strict_layout=config.strict_layout, enable_lora=config.enable_lora,
            lora_load_ms=config.lora_load_ms, shape_check=config.lora_shape_check)
        self.created = int(time.time())
        self._stall_release = asyncio.Event()

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
            return _error(e.pair)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(contract.bad_request(
                "Unsupported Media Type: Only 'application/json' is allowed"))
        try:
            data = await request.json(loads=json.loads)
        except ValueError as e:
            raise RequestError(contract.bad_request(f"JSON decode error: {e}")) from None
        if not isinstance(data, dict):
            raise RequestError(contract.bad_request("Input should be a valid dictionary"))
        return data

    # -- info routes

    async def health(self, request: web.Request) -> web.Response:
        if self.faults.unhealthy or self.engine.dead:
            return web.Response(status=503)
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "vlmpool-sim", "vllm_contract": contract.VLLM_CONTRACT})

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.engine.prometheus(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _permission(self) -> dict[str, Any]:
        return {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
                 "root": self.config.model, "parent": None,
                 "max_model_len": self.config.max_model_len, "permission": [self._permission()]}
                for name in self.names]
        for reg in self.engine.registered.values():
            data.append({"id": reg.name, "object": "model", "created": int(reg.loaded_at),
                         "owned_by": "vllm", "root": reg.path, "parent": self.base_name,
                         "max_model_len": None, "permission": [self._permission()]})
        return web.json_response({"object": "list", "data": data})

    # -- runtime LoRA

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        for key in ("lora_name", "lora_path"):
            if key not in body:
                return _error(contract.bad_request(
                    f"1 validation error for LoadLoRAAdapterRequest\n{key}\n  Field required"))
            if not isinstance(body[key], str):
                return _error(contract.bad_request(
                    f"1 validation error for LoadLoRAAdapterRequest\n{key}\n  Input should be a valid string"))
        name, path = body["lora_name"], body["lora_path"]
        load_inplace = bool(body.get("load_inplace", False))
        engine = self.engine
        async with engine.lock_for(name):
            if not name or not path:
                return _error(contract.lora_missing_fields())
            if name in self.names:
                return _error(contract.lora_conflicts_with_base(name))
            if not load_inplace and name in engine.registered:
                return _error(contract.lora_already_loaded(name))
            if self.faults.fail_next_loads > 0:
                self.faults.fail_next_loads -= 1
                return _error(contract.engine_utility_failure(
                    "add_lora", "simulated load failure (vlmpool sim fault: fail_next_loads)"))
            if not self.config.enable_lora:
                return _error(contract.engine_utility_failure(
                    "add_lora", "LoRA is not enabled. Use --enable-lora to enable LoRA."))
            if engine.dead:
                return _error(contract.engine_dead())
            try:
                info = await engine.read_adapter(name, path)
            except adapters_mod.AdapterError as e:
                return _json_response(e.status, e.body)
            engine.register(name, path, info)
        return web.Response(status=200, text=contract.lora_load_success(name))

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        name = body.get("lora_name")
        if name is not None and not isinstance(name, str):
            return _error(contract.bad_request(
                "1 validation error for UnloadLoRAAdapterRequest\nlora_name\n  Input should be a valid string"))
        engine = self.engine
        async with engine.lock_for(name or ""):
            if not name:
                return _error(contract.lora_unload_missing_name())
            if name not in engine.registered:
                return _error(contract.lora_not_found_on_unload(name))
            engine.unregister(name)
        return web.Response(status=200, text=contract.lora_unload_success(name))

    # -- simulator control

    async def get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.as_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        if not isinstance(data, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        try:
            self.faults.update(data)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        # requests stalled under the previous settings go on now
        self._stall_release.set()
        self._stall_release = asyncio.Event()
        return web.json_response(self.faults.as_dict())

    async def forget(self, request: web.Request) -> web.Response:
        forgotten = list(self.engine.registered)
        self.engine.forget()
        return web.json_response({"forgotten": forgotten})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.stats())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.engine.reset_counters()
        return web.json_response(self.engine.stats())

    # -- generation

    def _resolve_model(self, model: Any) -> tuple[str, str | None, str | None]:
        """(response model name, lora name or None, lora path or None) — or 404 as vLLM.

        vLLM answers with ``models.model_name(lora_request)``: the adapter's name, or the *first*
        served name for the base model (also when the request used another alias or no model)."""
        if model is None or model == "" or model in self.names:
            return self.base_name, None, None
        if not isinstance(model, str):
            raise RequestError(contract.bad_request("model must be a string", param="model"))
        reg = self.engine.registered.get(model)
        if reg is None:
            raise RequestError(contract.model_not_found(model))
        return model, reg.name, reg.path

    def _request_id(self, request: web.Request, prefix: str) -> str:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        return f"{prefix}-{rid}"

    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int, chat: bool) -> int:
        value = body.get("max_completion_tokens") if chat else None
        if value is None:
            value = body.get("max_tokens")
        limit = self.config.max_model_len - prompt_tokens
        if limit < 1:
            raise RequestError(contract.bad_request(
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, "
                f"your request has {prompt_tokens} input tokens. Please reduce the length of the input "
                "messages.", param="messages" if chat else "prompt"))
        if value is None:
            return limit
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(contract.bad_request(f"max_tokens must be at least 1, got {value}.",
                                                    param="max_tokens"))
        if value > limit:
            raise RequestError(contract.bad_request(
                f"'max_tokens' or 'max_completion_tokens' is too large: {value}. This model's maximum "
                f"context length is {self.config.max_model_len} tokens and your request has "
                f"{prompt_tokens} input tokens ({value} > {self.config.max_model_len} - {prompt_tokens}).",
                param="max_tokens"))
        return value

    def _answer_text(self, body: dict[str, Any], served: str, lora_path: str | None, images: int,
                     echo: str) -> str:
        tag = f"sim:{served}" + (f" path={lora_path}" if lora_path else "")
        header = f"{tag} images={images}"
        fmt = body.get("response_format")
        json_schema = None
        want_json = False
        if isinstance(fmt, dict):
            kind = fmt.get("type")
            if kind == "json_schema":
                js = fmt.get("json_schema")
                if not isinstance(js, dict):
                    raise RequestError(contract.bad_request(
                        "response_format.json_schema is required for type json_schema", param="response_format"))
                json_schema = js.get("schema", js.get("json_schema", {}))
                want_json = True
            elif kind == "json_object":
                want_json = True
            elif kind not in (None, "text"):
                raise RequestError(contract.bad_request(
                    f"response_format type {kind!r} is not supported", param="response_format"))
        elif fmt is not None:
            raise RequestError(contract.bad_request("response_format must be an object", param="response_format"))
        # vLLM's own structured-output knobs (older guided_json, newer structured_outputs.json)
        if not want_json:
            so = body.get("structured_outputs")
            if isinstance(so, dict) and so.get("json") is not None:
                json_schema, want_json = so["json"], True
            elif body.get("guided_json") is not None:
                json_schema, want_json = body["guided_json"], True
            if isinstance(json_schema, str):
                try:
                    json_schema = json.loads(json_schema)
                except ValueError:
                    raise RequestError(contract.bad_request("guided_json is not valid JSON")) from None
        if want_json:
            if json_schema is None:
                value: Any = {"model": tag, "images": images, "echo": " ".join(echo.split()[:12])}
            else:
                try:
                    value = schema_mod.instance(json_schema, tag)
                except schema_mod.SchemaError as e:
                    raise RequestError(contract.bad_request(
                        f"The provided JSON schema contains features not supported by the simulator: {e}",
                        param="response_format")) from None
            return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
        words = echo.split()[:12]
        return header + (" echo: " + " ".join(words) if words else "")

    def _plan(self, body: dict[str, Any], text: str, max_tokens: int) -> tuple[list[str], str]:
        pieces = _PIECE.findall(text) or [text]
        min_tokens = body.get("min_tokens") or 0
        if body.get("ignore_eos"):
            min_tokens = max_tokens
        if not isinstance(min_tokens, int) or min_tokens < 0:
            raise RequestError(contract.bad_request("min_tokens must be a non-negative integer", param="min_tokens"))
        if min_tokens > max_tokens:
            raise RequestError(contract.bad_request(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.",
                param="min_tokens"))
        i = 0
        while len(pieces) < min_tokens:
            pieces.append(f" tok{i}")
            i += 1
        if len(pieces) > max_tokens or body.get("ignore_eos"):
            return pieces[:max_tokens], "length"  # with ignore_eos only max_tokens ends a sequence
        return pieces, "stop"

    async def _pre_generation(self, request: web.Request) -> None:
        if self.faults.close_next > 0:
            self.faults.close_next -= 1
            _drop_connection(request)
            raise _Dropped()
        if self.faults.fail_next_requests > 0:
            self.faults.fail_next_requests -= 1
            raise RequestError(contract.error_json(
                "simulated engine failure (vlmpool sim fault: fail_next_requests)", "InternalServerError", 500))

    def _moderation(self, prompt_text: str) -> None:
        phrase = self.faults.moderation_phrase
        if phrase and phrase.lower() in prompt_text.lower():
            raise RequestError(contract.error_json(contract.MODERATION_MESSAGE, contract.MODERATION_TYPE, 400))

    async def _admit(self, seq: Seq) -> None:
        engine = self.engine
        if engine.dead:
            raise RequestError(contract.engine_dead())
        await engine.acquire(seq)
        try:
            if seq.lora is not None and seq.lora_path is not None and not engine.cache_touch(seq.lora):
                # Not in the CPU cache (evicted, or unloaded while this request waited): the worker
                # reads it again from the path the request carries. Failing here kills the engine.
                try:
                    info = await engine.read_adapter(seq.lora, seq.lora_path)
                except adapters_mod.AdapterError as e:
                    engine.die(f"re-reading adapter {seq.lora} from {seq.lora_path} failed: {e.reason}")
                    raise RequestError(contract.engine_dead()) from None
                engine.cache_put(seq.lora, info)
            info = engine.cpu_cache.get(seq.lora) if seq.lora is not None else None
            if info is not None and info.first_use_error:
                # vLLM: set_lora copies the tensors into the stacked GPU buffers when a batch first uses
                # the adapter; a shape that does not fit raises in the model step and the engine core dies.
                engine.die(f"adapter {seq.lora} failed at its first use: {info.first_use_error}")
                raise RequestError(contract.engine_dead())
            if self.faults.stall_seconds > 0:
                # A stall ends after stall_seconds, or at once when the faults are changed.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stall_release.wait(), self.faults.stall_seconds)
        except BaseException:
            engine.release(seq)
            raise

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            await self._pre_generation(request)
        except _Dropped:
            return web.Response(status=500)  # never reaches the client: the transport is gone
        body = await self._json_body(request)
        if chat and "messages" not in body:  # request-model validation comes before the model check
            raise RequestError(contract.bad_request(
                "1 validation error for ChatCompletionRequest\nmessages\n  Field required"))
        if not chat and "prompt" not in body:
            raise RequestError(contract.bad_request(
                "1 validation error for CompletionRequest\nprompt\n  Field required"))
        served, lora, lora_path = self._resolve_model(body.get("model"))
        cfg = self.config
        if chat:
            prompts = [_chat_prompt(body["messages"], cfg.image_tokens)]
        else:
            prompts = _completion_prompts(body.get("prompt"))
        for p in prompts:
            self._moderation(p.text)
        stream = bool(body.get("stream", False))
        if body.get("stream_options") is not None and not stream:
            raise RequestError(contract.bad_request("Stream options can only be defined when `stream=True`.",
                                                    param="stream_options"))
        n = body.get("n", 1) or 1
        if not isinstance(n, int) or n < 1:
            raise RequestError(contract.bad_request("n must be at least 1.", param="n"))
        prompt_tokens = sum(p.tokens for p in prompts)
        max_tokens = self._max_tokens(body, max(p.tokens for p in prompts), chat)
        plans = []
        for p in prompts:
            text = self._answer_text(body, lora if lora else self.base_name, lora_path,
                                     p.images, p.echo)
            plans.extend([self._plan(body, text, max_tokens)] * n)

        request_id = self._request_id(request, "chatcmpl" if chat else "cmpl")
        headers = {"X-Request-Id": request.headers["X-Request-Id"]} if (
            cfg.enable_request_id_headers and "X-Request-Id" in request.headers) else None
        seq = Seq(request_id=request_id, lora=lora, lora_path=lora_path)
        await self._admit(seq)
        try:
            if stream:
                return await self._stream(request, seq, chat, served, plans, prompt_tokens, body, headers)
            return await self._whole(seq, chat, served, plans, prompt_tokens, headers)
        finally:
            self.engine.release(seq)

    async def _whole(self, seq: Seq, chat: bool, served: str, plans: list[tuple[list[str], str]],
                     prompt_tokens: int, headers: dict[str, str] | None) -> web.Response:
        cfg = self.config
        longest = max(len(p[0]) for p in plans)
        first_at = None
        reason = "abort"
        generated = sum(len(p[0]) for p in plans)
        try:
            await asyncio.sleep(cfg.ttft_ms / 1000.0)
            first_at = time.monotonic()
            await asyncio.sleep(max(longest - 1, 0) * cfg.tpot_ms / 1000.0)
            reason = plans[0][1]
        finally:
            self.engine.finished(seq, reason=reason, prompt_tokens=prompt_tokens,
                                 generated=generated if reason != "abort" else 0,
                                 first_token_at=first_at, model=served)
        choices = []
        for i, (pieces, finish) in enumerate(plans):
            text = "".join(pieces)
            if chat:
                choices.append({"index": i, "message": {
                    "role": "assistant", "content": text, "refusal": None, "annotations": None,
                    "audio": None, "function_call": None, "tool_calls": [], "reasoning_content": None},
                    "logprobs": None, "finish_reason": finish, "stop_reason": None})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish,
                                "stop_reason": None, "prompt_logprobs": None})
        payload: dict[str, Any] = {
            "id": seq.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": served, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + generated,
                      "completion_tokens": generated, "prompt_tokens_details": None},
        }
        if chat:
            payload.update({"service_tier": None, "system_fingerprint": None, "prompt_logprobs": None,
                            "kv_transfer_params": None})
        else:
            payload.update({"system_fingerprint": None, "kv_transfer_params": None})
        return web.json_response(payload, headers=headers)

    async def _stream(self, request: web.Request, seq: Seq, chat: bool, served: str,
                      plans: list[tuple[list[str], str]], prompt_tokens: int, body: dict[str, Any],
                      headers: dict[str, str] | None) -> web.StreamResponse:
        cfg = self.config
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
        continuous = include_usage and bool(opts.get("continuous_usage_stats")) if isinstance(opts, dict) else False
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                       **(headers or {})})
        await resp.prepare(request)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        generated = 0
        first_at = None
        reason = "abort"
        start = time.monotonic()

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            data: dict[str, Any] = {"id": seq.request_id, "object": obj, "created": created,
                                    "model": served, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        def usage(done: int) -> dict[str, Any]:
            return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + done,
                    "completion_tokens": done}

        try:
            if chat:
                await resp.write(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}
                                        for i in range(len(plans))],
                                       usage(0) if continuous else None))
            longest = max(len(p[0]) for p in plans)
            for step in range(longest):
                due = start + (cfg.ttft_ms + step * cfg.tpot_ms) / 1000.0
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if step == 0:
                    first_at = time.monotonic()
                choices = []
                for i, (pieces, finish) in enumerate(plans):
                    if step >= len(pieces):
                        continue
                    generated += 1
                    last = step == len(pieces) - 1
                    if chat:
                        choices.append({"index": i, "delta": {"content": pieces[step]}, "logprobs": None,
                                        "finish_reason": finish if last else None,
                                        **({"stop_reason": None} if last else {})})
                    else:
                        choices.append({"index": i, "text": pieces[step], "logprobs": None,
                                        "finish_reason": finish if last else None,
                                        **({"stop_reason": None} if last else {})})
                await resp.write(chunk(choices, usage(generated) if continuous else None))
            reason = plans[0][1]
            if include_usage:
                await resp.write(chunk([], usage(generated)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # the client went away mid-stream: vLLM aborts the request
            reason = "abort"
        except asyncio.CancelledError:
            reason = "abort"
            raise
        finally:
            self.engine.finished(seq, reason=reason, prompt_tokens=prompt_tokens, generated=generated,
                                 first_token_at=first_at, model=served)
        return resp


def _completion_prompts(prompt: Any) -> list[Prompt]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        items = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, list) for x in prompt):
        items = list(prompt)
    else:
        raise RequestError(contract.bad_request(
            "prompt must be a string, a list of strings, or token ids", param="prompt"))
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(Prompt(tokens=max(_count_words(item), 1), images=0, text=item, echo=item))
        else:
            out.append(Prompt(tokens=max(len(item), 1), images=0, text="", echo=""))
    return out


class _Dropped(Exception):
    pass


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


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
        server = site._server  # noqa: SLF001 - aiohttp exposes no public accessor for the bound port
        assert server is not None and server.sockets
        host, port = server.sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
