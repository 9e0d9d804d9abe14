"""The proxy's error table: every error answer, and how an engine answer >= 400 becomes one (the one
place, as vLLM's ``create_error_response``).

Every error body carries the same facts twice: OpenAI's ``{"error": {message, type, param, code, ...}}``
(what the openai SDK reads) and trio-core's ``{"detail": {kind, upstream_status, moderated, message}}``
(what trio clients read; ``kind`` is the error's code, ``upstream_status`` the engine's status or null).
"""

from __future__ import annotations

import json

from aiohttp import web

from .engine import EngineProtocolError, EngineTimeout, EngineUnavailable, parse_error_body

UPSTREAM_MESSAGE_CHARS = 300
MODERATION_MARKERS = ("data_inspection_failed", "inappropriate")

def error_response(
    status: int, message: str, *, type_: str, code: str | None, param: str | None = None,
    headers: dict[str, str] | None = None, **extra: object,
) -> web.Response:
    return web.Response(body=json.dumps(error_body(message, type_=type_, code=code, param=param, **extra)).encode(),
                        status=status, content_type="application/json", headers=headers)


def error_body(message: str, *, type_: str, code: str | None, param: str | None = None,
               **extra: object) -> dict[str, object]:
    """``{"error": ..., "detail": ...}``: the OpenAI and the trio shape of one error, same facts."""
    err: dict[str, object] = {"message": message, "type": type_, "param": param, "code": code}
    err.update(extra)
    upstream = extra.get("upstream_status")
    detail = {"kind": code or type_, "upstream_status": upstream if isinstance(upstream, int) else None,
              "moderated": extra.get("moderated") is True, "message": message}
    return {"error": err, "detail": detail}

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

def unavailable_response(e: EngineUnavailable, timeout: float | None = None) -> web.Response:
    """503 for an engine that could not answer (a timeout is told as the limit that ran out); 502 for
    an answer that breaks HTTP framing."""
    message = f"engine timed out after {timeout:g}s" if isinstance(e, EngineTimeout) and timeout else str(e)
    if isinstance(e, EngineProtocolError):  # a broken answer: 502, not retried after a second
        return error_response(502, message[:UPSTREAM_MESSAGE_CHARS], type_="engine_error", code=e.code)
    return error_response(503, message[:UPSTREAM_MESSAGE_CHARS], type_="engine_error", code=e.code,
                          headers={"Retry-After": "1"})

def too_large(limit: int) -> web.Response:
    resp = error_response(413, f"request body larger than {limit} bytes", type_="invalid_request_error",
                          code="request_too_large")
    resp.force_close()
    return resp

def answer_too_large(limit: int) -> web.Response:
    """The engine's (non-streaming) answer is larger than --max-answer-bytes: not relayed (memory)."""
    return error_response(502, f"engine answer larger than {limit} bytes (the proxy's --max-answer-bytes); "
                          "ask for a streamed answer or fewer tokens", type_="engine_error",
                          code="engine_answer_too_large")


def model_not_found(model: str) -> web.Response:
    return error_response(404, f"The model `{model}` does not exist.", type_="invalid_request_error",
                          code="model_not_found", param="model")

def http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status, f"http_{status}")



def adapter_unavailable(message: str) -> web.Response:
    return error_response(503, message[:UPSTREAM_MESSAGE_CHARS], type_="engine_error", code="adapter_unavailable",
                          param="model", headers={"Retry-After": "5"})


def adapter_failed(why: str, upstream_status: int) -> web.Response:
    """The engine died at an adapter version's first use (the model step that ran it failed; vLLM 0.32 refuses
    tensors that do not fit at load, so this is a guard for other step failures): 502, no Retry-After — the
    version is out of routing."""
    return error_response(502, why[:UPSTREAM_MESSAGE_CHARS], type_="engine_error", code="adapter_failed",
                          param="model", upstream_status=upstream_status)
