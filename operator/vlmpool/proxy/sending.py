"""Every write to a client under a deadline (``--send-timeout``): a write that cannot hand its bytes to
the socket within the bound (the client reads nothing: the kernel's send buffer and the transport's
are full) ends the request. The client's connection is aborted, the caller aborts the engine request
(the engine sees the disconnect and stops generating) and the concurrency slot is freed when the
handler returns. A client that goes away mid-answer (reset, broken pipe, closed) is a disconnect, not
a proxy error: its own status (499) and counter, no traceback."""

from __future__ import annotations

import asyncio
import socket
import struct

from aiohttp import web

from .context import CTX

STATUS_DISCONNECT = 499  # nginx's "client closed request"
STATUS_WRITE_TIMEOUT = 408


class ClientGone(Exception):
    """The client cannot take the answer any more; ``reason`` is the client_cuts label."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def abort_client(request: web.Request) -> None:
    """Close the client's connection with a reset: a zero linger makes close() drop what the kernel
    still holds for it (up to the socket's send buffer, megabytes) and send RST. A plain close would
    leave an orphan socket holding that buffer and probing a zero window for minutes, and the client
    would never see the connection end (the FIN queues behind the unread bytes)."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError, ValueError):  # closed already, or not a TCP socket
            pass
    transport.abort()


async def _bounded(request: web.Request, op, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await op
    except TimeoutError:
        abort_client(request)  # what is buffered for it is dropped with the connection
        raise ClientGone("write_timeout", STATUS_WRITE_TIMEOUT) from None
    except ConnectionError:  # reset, broken pipe, aiohttp's "Connection lost" / "closing transport"
        abort_client(request)
        raise ClientGone("disconnect", STATUS_DISCONNECT) from None


async def send(request: web.Request, out: web.StreamResponse, data: bytes, timeout: float) -> None:
    """``out.write(data)`` within ``timeout`` seconds, else :class:`ClientGone`."""
    await _bounded(request, out.write(data), timeout)


async def finish(request: web.Request, out: web.StreamResponse, timeout: float) -> None:
    """``out.write_eof()`` within ``timeout`` seconds, else :class:`ClientGone`."""
    await _bounded(request, out.write_eof(), timeout)


async def prepare(request: web.Request, out: web.StreamResponse, timeout: float) -> None:
    await _bounded(request, out.prepare(request), timeout)


def record(request: web.Request, gone: ClientGone, metrics) -> None:
    """The request's outcome as the client made it (access log and metrics status; counter by reason)."""
    request[CTX].status_override = gone.status
    metrics.client_cuts.labels(gone.reason).inc()
