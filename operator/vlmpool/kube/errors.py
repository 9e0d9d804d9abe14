"""The apiserver's answers as exception types, classified in one place.

:func:`classify` turns a non-2xx answer into one subclass of :class:`ApiError`, so that callers write
``except NotFound:`` or ``except Conflict:`` instead of comparing status codes (the pattern of kopf's
``_cogs/clients/errors.py``). Transport failures (connection refused or reset, timeouts) become
:class:`ApiUnavailable`, chained ``from`` the aiohttp or asyncio error. Which answers are retried, and
after how long, is :func:`retry_delay`'s decision; :class:`vlmpool.kube.client.KubeClient.request` is the
only caller.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import random

# What a log line or an error message keeps of an answer's body (an apiserver can answer megabytes).
BODY_CHARS = 2000


class ApiError(Exception):
    """A failed API call: ``status`` is the HTTP status (0 when no answer came), ``reason`` the
    apiserver's Status reason (``NotFound``, ``AlreadyExists``, ``Conflict``, ``Forbidden``…)."""

    def __init__(self, status: int, reason: str, message: str, method: str = "", path: str = "",
                 retry_after: float | None = None):
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class BadRequest(ApiError):
    """400: the request is malformed (a bad selector, an unparsable patch)."""


class Unauthorized(ApiError):
    """401: the credentials were refused (expired or revoked token)."""


class Forbidden(ApiError):
    """403: authenticated, but RBAC (or an admission policy) refuses the verb."""


class NotFound(ApiError):
    """404: the object (or its namespace, or the resource type) does not exist."""


class Conflict(ApiError):
    """409: AlreadyExists on create, or a stale resourceVersion on update (optimistic lock lost)."""


class Gone(ApiError):
    """410: an expired list continuation or watch resourceVersion."""


class Invalid(ApiError):
    """422: the object fails validation (schema, CEL rules, immutable fields)."""


class TooManyRequests(ApiError):
    """429: throttled by API Priority and Fairness (or an eviction budget); ``retry_after`` says when."""


class ServerError(ApiError):
    """5xx: the apiserver (or a webhook or etcd behind it) failed or timed out."""


class ApiUnavailable(ApiError):
    """No answer at all: connection refused or reset, TLS failure, client-side timeout."""


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                         409: Conflict, 410: Gone, 422: Invalid, 429: TooManyRequests}


def classify(status: int, body: str, *, http_reason: str = "", method: str = "", path: str = "",
             retry_after: str | None = None) -> ApiError:
    """The error for one non-2xx answer. ``body`` is the apiserver's Status object when it sent one."""
    reason, message = http_reason, body[:BODY_CHARS]
    try:
        st = json.loads(body)
        if isinstance(st, dict):
            reason = str(st.get("reason") or reason)
            message = str(st.get("message") or message)[:BODY_CHARS]
    except ValueError:
        pass
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(status, reason, message, method, path, parse_retry_after(retry_after))


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


# Methods that may be sent twice without a different outcome (RFC 9110 §9.2.2), plus server-side apply.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})


def retry_delay(err: ApiError, attempt: int, *, idempotent: bool, base: float = 0.2,
                cap: float = 10.0) -> float | None:
    """Seconds to wait before trying the request again after `err`, or None not to retry.

    - 429 and 5xx with a Retry-After: the apiserver did not act on the request and says when to come
      back (API Priority and Fairness, a busy etcd), so every verb is retried after that long (capped).
    - 5xx without Retry-After and :class:`ApiUnavailable` (timeouts, resets): the request may have been
      carried out, so only idempotent requests are retried, with jittered exponential backoff.
    - Everything else (4xx) is an answer, not a hiccup: no retry.
    """
    if isinstance(err, (TooManyRequests, ServerError)) and err.retry_after is not None:
        return min(cap, err.retry_after)
    if isinstance(err, TooManyRequests) or (idempotent and isinstance(err, (ServerError, ApiUnavailable))):
        return min(cap, base * 2 ** attempt) * (0.5 + random.random() / 2)
    return None
