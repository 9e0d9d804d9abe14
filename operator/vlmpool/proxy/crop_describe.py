"""``POST /v1/vlmpool/crop-describe``: trio-core's single-call zoom-panel endpoint on a pool (seed notes
§2.7, the request and response fields and limits of trio's CropDescribeRequest/Response).

The frame arrives as base64 JPEG/PNG with trio's detections; up to ``max_crops`` of them become lettered
zoom panels composed beside the frame into ONE image (crops.py, on the CPU, at most COMPOSE_SLOTS frames
decoded at once, before an engine slot is taken); then exactly one chat call to the pool's base model or
a desired adapter, through the same body budget, limiter, adapter routing, self-heal, error table and
request id as /v1/chat/completions. The answer's think blocks are stripped (or split off as
``thinking``), its ``CROPS:`` lines become per-panel descriptions; with ``response_format`` the model's
JSON object is returned unchanged as ``entities``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .context import CTX, RequestContext
from .crops import (
    DEFAULT_MAX_CROPS,
    MAX_CROPS,
    CropInputError,
    Detection,
    Panel,
    composite_uri,
    decode_frame,
    parse_detections,
    select_panels,
)
from .crops_text import build_prompt, crop_lines, describe, split_thinking
from .engine import EngineHTTPError, EngineUnavailable
from .errors import error_response, map_engine_error, unavailable_response
from .pipeline import Pipeline

ROUTE = "/v1/vlmpool/crop-describe"
ENGINE_ROUTE = "/v1/chat/completions"
MAX_SCENE_PROMPT_CHARS = 32_768  # trio #67
MAX_MODEL_CHARS = 128
MAX_TOKENS = 16_384
DEFAULT_MAX_TOKENS = 512  # trio's TRIO_MAX_TOKENS, roboflow's default max_new_tokens
COMPOSE_SLOTS = 2  # frames decoded and composed at once (each up to 4096x4096 RGB, ~50 MB, ~3x while composing)
# what the proxy itself sets in the engine request; extra_body may not override them
OWNED_KEYS = frozenset({"model", "messages", "stream", "stream_options", "n", "response_format", "max_tokens",
                        "max_completion_tokens"})


@dataclass
class CropRequest:
    image_b64: Any
    detections: list[Detection]
    max_crops: int
    scene_prompt: str
    response_format: dict | None
    model: str | None
    max_tokens: int
    extra_body: dict
    enable_thinking: bool | None


def _bad(message: str, code: str = "invalid_request", param: str | None = None) -> CropInputError:
    return CropInputError(message, code, param)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_request(body: dict[str, Any]) -> CropRequest:
    """The request's fields checked (the image itself is decoded later, off the event loop)."""
    max_crops = body.get("max_crops", DEFAULT_MAX_CROPS)
    if not _int(max_crops) or not 0 <= max_crops <= MAX_CROPS:
        raise _bad(f"`max_crops` must be an integer from 0 to {MAX_CROPS} (got {json.dumps(max_crops)[:40]})",
                   "invalid_max_crops", "max_crops")
    scene = body.get("scene_prompt") or ""
    if not isinstance(scene, str) or len(scene) > MAX_SCENE_PROMPT_CHARS:
        raise _bad(f"`scene_prompt` must be a string of at most {MAX_SCENE_PROMPT_CHARS} characters",
                   param="scene_prompt")
    fmt = body.get("response_format")
    if fmt is not None and not isinstance(fmt, dict):
        raise _bad("`response_format` must be an object (OpenAI's structured-output spec) or null",
                   param="response_format")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS):
        raise _bad(f"`model` must be a non-empty string of at most {MAX_MODEL_CHARS} characters", "invalid_model",
                   "model")
    max_tokens = body.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if not _int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS:
        raise _bad(f"`max_tokens` must be an integer from 1 to {MAX_TOKENS}", param="max_tokens")
    extra = body.get("extra_body") or {}
    if not isinstance(extra, dict):
        raise _bad("`extra_body` must be an object", param="extra_body")
    owned = sorted(OWNED_KEYS & set(extra))
    if owned:
        raise _bad(f"`extra_body` may not set {', '.join(owned)} (crop-describe sets them)", param="extra_body")
    thinking = body.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise _bad("`enable_thinking` must be a boolean or null", param="enable_thinking")
    return CropRequest(body.get("image_b64"), parse_detections(body.get("crops")), max_crops, scene,
                       fmt, model, max_tokens, extra, thinking)


class CropDescribe:
    """The route's handler, attached to the proxy's pipeline: its body admission, the model, engine
    admission, routing and forwarding are the pipeline's, the image and text work is this route's."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self._slots = asyncio.Semaphore(COMPOSE_SLOTS)

    def attach(self, app: web.Application) -> None:
        app.router.add_post(ROUTE, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ctx = request[CTX]
        ctx.route = ROUTE
        if not self.config.crop_describe:
            return error_response(404, "crop-describe is turned off for this pool (spec.proxy.cropDescribe: false)",
                                  type_="invalid_request_error", code="crop_describe_disabled")
        return await self.pipeline.within_body_budget(request, lambda: self._run(request, ctx))

    async def _run(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        read = await self.pipeline.read_json_object(request)
        if isinstance(read, web.Response):
            return read
        body = read[1]
        del read
        try:
            req = parse_request(body)
        except CropInputError as e:
            return _refused(e)
        body.clear()  # the image's text lives on in req only until it is decoded
        if req.model is None:
            try:
                req.model = await self.pipeline.base.get()
            except EngineUnavailable as e:
                return unavailable_response(e)
            except EngineHTTPError as e:
                return map_engine_error(e.status, e.body)
            if req.model is None:
                return unavailable_response(EngineUnavailable("the engine serves no base model"))
        ctx.model = req.model
        async with self._slots:  # bounded memory: decoded frames
            try:
                uri, panels = await asyncio.to_thread(_image, req)
            except CropInputError as e:
                return _refused(e)
        t0 = time.perf_counter()
        payload = self._payload(req, uri, build_prompt(req.scene_prompt, panels, req.detections,
                                                       req.response_format is not None))
        del uri
        resp = await self.pipeline.dispatch(request, ctx, ENGINE_ROUTE, req.model, payload, None, False, relay=False)
        if resp.status != 200 or not isinstance(resp, web.Response):
            return resp  # an error answer, already in the error table's shape
        return self._answer(req, panels, resp, t0)

    def _payload(self, req: CropRequest, uri: str, prompt: str) -> dict[str, Any]:
        payload: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0}
        payload.update(req.extra_body)
        payload.update(model=req.model, max_tokens=req.max_tokens, stream=False, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": prompt}]}])
        if req.response_format is not None:
            payload["response_format"] = req.response_format
        if req.enable_thinking is not None and self.config.thinking == "switch":
            kwargs = payload.get("chat_template_kwargs")
            payload["chat_template_kwargs"] = {**(kwargs if isinstance(kwargs, dict) else {}),
                                               "enable_thinking": req.enable_thinking}
        return payload

    def _answer(self, req: CropRequest, panels: list[Panel], resp: web.Response, t0: float) -> web.Response:
        try:
            answer = json.loads(resp.body)  # type: ignore[arg-type]  # bytes: set by the forwarder
            message = answer["choices"][0]["message"]
            content = message.get("content") or ""
            reasoning = message.get("reasoning") or message.get("reasoning_content")
            if not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return error_response(502, "the engine's answer is not a chat completion", type_="engine_error",
                                  code="engine_bad_answer")
        prefilled = self.config.thinking == "switch" and req.enable_thinking is not False
        thinking, text = split_thinking(content, prefilled)
        if isinstance(reasoning, str) and reasoning.strip():  # the engine's reasoning parser split it off
            thinking = reasoning.strip()
        said = crop_lines(text, panels)
        description, entities = describe(text, req.response_format is not None)
        out: dict[str, Any] = {
            "description": description,
            "entities": entities,
            "crop_descriptions": [said[p.label] for p in panels if p.label in said],
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
            "model": req.model,
            "panels": [{"label": p.label, "class": p.det.cls, "confidence": p.det.confidence, "bbox": list(p.det.box),
                        "track_id": p.det.track_id, "description": said.get(p.label)} for p in panels],
            "text": text,
            "usage": answer.get("usage"),
        }
        if req.enable_thinking:
            out["thinking"] = thinking
        headers = {}
        if "X-Vlmpool-Served-By" in resp.headers:
            headers["X-Vlmpool-Served-By"] = resp.headers["X-Vlmpool-Served-By"]
        return web.json_response(out, headers=headers)


def _image(req: CropRequest) -> tuple[str, list[Panel]]:
    """(data URI the engine gets, panels): decode, select, compose. Runs in a worker thread."""
    frame = decode_frame(req.image_b64)
    req.image_b64 = None
    panels = select_panels(req.detections, req.max_crops, *frame.image.size)
    return composite_uri(frame, panels), panels


def _refused(e: CropInputError) -> web.Response:
    return error_response(400, str(e), type_="invalid_request_error", code=e.code, param=e.param)
