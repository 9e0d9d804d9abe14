"""The one polling helper of the tests (and the benchmarks): wait until a condition holds, with a deadline.

`wait_for` polls from plain code; `wait_until` is the same helper for a coroutine (it sleeps on the running
loop, so servers on that loop keep serving, and `fn` may return an awaitable). Both:

- call fn() until it returns a truthy value, which they return;
- count an exception from fn() as "not yet" (the object is not there yet, the server not up), except an
  AssertionError, which fails at once: fn() says what it waits for can no longer come (a process exited);
- at the deadline raise AssertionError naming `what` and the last value or exception;
- poll every `interval` seconds, or, without one, quickly at first and then every 0.3 s at most (a
  condition that is nearly there is seen at once, and a slow one does not load the machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

_FIRST, _GROWTH, _MOST = 0.01, 1.5, 0.3


class _Poll:
    """The state both forms share: the deadline, the last value or "not yet" error, the next pause. As a
    context around one call of fn(), it keeps an Exception as the last value (not yet) and lets an
    AssertionError, or anything that is not an Exception (a cancellation), through."""

    def __init__(self, timeout: float, interval: float | None, what: str):
        self.timeout, self.interval, self.what = timeout, interval, what
        self.deadline = time.monotonic() + timeout
        self.last: Any = None
        self.step = _FIRST

    def __enter__(self) -> _Poll:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> bool:
        if kind is None or issubclass(kind, AssertionError) or not issubclass(kind, Exception):
            return False
        self.last = error
        return True

    def pause(self) -> float:
        """The sleep before the next call; AssertionError when the deadline has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {self.timeout:g}s waiting for {self.what}; last: {self.last!r}")
        step = self.interval if self.interval is not None else self.step
        self.step = min(self.step * _GROWTH, _MOST)
        return min(step, left)


def wait_for(fn: Callable[[], Any], timeout: float = 60.0, interval: float | None = None,
             what: str = "condition") -> Any:
    """Call fn() until it returns a truthy value (returned); see the module's docstring."""
    poll = _Poll(timeout, interval, what)
    while True:
        with poll:
            poll.last = fn()
            if poll.last:
                return poll.last
        time.sleep(poll.pause())


async def wait_until(fn: Callable[[], Any], timeout: float = 60.0, interval: float | None = None,
                     what: str = "condition") -> Any:
    """The coroutine form of wait_for: fn() may be sync or return an awaitable; polled on the running
    loop until truthy (returned); see the module's docstring."""
    import asyncio
    import inspect

    poll = _Poll(timeout, interval, what)
    while True:
        with poll:
            poll.last = fn()
            if inspect.isawaitable(poll.last):
                poll.last = await poll.last
            if poll.last:
                return poll.last
        await asyncio.sleep(poll.pause())
