"""What one request every proxy route shares: its context (request id, route, model, timings)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .guard import BodyHold
from .state import LoadedVersion


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
    body_hold: BodyHold | None = None  # the body bytes it holds in the in-flight body budget


CTX = web.RequestKey("vlmpool_request", RequestContext)
