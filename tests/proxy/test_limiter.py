"""The resizable limiter on its own (the HTTP-level behaviour is in test_proxy_*.py)."""

from __future__ import annotations

import asyncio

import pytest

from vlmpool.proxy.limiter import QueueFull, QueueTimeout, ResizableLimiter
from vlmpool.testing.waiting import wait_until


class Probe:
    """Counts holders inside the limiter, as the engine would see them."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.order: list[int] = []

    async def hold(self, lim: ResizableLimiter, i: int, gate: asyncio.Event, timeout: float | None = None) -> None:
        async with lim.slot(timeout):
            self.order.append(i)
            self.now += 1
            self.peak = max(self.peak, self.now)
            await gate.wait()
            self.now -= 1


async def test_never_more_than_limit_and_fifo():
    lim, probe, gate = ResizableLimiter(3, 100), Probe(), asyncio.Event()
    tasks = [asyncio.create_task(probe.hold(lim, i, gate)) for i in range(20)]
    await wait_until(lambda: lim.active == 3 and lim.waiting == 17, timeout=5)
    assert probe.order == [0, 1, 2]
    gate.set()
    await asyncio.gather(*tasks)
    assert probe.peak == 3
    assert probe.order == list(range(20))  # first come, first served
    assert lim.active == 0 and lim.waiting == 0


async def test_queue_full_and_queue_timeout():
    lim = ResizableLimiter(1, 1)
    await lim.acquire()
    waiter = asyncio.create_task(lim.acquire(timeout=30))
    await wait_until(lambda: lim.waiting == 1, timeout=5)
    with pytest.raises(QueueFull):
        await lim.acquire(timeout=30)
    lim.release()  # hands the slot to the waiter
    await waiter
    assert lim.active == 1 and lim.waiting == 0
    with pytest.raises(QueueTimeout):
        await lim.acquire(timeout=0.05)
    assert lim.waiting == 0, "a timed-out waiter leaves the queue"
    lim.release()
    assert lim.active == 0


async def test_resize_down_keeps_in_flight_and_admits_below_new_limit():
    lim, gate1, gate2 = ResizableLimiter(6, 100), asyncio.Event(), asyncio.Event()
    first, second = Probe(), Probe()
    a = [asyncio.create_task(first.hold(lim, i, gate1)) for i in range(6)]
    b = [asyncio.create_task(second.hold(lim, i, gate2)) for i in range(10)]
    await wait_until(lambda: lim.active == 6 and lim.waiting == 10, timeout=5)
    lim.resize(2)
    assert lim.active == 6, "in-flight holders are not dropped"
    gate1.set()  # the first six finish; the waiters must now be admitted two at a time
    await asyncio.gather(*a)
    await wait_until(lambda: second.now == 2, timeout=5)
    await asyncio.sleep(0.01)
    assert lim.active == 2 and second.now == 2 and lim.waiting == 8
    gate2.set()
    await asyncio.gather(*b)
    assert second.peak == 2
    assert sorted(second.order) == list(range(10)), "no waiter dropped"


async def test_resize_up_wakes_waiters():
    lim, probe, gate = ResizableLimiter(1, 100), Probe(), asyncio.Event()
    tasks = [asyncio.create_task(probe.hold(lim, i, gate)) for i in range(5)]
    await wait_until(lambda: lim.active == 1 and lim.waiting == 4, timeout=5)
    lim.resize(4)
    await wait_until(lambda: probe.now == 4, timeout=5)
    assert lim.waiting == 1
    gate.set()
    await asyncio.gather(*tasks)
    assert probe.peak == 4


async def test_cancelled_waiter_leaves_and_granted_slot_is_returned():
    lim = ResizableLimiter(1, 10)
    await lim.acquire()
    w1 = asyncio.create_task(lim.acquire(timeout=30))
    w2 = asyncio.create_task(lim.acquire(timeout=30))
    await wait_until(lambda: lim.waiting == 2, timeout=5)
    w1.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w1
    assert lim.waiting == 1
    # grant to w2 and cancel it in the same tick: the slot must come back
    lim.release()
    w2.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w2
    assert lim.active == 0 and lim.waiting == 0
    await lim.acquire()
    assert lim.active == 1


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        ResizableLimiter(0, 10)
    with pytest.raises(ValueError):
        ResizableLimiter(1, -1)
    lim = ResizableLimiter(1, 0)
    with pytest.raises(ValueError):
        lim.resize(0)
