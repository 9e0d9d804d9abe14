"""The proxy's lean HTTP/1.1 engine client against scripted wire bytes from a real loopback socket:
framing (Content-Length, chunked, connection close, 1xx), split reads, keep-alive reuse, timeouts,
broken connections. (The happy paths against the simulator are in the other proxy tests.)"""

from __future__ import annotations

import asyncio

import pytest

from vlmpool.proxy.engine import EngineTimeout, EngineUnavailable
from vlmpool.proxy.upstream import Upstream

CLOSE = b"<close>"  # a piece that means: close the connection here
HANG = b"<hang>"  # a piece that means: stay silent (connection open) for a while


class ScriptedServer:
    """Answers each request on a connection with the next scripted response, written in pieces."""

    def __init__(self, responses: list[list[bytes] | None], *, delay: float = 0.0) -> None:
        self.responses = list(responses)
        self.delay = delay
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.tasks.add(asyncio.current_task())
        try:
            while self.responses:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                pieces = self.responses.pop(0)
                if pieces is None:  # drop the connection without answering
                    writer.transport.abort()
                    return
                for piece in pieces:
                    if piece == CLOSE:
                        writer.close()
                        return
                    if piece == HANG:
                        await asyncio.sleep(3)
                        continue
                    writer.write(piece)
                    await writer.drain()
                    if self.delay:
                        await asyncio.sleep(self.delay)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


async def test_content_length_split_and_keep_alive_reuse():
    body = b'{"ok": true, "text": "' + b"x" * 5000 + b'"}'
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    srv = ScriptedServer([split_every(resp, 7), [resp]])
    async with srv as url:
        up = Upstream(url)
        for _ in range(2):
            r = await up.post("/v1/chat/completions", b'{"a":1}', "rid-1", stream=False, timeout=5)
            assert r.status == 200 and r.headers["content-type"] == "application/json"
            assert await r.read() == body
            up.release(r)
        assert srv.connections == 1  # the second request reused the connection
        assert srv.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nX-Request-Id: rid-1\r\n" in srv.requests[0] and srv.requests[0].endswith(b'{"a":1}')
        await up.close()


async def test_chunked_stream_with_extensions_and_trailers_and_interim_1xx():
    events = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    wire = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
    for e in events:
        wire += b"%x;ext=1\r\n" % len(e) + e + b"\r\n"
    wire += b"0\r\nX-Trailer: yes\r\n\r\n"
    srv = ScriptedServer([split_every(wire, 5), [b"HTTP/1.1 204 No Content\r\n\r\n"]], delay=0.001)
    async with srv as url:
        up = Upstream(url)
        r = await up.post("/v1/chat/completions", b"{}", "rid", stream=True, timeout=5)
        assert r.status == 200
        got = b"".join([c async for c in r.iter_chunks(5)])
        assert got == b"".join(events)
        up.release(r)
        r = await up.post("/v1/completions", b"{}", "rid", stream=False, timeout=5)
        assert r.status == 204 and await r.read() == b""
        up.release(r)
        assert srv.connections == 1
        await up.close()


async def test_body_until_close_and_connection_close_header():
    srv = ScriptedServer([[b"HTTP/1.0 500 Internal Server Error\r\n\r\n", b"boom"]])
    async with srv as url:
        up = Upstream(url)
        r = await up.post("/v1/chat/completions", b"{}", "rid", stream=False, timeout=5)
        assert r.status == 500 and await r.read() == b"boom"
        up.release(r)
        assert not up._idle  # not reusable
        await up.close()


async def test_dropped_connection_and_truncated_body_raise():
    srv = ScriptedServer([None])
    async with srv as url:
        up = Upstream(url)
        with pytest.raises(EngineUnavailable):
            await up.post("/v1/chat/completions", b"{}", "rid", stream=False, timeout=5)
        await up.close()
    trunc = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-this"
    srv = ScriptedServer([[trunc, CLOSE]])
    async with srv as url:
        up = Upstream(url)
        r = await up.post("/v1/chat/completions", b"{}", "rid", stream=False, timeout=5)
        with pytest.raises(EngineUnavailable):
            await r.read()
        up.abort(r)
        await up.close()


async def test_head_timeout_and_stream_idle_timeout_and_refused():
    srv = ScriptedServer([[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"3\r\nabc\r\n", HANG]])
    async with srv as url:
        up = Upstream(url)
        r = await up.post("/v1/chat/completions", b"{}", "rid", stream=True, timeout=5)
        chunks = []
        with pytest.raises(EngineTimeout):
            async for c in r.iter_chunks(0.2):
                chunks.append(c)
        assert chunks == [b"abc"]
        up.abort(r)
        await up.close()

    async def silent(reader, writer):
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        up = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        with pytest.raises(EngineTimeout):
            await up.post("/v1/chat/completions", b"{}", "rid", stream=False, timeout=0.2)
        await up.close()
    finally:
        server.close()

    up = Upstream("http://127.0.0.1:9")
    with pytest.raises(EngineUnavailable) as ei:
        await up.post("/v1/chat/completions", b"{}", "rid", stream=False, timeout=1)
    assert ei.value.code == "engine_unreachable"


async def test_garbage_is_an_error():
    srv = ScriptedServer([[b"SSH-2.0-OpenSSH\r\n\r\n"],
                          [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]])
    async with srv as url:
        up = Upstream(url)
        with pytest.raises(EngineUnavailable, match="status line"):
            await up.post("/v1/chat/completions", b"{}", "rid", stream=False, timeout=5)
        r = await up.post("/v1/chat/completions", b"{}", "rid", stream=False, timeout=5)
        with pytest.raises(EngineUnavailable, match="chunk size"):
            await r.read()
        up.abort(r)
        await up.close()


def test_bad_engine_url():
    with pytest.raises(ValueError):
        Upstream("ftp://engine")


async def test_engine_host_name_is_resolved_and_connections_reused():
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    srv = ScriptedServer([[resp], [resp], [resp]])
    async with srv as url:
        up = Upstream(url.replace("127.0.0.1", "localhost"))
        for _ in range(3):
            r = await up.post("/v1/completions", b"{}", "rid", stream=False, timeout=5)
            assert await r.read() == b"ok"
            up.release(r)
        assert srv.connections == 1
        await up.close()


async def test_stream_back_pressure_pauses_and_resumes_without_loss():
    piece = bytes(range(256)) * 256  # 64 KiB
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for _ in range(48):  # 3 MiB, more than the 1 MiB the client buffers before pausing
        wire += b"%x\r\n" % len(piece) + piece + b"\r\n"
    wire += b"0\r\n\r\n"
    srv = ScriptedServer([[wire]])
    async with srv as url:
        up = Upstream(url)
        r = await up.post("/v1/chat/completions", b"{}", "rid", stream=True, timeout=5)
        await asyncio.sleep(0.3)  # a slow client: the engine's bytes pile up, reading pauses
        assert r._conn._paused
        got = bytearray()
        async for c in r.iter_chunks(5):
            got += c
            await asyncio.sleep(0)
        assert bytes(got) == piece * 48
        up.release(r)
        assert len(up._idle) == 1  # read to the end: reusable
        await up.close()
