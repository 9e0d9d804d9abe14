"""Termination without failed requests in a rolling pool.

When a pod is deleted the kubelet signals both containers at once, while Services and gateways still send
it new requests until their endpoints catch up (the EndpointSlice update, then kube-proxy or the gateway:
hundreds of milliseconds to seconds). So on SIGTERM the proxy

1. turns unready (``/readyz`` 503) and keeps serving new requests for ``drain_seconds``;
2. then stops listening and finishes the requests in flight (``shutdown_timeout`` at most).

The engine must outlive step 2: its preStop hook is an HTTP GET of the proxy's ``/drainz``, which answers
once the proxy has no request in flight after step 1 (the kubelet sends the engine SIGTERM after the hook).
When the engine alone is restarted (a failed liveness probe) the proxy is not terminating: ``/drainz``
waits ``TERM_WAIT_S`` for a SIGTERM that may be racing the hook, then answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web

TERM_WAIT_S = 2.0  # how long /drainz waits for the proxy's own SIGTERM (sent at the same moment as the hook)


class Drain:
    """Counts the public requests in flight and tells the engine's preStop hook when they are done."""

    def __init__(self, drain_seconds: float, shutdown_timeout: float):
        self.drain_seconds = drain_seconds
        self.shutdown_timeout = shutdown_timeout
        self.active = 0
        self.began: float | None = None
        self._term = asyncio.Event()  # SIGTERM received: draining
        self._closing = False  # step 2: no new connections any more
        self._drained = asyncio.Event()  # step 2 reached with nothing in flight

    @property
    def draining(self) -> bool:
        return self._term.is_set()

    def enter(self) -> None:
        self.active += 1

    def exit(self) -> None:
        self.active -= 1
        self._check()

    def _check(self) -> None:
        if self._closing and self.active <= 0:
            self._drained.set()

    async def begin(self) -> None:
        """Step 1: unready, still serving, for drain_seconds."""
        if not self._term.is_set():
            self.began = time.monotonic()
            self._term.set()
        if self.drain_seconds > 0:
            await asyncio.sleep(self.drain_seconds)

    def listeners_closed(self) -> None:
        """Step 2 began: no new request can arrive; /drainz answers once the last one in flight is done."""
        self._closing = True
        self._check()

    async def handle_drainz(self, request: web.Request) -> web.Response:
        """The engine container's preStop hook: answers when the proxy has drained (or is not terminating)."""
        if not self._term.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._term.wait(), TERM_WAIT_S)
        if not self._term.is_set():
            return web.json_response({"draining": False})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), self.drain_seconds + self.shutdown_timeout)
        return web.json_response({"draining": True, "drained": self._drained.is_set(), "in_flight": self.active})
