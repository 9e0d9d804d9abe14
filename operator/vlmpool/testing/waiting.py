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
from collections.abc import Callable, Iterator
from typing import Any

_FIRST, _GROWTH, _MOST = 0.01, 1.5, 0.3


def _intervals(interval: float | None) -> Iterator[float]:
    step = _FIRST
    while True:
        if interval is not None:
            yield interval
        else:
            yield step
            step = min(step * _GROWTH, _MOST)


def _timed_out(timeout: float, what: str, last: Any) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")


def wait_for(fn: Callable[[], Any], timeout: float = 60.0, interval: float | None = None,
             what: str = "condition") -> Any:
    """Call fn() until it returns a truthy value (returned); see the module's docstring."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for pause in _intervals(interval):
        try:
            last = fn()
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - "not yet": kept as the last value until the deadline
            last = e
        else:
            if last:
                return last
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(timeout, what, last)
        time.sleep(min(pause, left))
    raise AssertionError("unreachable")  # _intervals never ends


async def wait_until(fn: Callable[[], Any], timeout: float = 60.0, interval: float | None = None,
                     what: str = "condition") -> Any:
    """The coroutine form of wait_for: fn() may be sync or return an awaitable; polled on the running
    loop until truthy (returned); see the module's docstring."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    last: Any = None
    for pause in _intervals(interval):
        try:
            last = fn()
            if inspect.isawaitable(last):
                last = await last
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - "not yet": kept as the last value until the deadline
            last = e
        else:
            if last:
                return last
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(timeout, what, last)
        await asyncio.sleep(min(pause, left))
    raise AssertionError("unreachable")  # _intervals never ends
