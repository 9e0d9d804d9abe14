"""What the proxy refuses before it trusts input: bodies too large or too slow, JSON too deep or too
large in values, adapter paths outside the adapter root, and clients without an accepted API key.

Memory: a JSON body's parsed size is not bounded by its byte size (``[{},{},…]`` costs ~20x its bytes
as Python dicts), so the number of containers and values is bounded *before* parsing, by counting
structural bytes (an over-estimate: the same bytes inside strings count too; base64 image data has
none of them), and the nesting depth after parsing (Python's own parser gives up at about 1,000
levels with a RecursionError, which is answered the same way).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .errors import error_response, too_large
from .limiter import ByteBudget
from .logs import get_logger

log = get_logger("guard")

MAX_JSON_DEPTH = 64
# per request, the parsed structure then costs at most ~10k x 100 B + 200k x 60 B (~13 MB) beyond the
# strings themselves (a chat body with images has a few dozen containers and values)
MAX_JSON_CONTAINERS = 10_000  # counted as '{' and '[' bytes
MAX_JSON_VALUES = 200_000  # counted as ',' and ':' bytes
# a JSON string (escapes included; possessive: linear time): what lies outside them is the structure
JSON_STRING_RE = re.compile(rb'"[^"\\]*+(?:\\[\s\S][^"\\]*+)*+"')


class InputRefused(ValueError):
    """Input the proxy will not process; ``code`` is the error table's code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def parse_json(raw: bytes | bytearray, *, max_depth: int = MAX_JSON_DEPTH, max_containers: int = MAX_JSON_CONTAINERS,
               max_values: int = MAX_JSON_VALUES, outside_strings: bool = False) -> Any:
    """``json.loads`` with bounds on containers, values and depth (InputRefused otherwise).
    ``outside_strings``: structural bytes inside JSON strings are not counted (exact counts, for a limit
    derived from a number of entries whose strings may hold any of them; costs a copy of the body)."""
    structure = JSON_STRING_RE.sub(b'""', raw) if outside_strings else raw
    if structure.count(b"{") + structure.count(b"[") > max_containers:
        raise InputRefused(f"request body has more than {max_containers} JSON objects/arrays", "json_too_complex")
    if structure.count(b",") + structure.count(b":") > max_values:
        raise InputRefused(f"request body has more than {max_values} JSON values", "json_too_complex")
    del structure
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InputRefused(f"request body nests deeper than {max_depth} levels", "json_too_deep") from None
    except ValueError:
        raise InputRefused("request body is not valid JSON", "invalid_json") from None
    if json_depth(data, max_depth) > max_depth:
        raise InputRefused(f"request body nests deeper than {max_depth} levels", "json_too_deep")
    return data


def json_depth(data: Any, limit: int) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), counted up to ``limit + 1``; iterative."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((c, depth) for c in children if isinstance(c, (dict, list)))
    return deepest


PATH_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\"}  # printable, no space/quote/backslash


def confine_path(path: str, root: str | None) -> str | None:
    """Why ``path`` may not be registered, or None when it is an absolute path of printable characters
    with no ``.``/``..`` component, and (with a ``root``) below ``root`` with no symbolic link anywhere
    below the root (checked with realpath)."""
    if not path.startswith("/"):
        return "must be an absolute path"
    if not PATH_CHARS.issuperset(path):
        return "must consist of printable ASCII characters other than space, quote and backslash"
    if any(part in (".", "..") for part in path.split("/")):
        return "must not contain '.' or '..' components"
    if root is None:
        return None
    root_n = os.path.normpath(root)
    norm = os.path.normpath(path)
    if root_n != "/" and not norm.startswith(root_n + "/"):
        return f"is outside the adapter root {root_n}"
    rel = norm[len(root_n):].lstrip("/")
    if not rel:
        return f"is the adapter root {root_n} itself"
    if os.path.realpath(norm) != os.path.join(os.path.realpath(root_n), rel):
        return f"resolves (through a symbolic link) outside {root_n}/{rel}"
    return None


class ApiKeys:
    """Accepted bearer tokens: the values of the files in a directory (a mounted Secret, one key per
    file). The directory is re-scanned at most every ``recheck_s`` seconds and re-read when a file's
    name, size or mtime changed (Kubernetes swaps a Secret volume's files atomically). A key is
    compared with every accepted token in constant time; no token at all refuses everything."""

    def __init__(self, directory: str, recheck_s: float = 1.0) -> None:
        self.directory = directory
        self.recheck_s = recheck_s
        self._tokens: tuple[bytes, ...] = ()
        self._signature: tuple | None = None
        self._checked = float("-inf")
        self.reload()

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        with os.scandir(self.directory) as it:
            for e in it:
                if e.name.startswith(".") or not e.is_file():  # ..data and friends
                    continue
                st = e.stat()
                out.append((e.name, st.st_size, st.st_mtime_ns))
        return tuple(sorted(out))

    def reload(self) -> None:
        signature = self._scan()
        tokens = []
        for name, size, _ in signature:
            if size > 4096:
                log.warning("API key file ignored: larger than 4 KiB", extra={"file": name})
                continue
            with open(os.path.join(self.directory, name), "rb") as f:
                value = f.read().strip()
            if value:
                tokens.append(value)
        if not tokens:
            log.error("no API key accepted: every request to the public API will be refused",
                      extra={"directory": self.directory})
        elif signature != self._signature and self._signature is not None:
            log.info("API keys re-read", extra={"directory": self.directory, "keys": len(tokens)})
        self._tokens = tuple(tokens)
        self._signature = signature

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return
        self._checked = now
        try:
            if self._scan() != self._signature:
                self.reload()
        except OSError as e:  # keep the last good keys; say so
            log.error("API key directory unreadable; keeping the keys read before", extra={"error": str(e)})

    def accepts(self, authorization: str) -> bool:
        self._maybe_reload()
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        key = given.strip().encode()
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(key, token)
        return ok and bool(key)


class BodyHold:
    """The request-body bytes one request holds in the in-flight body budget, taken as they arrive
    (never by the announced length: an announcement costs nothing) and given back once, when the
    request ends. ``arriving`` (shared by a proxy's holds, oldest first) is the bodies still arriving:
    the oldest may exceed the budget by ``reserve`` (ByteBudget's deadlock rule)."""

    __slots__ = ("arriving", "budget", "held", "reserve", "waited")

    def __init__(self, budget: ByteBudget, arriving: dict[BodyHold, None], reserve: int) -> None:
        self.budget = budget
        self.arriving = arriving
        self.reserve = reserve
        self.held = 0
        self.waited = 0.0  # seconds spent waiting for budget (not the client's time)
        arriving[self] = None

    def _over(self) -> int:
        return self.reserve if self.arriving and next(iter(self.arriving)) is self else 0

    async def take(self, n: int, timeout: float) -> None:
        t0 = time.monotonic()
        try:
            await self.budget.acquire(n, timeout, self._over)
        finally:
            self.waited += time.monotonic() - t0
        self.held += min(n, self.budget.total)

    def arrived(self) -> None:
        """The body is complete (or refused): the next oldest body gets the privilege."""
        if self in self.arriving:
            del self.arriving[self]
            self.budget.release(0)  # wakes a waiter that may be the oldest now

    def release(self) -> None:
        self.arrived()
        held, self.held = self.held, 0
        if held:
            self.budget.release(held)


@dataclass(frozen=True)
class BodyLimits:
    """How a request body must arrive: at most ``max_bytes``, whole within ``timeout`` seconds of the
    client's time, and at least ``min_rate`` bytes/s over every ``rate_window`` seconds (0: no rate)."""

    max_bytes: int
    timeout: float
    min_rate: int = 0
    rate_window: float = 5.0
    budget_timeout: float = 30.0  # waiting for budget memory at most this long per piece (then 429)


def _cut(status: int, message: str, code: str) -> web.Response:
    resp = error_response(status, message, type_="invalid_request_error", code=code)
    resp.force_close()  # the rest of the body is never read
    return resp


async def read_request_body(request: web.Request, limit: int | BodyLimits, timeout: float | None = None, *,
                            hold: BodyHold | None = None,
                            on_cut: Callable[[str], None] | None = None) -> bytearray | web.Response:
    """The whole body, or the response to answer: 413 beyond the byte limit, 408 when it did not
    arrive within the deadline (``request_timeout``) or arrived slower than the minimum rate over a
    window (``body_too_slow``); the connection is then closed. LimiterRejected when the body budget
    stayed full (the caller answers 429). With ``hold``, every piece is taken from the body budget before it is
    kept; time spent waiting for the budget counts neither for the deadline nor for the rate."""
    lim = limit if isinstance(limit, BodyLimits) else BodyLimits(limit, timeout or 60.0)
    announced = request.content_length
    buf = bytearray()  # grown as bytes arrive (never allocated by the announced length)
    got = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    need = lim.min_rate * lim.rate_window
    win_start, win_got = start, 0

    def seen() -> str:
        return f"{got} of {announced} bytes" if announced is not None else f"{got} bytes"

    def cut(status: int, message: str, code: str, reason: str) -> web.Response:
        if on_cut is not None:
            on_cut(reason)
        return _cut(status, message, code)

    def window_need() -> float:  # a small body's rest must arrive within one window
        return min(need, announced - (got - win_got)) if announced is not None else need

    while True:
        deadline = start + (hold.waited if hold is not None else 0.0) + lim.timeout
        win_end = win_start + lim.rate_window if need else deadline
        try:
            async with asyncio.timeout_at(min(deadline, win_end)):
                chunk = await request.content.readany()
        except TimeoutError:
            now = loop.time()
            if now >= deadline - 1e-3:
                return cut(408, f"request body not received within {lim.timeout:g}s ({seen()})", "request_timeout",
                           "body_timeout")
            if win_got < window_need():
                return cut(408, f"request body arrives slower than {lim.min_rate} bytes/s (got {win_got} bytes in "
                           f"{lim.rate_window:g}s; {seen()})", "body_too_slow", "body_too_slow")
            win_start, win_got = now, 0
            continue
        if not chunk:
            if hold is not None:
                hold.arrived()
            break
        n = len(chunk)
        if got + n > lim.max_bytes:
            return too_large(lim.max_bytes)
        if hold is not None:  # LimiterRejected (the budget stayed full) goes to the caller: 429
            before = hold.waited
            await hold.take(n, lim.budget_timeout)
            win_start += hold.waited - before
        buf += chunk
        got += n
        win_got += n
        now = loop.time()
        if need and now >= win_start + lim.rate_window:
            if win_got < window_need():
                return cut(408, f"request body arrives slower than {lim.min_rate} bytes/s (got {win_got} bytes in "
                           f"{lim.rate_window:g}s; {seen()})", "body_too_slow", "body_too_slow")
            win_start, win_got = now, 0
    return buf
