"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``/v1/completions`` (parsed, checked,
then through the pipeline's stages) and ``GET /v1/models`` (the base and the adapters served now)."""

from __future__ import annotations

import time

from aiohttp import web

from .context import CTX, RequestContext
from .engine import EngineHTTPError, EngineUnavailable
from .errors import error_response
from .logs import get_logger
from .pipeline import Pipeline

log = get_logger()

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
MODELS_ROUTE = "/v1/models"


class OpenAIRoutes:
    """The generation routes and the model list, attached to one pipeline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._created = int(time.time())

    def attach(self, app: web.Application) -> None:
        for route in GENERATION_ROUTES:
            app.router.add_post(route, self.handle_generation)
        app.router.add_get(MODELS_ROUTE, self.handle_models)

    async def handle_models(self, request: web.Request) -> web.Response:
        request[CTX].route = MODELS_ROUTE
        try:
            base = await self.pipeline.base.get()
        except (EngineUnavailable, EngineHTTPError) as e:
            base = None
            log.warning("base model unknown and the engine could not tell it", extra={"error": str(e)})
        data = []
        if base:
            data.append({"id": base, "object": "model", "created": self._created, "owned_by": "vlmpool", "root": base,
                         "parent": None})
        registry = self.pipeline.registry
        for served in registry.served_names():
            v = registry.alias.get(served)
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
        return await self.pipeline.within_body_budget(request, lambda: self._generation(request, ctx, route))

    async def _generation(self, request: web.Request, ctx: RequestContext, route: str) -> web.StreamResponse:
        raw: bytearray | None
        payload: dict | None
        read = await self.pipeline.read_json_object(request)
        if isinstance(read, web.Response):
            return read
        raw, payload = read
        del read
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
        return await self.pipeline.dispatch(request, ctx, route, model, *_handed_over(held), stream)


def _handed_over(held: list) -> tuple[dict | None, bytearray | None]:
    """``held``'s (payload, raw), ``held`` emptied: the caller keeps no reference to them."""
    payload, raw = held
    held.clear()
    return payload, raw
