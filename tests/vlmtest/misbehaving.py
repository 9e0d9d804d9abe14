"""A raw asyncio HTTP/1.1 "engine" on loopback that misbehaves on purpose, for the proxy's hostile-client
and hostile-engine tests (tests/security/test_proxy_*.py) and bench/proxy_slow_clients.py.

Modes, chosen per request by its path:
- /v1/chat/completions with ``"stream": true``: an endless chunked SSE stream (``event_bytes`` per event,
  as fast as the proxy reads), until the proxy closes the connection; ``streams_open`` counts the ones
  running and ``streams_closed`` those the proxy cut;
- /v1/chat/completions otherwise: a 200 JSON answer of ``answer_bytes`` (Content-Length framed, or
  chunked with ``chunked``; written in 1 MiB pieces under back-pressure), or ``raw`` bytes when set
  (scripted wire bytes, written as given). ``stream_bytes`` counts the bytes the streams wrote.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field


@dataclass
class Misbehaving:
    event_bytes: int = 1024
    answer_bytes: int = 100
    chunked: bool = False
    raw: bytes | None = None
    stream_bytes: int = 0
    port: int = 0
    streams_open: int = 0
    streams_closed: int = 0
    requests: int = 0
    server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Misbehaving:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests += 1
                path = head.split(b" ", 2)[1]
                try:
                    payload = json.loads(body) if body else {}
                except ValueError:
                    payload = {}
                if path.endswith(b"/completions") and isinstance(payload, dict) and payload.get("stream") is True:
                    await self._stream(writer)
                    return
                if self.raw is not None:
                    writer.write(self.raw)
                    await writer.drain()
                    continue
                await self._answer(writer, payload.get("model", "m") if isinstance(payload, dict) else "m")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        data = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * self.event_bytes}}]}).encode() + b"\n\n"
        chunk = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.streams_open += 1
        try:
            while True:
                writer.write(chunk)
                self.stream_bytes += len(chunk)
                await writer.drain()
                if writer.transport.is_closing():
                    raise ConnectionResetError
        except (ConnectionError, OSError):
            self.streams_closed += 1
        finally:
            self.streams_open -= 1

    async def _answer(self, writer: asyncio.StreamWriter, model: str) -> None:
        head = b'{"model": ' + json.dumps(model).encode() + b', "choices": [{"message": {"content": "'
        tail = b'"}}]}'
        fill = max(0, self.answer_bytes - len(head) - len(tail))
        total = len(head) + fill + len(tail)
        framing = b"Transfer-Encoding: chunked" if self.chunked else f"Content-Length: {total}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n")

        def frame(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n" if self.chunked else data

        writer.write(frame(head))
        piece = b"x" * (1 << 20)
        while fill > 0:
            writer.write(frame(piece[:fill]))
            fill -= min(fill, len(piece))
            await writer.drain()
        writer.write(frame(tail) + (b"0\r\n\r\n" if self.chunked else b""))
        await writer.drain()
