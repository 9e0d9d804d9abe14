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
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from .errors import error_response, too_large
from .logs import get_logger

log = get_logger("guard")

MAX_JSON_DEPTH = 64
# per request, the parsed structure then costs at most ~10k x 100 B + 200k x 60 B (~13 MB) beyond the
# strings themselves (a chat body with images has a few dozen containers and values)
MAX_JSON_CONTAINERS = 10_000  # counted as '{' and '[' bytes
MAX_JSON_VALUES = 200_000  # counted as ',' and ':' bytes


class InputRefused(ValueError):
    """Input the proxy will not process; ``code`` is the error table's code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def parse_json(raw: bytes | bytearray, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with bounds on containers, values and depth (InputRefused otherwise)."""
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_CONTAINERS:
        raise InputRefused(f"request body has more than {MAX_JSON_CONTAINERS} JSON objects/arrays", "json_too_complex")
    if raw.count(b",") + raw.count(b":") > MAX_JSON_VALUES:
        raise InputRefused(f"request body has more than {MAX_JSON_VALUES} JSON values", "json_too_complex")
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


def confine_path(path: str, root: str) -> str | None:
    """Why ``path`` may not be registered, or None when it is an absolute path below ``root`` with no
    ``.``/``..`` component and no symbolic link anywhere below the root (checked with realpath)."""
    if not path.startswith("/"):
        return "must be an absolute path"
    if any(part in (".", "..") for part in path.split("/")):
        return "must not contain '.' or '..' components"
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


async def read_request_body(request: web.Request, limit: int, timeout: float) -> bytearray | web.Response:
    """The whole body within ``timeout`` seconds and ``limit`` bytes, or the 408/413 to answer (the
    connection is then closed: the rest of the body is never read)."""
    announced = request.content_length
    # announced length: one buffer of that size, filled in place (no re-allocation copies)
    buf = bytearray(announced if announced is not None and announced <= limit else 0)
    got = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                n = len(chunk)
                if got + n > limit:
                    return too_large(limit)
                if got + n <= len(buf):
                    buf[got:got + n] = chunk
                else:
                    del buf[got:]
                    buf += chunk
                got += n
    except TimeoutError:
        seen = f"{got} of {announced} bytes" if announced is not None else f"{got} bytes"
        resp = error_response(408, f"request body not received within {timeout:g}s ({seen})",
                              type_="invalid_request_error", code="request_timeout")
        resp.force_close()
        return resp
    del buf[got:]
    return buf
