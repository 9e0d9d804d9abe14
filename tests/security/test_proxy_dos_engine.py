"""An engine answer cannot grow the proxy without bound nor smuggle a broken framing through it (issue
#23): tests/proxy/misbehaving.py as the engine on loopback, the real proxy in front of it (as a
process where its memory is measured)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from vlmtest.misbehaving import Misbehaving
from vlmtest.proxy import BASE, proc_kib, proxy_config, proxy_process, stop_process

from vlmpool.proxy.server import run_proxy
from vlmpool.proxy.settings import default

MB = 1024 * 1024
CHAT = {"model": BASE, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


async def _post(url: str, rid: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s, s.post(
            url + "/v1/chat/completions", json=CHAT, headers={"X-Request-Id": rid}) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the proxy's peak RSS from /proc")
async def test_a_huge_non_streaming_answer_is_cut_at_max_answer_bytes_and_memory_stays_bounded():
    """Before: a non-streaming answer was buffered whole (1.2 GB answer: 3.2 GB proxy peak). Now an
    answer announced or arriving larger than --max-answer-bytes (default 32 MiB) is 502
    engine_answer_too_large; the proxy's peak RSS grows by a few times the limit at most."""
    engine = await Misbehaving(answer_bytes=512 * MB).start()
    proc, url, _ = await proxy_process(engine.url)  # default limits: --max-answer-bytes 32 MiB
    try:
        before = proc_kib(proc.pid, "VmRSS")
        for chunked in (False, True):  # announced by Content-Length, then arriving (chunked) with none
            engine.chunked = chunked
            status, body = await _post(url, f"huge-{chunked}")
            assert status == 502 and body["error"]["code"] == "engine_answer_too_large", (chunked, status, body)
            assert str(default("max_answer_bytes")) in body["error"]["message"]
        peak = proc_kib(proc.pid, "VmHWM")
        growth_mb = (peak - before) / 1024
        bound_mb = 4 * default("max_answer_bytes") / MB  # the limit, one read past it, growth of the buffer
        print(f"proxy RSS before {before / 1024:.0f} MB, peak {peak / 1024:.0f} MB (+{growth_mb:.0f} MB) "
              f"for two 512 MiB answers")
        assert growth_mb < bound_mb, f"proxy peak RSS grew by {growth_mb:.0f} MB (bound {bound_mb:.0f} MB)"
        # an answer within the limit is still relayed
        engine.answer_bytes = 1 * MB
        status, body = await _post(url, "fits")
        assert status == 200 and len(body["choices"][0]["message"]["content"]) > MB - 100, status
    finally:
        stop_process(proc)
        await engine.close()


def _answer(framing: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n" + body


OK_BODY = b'{"choices": [{"message": {"content": "ok"}}]}'
CHUNKED = b"Transfer-Encoding: chunked"


def _chunked(size_line: bytes) -> bytes:
    return _answer(CHUNKED, size_line + b"\r\n" + OK_BODY + b"\r\n0\r\n\r\n")


MALFORMED = {
    # chunk sizes Python's int(x, 16) takes and RFC 9112's 1*HEXDIG does not
    "chunk-0x": _chunked(b"0x" + f"{len(OK_BODY):x}".encode()),
    "chunk-negative": _chunked(b"-" + f"{len(OK_BODY):x}".encode()),
    "chunk-plus": _chunked(b"+" + f"{len(OK_BODY):x}".encode()),
    "chunk-underscore": _chunked(b"2_d"),
    "chunk-inner-space": _chunked(b"2 d"),
    "chunk-17-digits": _chunked(b"0" * 15 + b"2d"),
    "chunk-empty": _chunked(b""),
    # Content-Length int() takes, or several that disagree
    "cl-negative": _answer(b"Content-Length: -1", OK_BODY),
    "cl-plus": _answer(b"Content-Length: +" + str(len(OK_BODY)).encode(), OK_BODY),
    "cl-underscore": _answer(b"Content-Length: 4_5", OK_BODY),
    "cl-duplicated-different": _answer(b"Content-Length: " + str(len(OK_BODY)).encode() + b"\r\nContent-Length: 3",
                                       OK_BODY),
    "cl-list-different": _answer(b"Content-Length: " + str(len(OK_BODY)).encode() + b", 3", OK_BODY),
}


async def test_malformed_chunk_sizes_and_content_lengths_from_the_engine_are_502_protocol_errors():
    """Before: int(x, 16) / int(x) took "0x2d", "-1", "+45", "4_5" (a desync of the engine connection)
    and the first of two different Content-Lengths. Now each is 502 engine_protocol_error and the
    engine connection is dropped; well-formed answers (equal repeated lengths included) still pass."""
    assert len(OK_BODY) == 45
    engine = await Misbehaving().start()
    try:
        async with run_proxy(proxy_config(engine.url)) as p:
            for why, raw in MALFORMED.items():
                engine.raw = raw
                status, body = await _post(p.url, why)
                assert status == 502 and body["error"]["code"] == "engine_protocol_error", (why, status, body)
            wellformed = {
                "chunked": _chunked(b"2d"),
                "chunked-ext": _chunked(b"2D;name=value"),
                "cl": _answer(b"Content-Length: 45", OK_BODY),
                "cl-duplicated-equal": _answer(b"Content-Length: 45\r\nContent-Length: 45", OK_BODY),
            }
            for why, raw in wellformed.items():
                engine.raw = raw
                status, body = await _post(p.url, why)
                assert status == 200 and body["choices"][0]["message"]["content"] == "ok", (why, status, body)
    finally:
        await engine.close()
