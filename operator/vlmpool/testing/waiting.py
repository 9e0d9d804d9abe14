"""Polling helpers for tests that wait on a cluster or a server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(fn: Callable[[], Any], timeout: float = 90.0, interval: float = 0.3, what: str = "condition") -> Any:
    """Call fn() until it returns a truthy value (returned) or the timeout passes (AssertionError
    with the last value or exception). Exceptions count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001 - keep trying until the deadline
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


async def wait_until(fn: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """The async form of wait_for: fn() may be sync or return an awaitable; polled on the running loop
    until truthy (returned) or the deadline (AssertionError naming `what` and the last value)."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)
