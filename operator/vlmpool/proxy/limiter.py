"""A resizable async concurrency limiter with a bounded FIFO wait queue.

Semantics:
- at most ``limit`` holders at once *for admissions made under that limit*: when the limit shrinks,
  holders already admitted keep their slot (nothing in flight is dropped), and no new holder is
  admitted until the number of holders is below the new limit;
- waiters are served first-in first-out; a free slot never lets a newcomer overtake a waiter;
- at most ``queue_limit`` waiters; beyond that ``acquire`` raises :class:`QueueFull` at once;
- a waiter that waits longer than ``timeout`` raises :class:`QueueTimeout` and leaves the queue;
- resizing never drops a waiter: a larger limit wakes as many waiters as there are new free slots.

Everything runs on one event loop; there is no thread and no lock: the bookkeeping happens in plain
synchronous code between awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class LimiterRejected(Exception):
    """The request was not admitted (queue full or waited too long)."""

    reason = "rejected"


class QueueFull(LimiterRejected):
    reason = "queue_full"


class QueueTimeout(LimiterRejected):
    reason = "queue_timeout"


class ResizableLimiter:
    def __init__(self, limit: int, queue_limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if queue_limit < 0:
            raise ValueError("queue_limit must be >= 0")
        self._limit = limit
        self._queue_limit = queue_limit
        self._active = 0
        self._peak = 0
        # insertion-ordered dict used as an O(1)-removal FIFO of waiter futures
        self._waiters: dict[asyncio.Future[None], None] = {}

    # -- introspection -------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return self._limit

    @property
    def queue_limit(self) -> int:
        return self._queue_limit

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def peak(self) -> int:
        """Highest number of simultaneous holders since the last :meth:`reset_peak`."""
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self._active

    # -- control -------------------------------------------------------------------------------
    def resize(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._limit = limit
        self._wake()

    def set_queue_limit(self, queue_limit: int) -> None:
        if queue_limit < 0:
            raise ValueError("queue_limit must be >= 0")
        self._queue_limit = queue_limit  # existing waiters are kept even if above the new bound

    async def acquire(self, timeout: float | None = None) -> None:
        if self._active < self._limit and not self._waiters:
            self._grant()
            return
        if len(self._waiters) >= self._queue_limit:
            raise QueueFull(f"queue full ({len(self._waiters)} waiting, limit {self._queue_limit})")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[fut] = None
        try:
            if timeout is None:
                await fut
            else:
                async with asyncio.timeout(timeout):
                    await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # the slot was granted just as the timer fired: keep it
            self._waiters.pop(fut, None)
            raise QueueTimeout(f"waited more than {timeout:g}s for a free slot") from None
        except BaseException:
            # cancelled (client went away, shutdown): give back a slot granted meanwhile
            if fut.done() and not fut.cancelled():
                self.release()
            else:
                self._waiters.pop(fut, None)
                fut.cancel()
            raise

    def release(self) -> None:
        if self._active <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._active -= 1
        self._wake()

    @asynccontextmanager
    async def slot(self, timeout: float | None = None) -> AsyncIterator[None]:
        await self.acquire(timeout)
        try:
            yield
        finally:
            self.release()

    # -- internals -----------------------------------------------------------------------------
    def _grant(self) -> None:
        self._active += 1
        if self._active > self._peak:
            self._peak = self._active

    def _wake(self) -> None:
        while self._waiters and self._active < self._limit:
            fut = next(iter(self._waiters))
            del self._waiters[fut]
            if fut.done():  # cancelled and not yet removed by its owner
                continue
            self._grant()
            fut.set_result(None)


class ByteBudget:
    """A FIFO budget of bytes (request bodies held in memory at once), taken as the bytes arrive.

    ``acquire(n)`` waits until ``n`` bytes are free and no earlier waiter is still waiting (so a large
    body is not starved by a stream of small ones), at most ``queue_limit`` waiters, each at most
    ``timeout`` seconds; the same :class:`QueueFull` / :class:`QueueTimeout` as the limiter.

    Bodies taken piece by piece could deadlock (every partly received body waiting for bytes the
    others hold), so one body at a time, the oldest still arriving, may go past ``total`` by its
    ``over()`` (the per-connection bound): it always finishes (or is cut for arriving too slowly), then
    the next oldest has the privilege. Memory held: at most ``total`` + one request's maximum.
    """

    def __init__(self, total: int, queue_limit: int) -> None:
        if total < 1:
            raise ValueError("total must be >= 1")
        self.total = total
        self.queue_limit = queue_limit
        self.used = 0
        self.peak = 0
        self._waiters: dict[asyncio.Future[None], tuple[int, Callable[[], int] | None]] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, n: int, over: Callable[[], int] | None) -> bool:
        return self.used + n <= self.total + (over() if over is not None else 0)

    def _grant(self, n: int) -> None:
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    async def acquire(self, n: int, timeout: float, over: Callable[[], int] | None = None) -> None:
        n = min(n, self.total)
        privileged = over is not None and over() > 0
        if (privileged or not self._waiters) and self._fits(n, over):
            self._grant(n)
            return
        if len(self._waiters) >= self.queue_limit:
            raise QueueFull(f"{len(self._waiters)} request bodies already wait for memory")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[fut] = (n, over)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return
            self._waiters.pop(fut, None)
            self._wake()
            raise QueueTimeout(f"waited more than {timeout:g}s for request-body memory") from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)
            else:
                self._waiters.pop(fut, None)
                fut.cancel()
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.used -= min(n, self.total)
        if self.used < 0:
            raise RuntimeError("ByteBudget.release() of more than was acquired")
        self._wake()

    def _wake(self) -> None:
        """Grant the privileged waiter (the oldest body still arriving) if it fits, then FIFO."""
        for fut, (n, over) in list(self._waiters.items()):
            if fut.done():
                del self._waiters[fut]
            elif over is not None and over() > 0 and self._fits(n, over):
                del self._waiters[fut]
                self._grant(n)
                fut.set_result(None)
        while self._waiters:
            fut, (n, _) = next(iter(self._waiters.items()))
            if fut.done():
                del self._waiters[fut]
                continue
            if self.used + n > self.total:
                return
            del self._waiters[fut]
            self._grant(n)
            fut.set_result(None)
