"""The operator's admin API: ``PUT /admin/v1/state`` (declarative, idempotent, generation-gated,
asynchronous: accepted at once with 202, the registry converges in the background) and
``GET /admin/v1/state`` (what is, per adapter; a long poll with ``?wait=``), behind a bearer token.
Input is refused before it reaches the registry: bounded JSON, an int64 generation, adapter paths
confined to the adapter root."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from vlmpool.adminwire import MAX_ADAPTERS, DesiredState, max_state_bytes
from vlmpool.names import served_name_refusal

from .context import CTX
from .engine import EngineHTTPError, EngineUnavailable
from .errors import error_response
from .guard import InputRefused, confine_path, parse_json, read_request_body
from .logs import get_logger
from .state import AdapterRegistry

log = get_logger()

# the push's limits, all derived from MAX_ADAPTERS: a state of MAX_ADAPTERS entries of the largest form
# fits every one of them, one entry more is refused with too_many_adapters (and nothing else first)
ADMIN_MAX_BODY_BYTES = max_state_bytes(MAX_ADAPTERS + 1)
ADMIN_MAX_JSON_DEPTH = 8  # {adapters: [{name: ...}]} is 3 deep
# JSON containers / values counted before parsing, outside strings (a name, path or refused version
# may hold any structural byte): per entry 1 container ("{") and 6 values (3 ":" and 3 ","), plus the
# state's own few
ADMIN_MAX_CONTAINERS = 4 + (MAX_ADAPTERS + 1) * 1
ADMIN_MAX_VALUES = 16 + (MAX_ADAPTERS + 1) * 6
MAX_WAIT_SECONDS = 60.0


def _query_number(request: web.Request, key: str, upper: float) -> float | None:
    """A non-negative number query parameter (at most `upper`); None when absent. ValueError when bad."""
    raw = request.query.get(key)
    if raw is None:
        return None
    value = float(raw)
    if not 0 <= value <= upper:
        raise ValueError(f"{key} must be between 0 and {upper:g}")
    return value


class AdminAPI:
    def __init__(self, registry: AdapterRegistry, token: str, *, base_model: Callable[[], Awaitable[str | None]],
                 adapter_root: str | None, body_timeout: float) -> None:
        self.registry = registry
        self._token = token.encode()
        self._base_model = base_model
        self.adapter_root = adapter_root
        self.body_timeout = body_timeout

    def attach(self, app: web.Application) -> None:
        app.router.add_get("/admin/v1/state", self.handle_get_state)
        app.router.add_put("/admin/v1/state", self.handle_put_state)

    @web.middleware
    async def auth(self, request: web.Request, handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            log.warning("admin request refused: bad or missing bearer token", extra={"path": request.path})
            return error_response(
                401, "missing or invalid bearer token", type_="authentication_error", code="invalid_token",
                headers={"WWW-Authenticate": 'Bearer realm="vlmpool-proxy-admin"'},
            )
        return await handler(request)

    async def handle_get_state(self, request: web.Request) -> web.Response:
        try:
            wait = _query_number(request, "wait", MAX_WAIT_SECONDS)
            gen = _query_number(request, "generation", 2**63 - 1)
        except ValueError as e:
            return error_response(400, f"invalid query: {e}", type_="invalid_request_error", code="invalid_query")
        if wait:
            await self.registry.wait_converged(int(gen) if gen is not None else None, wait)
        return web.json_response(self.registry.snapshot())

    async def handle_put_state(self, request: web.Request) -> web.Response:
        try:
            wait = _query_number(request, "wait", MAX_WAIT_SECONDS)
        except ValueError as e:
            return error_response(400, f"invalid query: {e}", type_="invalid_request_error", code="invalid_query")
        raw = await read_request_body(request, ADMIN_MAX_BODY_BYTES, self.body_timeout)
        if isinstance(raw, web.Response):
            return raw
        try:
            data = parse_json(raw, max_depth=ADMIN_MAX_JSON_DEPTH, max_containers=ADMIN_MAX_CONTAINERS,
                              max_values=ADMIN_MAX_VALUES, outside_strings=True)
        except InputRefused as e:
            return error_response(400, str(e), type_="invalid_request_error", code=e.code)
        del raw
        entries = data.get("adapters") if isinstance(data, dict) else None
        if isinstance(entries, list) and len(entries) > MAX_ADAPTERS:
            return error_response(400, f"invalid state: {len(entries)} adapters, at most {MAX_ADAPTERS}",
                                  type_="invalid_request_error", code="too_many_adapters", param="adapters")
        try:
            state = DesiredState.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in e.errors()
            )
            return error_response(400, f"invalid state: {problems[:2000]}", type_="invalid_request_error",
                                  code="invalid_state")
        for a in state.adapters:
            problem = confine_path(a.path, self.adapter_root)
            if problem:
                return error_response(400, f"invalid state: adapters[{a.name!r}].path {problem}",
                                      type_="invalid_request_error", code="invalid_path", param="adapters.path")
        base = None
        try:
            base = await self._base_model()
        except (EngineUnavailable, EngineHTTPError):
            pass  # unknown for now; the apply goes on (loads will report the engine's state)
        clash = [why for a in state.adapters if (why := served_name_refusal(a.name, base))]
        if clash:
            return error_response(400, f"invalid state: {clash[0]}", type_="invalid_request_error",
                                  code="invalid_state")
        # an entry whose version is not of the patcher's form is refused alone: the others converge
        refused = {a.name: why for a in state.adapters if (why := a.version_problem())}
        if refused:
            log.warning("pushed adapters refused", extra={"refused": dict(list(refused.items())[:20])})
        if not self.registry.apply(state, request[CTX].request_id, refused):
            return web.json_response(self.registry.snapshot(), status=409)
        if wait:
            await self.registry.wait_converged(state.generation, wait)
        # 202: accepted, converging in the background; 200: converged already (within ?wait=)
        converged = self.registry.converged(state.generation)
        return web.json_response(self.registry.snapshot(), status=200 if converged else 202)
