"""Slow clients cannot hold the public port: a request's headers and its body each have a deadline.
Raw sockets against the real proxy (in front of the real simulator) on loopback."""

from __future__ import annotations

import asyncio
import time

from vlmtest.proxy import BASE, proxy_config_with, start_sim

from vlmpool.proxy.server import ProxyConfig, run_proxy
from vlmpool.testing.waiting import wait_until


async def _closed(reader: asyncio.StreamReader, deadline: float) -> bytes | None:
    """What the server sent before closing, or None when it was still open at `deadline`."""
    data = b""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return data


async def test_300_slowloris_connections_are_all_closed_after_the_header_timeout():
    sim, runner = await start_sim()
    try:
        async with run_proxy(proxy_config_with(sim.url, header_timeout=1.5)) as p:
            port = p.port
            conns = []
            for _ in range(300):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                conns.append((r, w))
            t0 = time.monotonic()

            async def trickle():  # one more header line every 0.3 s: never a complete head
                for i in range(20):
                    for _, w in conns:
                        if not w.is_closing():
                            w.write(f"X-Slow-{i}: 1\r\n".encode())
                    await asyncio.sleep(0.3)

            t = asyncio.create_task(trickle())
            outcomes = await asyncio.gather(*(_closed(r, t0 + 6.0) for r, _ in conns))
            t.cancel()
            still_open = sum(1 for o in outcomes if o is None)
            assert still_open == 0, f"{still_open} of 300 slow connections still open after 6 s"
            assert time.monotonic() - t0 < 6.0
            for _, w in conns:
                w.close()
            # the port still serves normal clients
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await _closed(r, time.monotonic() + 5)).startswith(b"HTTP/1.1 200")
            w.close()
    finally:
        await runner.cleanup()


async def test_a_body_that_never_arrives_is_answered_408_and_closed():
    """A POST announcing 1,000 bytes and sending 10: before, the connection stayed open (> 100 s)."""
    sim, runner = await start_sim()
    try:
        async with run_proxy(proxy_config_with(sim.url, body_timeout=1.0)) as p:
            r, w = await asyncio.open_connection("127.0.0.1", p.port)
            t0 = time.monotonic()
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"X-Request-Id: slow-body-1\r\nContent-Length: 1000\r\n\r\n{\"model\":")
            answer = await _closed(r, t0 + 10.0)
            assert answer is not None, "connection still open 10 s after a 1 s body timeout"
            assert time.monotonic() - t0 < 5.0
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), answer[:300]
            assert b"x-request-id: slow-body-1" in head.lower()
            assert b'"code": "request_timeout"' in body and b"9 of 1000 bytes" in body
            w.close()
            assert sim.received("/v1/chat/completions") == []
            # the body budget it held is free again
            await wait_until(lambda: p.proxy.body_budget.used == 0, timeout=5, what="the body budget to be free")
    finally:
        await runner.cleanup()


def test_default_deadlines_are_short():
    from vlmpool.proxy.settings import default

    cfg = ProxyConfig(admin_token="x")
    assert cfg.header_timeout == default("header_timeout") <= 30
    assert cfg.body_timeout == default("body_timeout") <= 120
    assert BASE  # the helpers' base model is the one the simulator serves
