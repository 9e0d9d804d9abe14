"""A client of the public port cannot grow the proxy's memory beyond its limits: concurrent large
bodies and JSON shaped to cost far more parsed than sent, against `vlmpool proxy` as a process (its
peak RSS read from /proc) in front of the real simulator on loopback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from vlmtest.proxy import BASE, proc_kib, proxy_process, stop_process

from vlmpool.sim.server import SimConfig, create_app

MB = 1024 * 1024

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")


async def _plain_sim():
    """The simulator without the proxy tests' request recorder (which would keep every body)."""
    app = create_app(SimConfig(model=BASE, enable_lora=True, runtime_lora=True, max_num_seqs=256,
                               ttft_ms=1.0, tpot_ms=0.1))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", runner


async def _post_all(url: str, bodies: list[bytes]) -> list[tuple[int, dict]]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async def one(i: int, body: bytes) -> tuple[int, dict]:
            async with s.post(url + "/v1/chat/completions", data=body,
                              headers={"Content-Type": "application/json", "X-Request-Id": f"big-{i}"}) as r:
                data = await r.json(content_type=None)
                assert r.headers.get("X-Request-Id") == f"big-{i}"
                return r.status, data
        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


async def test_sixteen_concurrent_60mb_bodies_stay_within_the_body_budget():
    """Before: every body was read and parsed before the limiter (16 x 60 MB took the proxy from
    55 MB to 783 MB). Now at most --max-inflight-body-bytes (default 2 x 64 MiB) of bodies are held."""
    engine_url, runner = await _plain_sim()
    proc, url, _ = await proxy_process(engine_url)
    try:
        image = "data:image/png;base64," + "A" * (60 * MB)
        body = json.dumps({"model": BASE, "max_tokens": 1,
                           "messages": [{"role": "user", "content": [
                               {"type": "image_url", "image_url": {"url": image}}]}]}).encode()
        del image
        before = proc_kib(proc.pid, "VmRSS")
        results = await _post_all(url, [body] * 16)
        peak = proc_kib(proc.pid, "VmHWM")
        growth_mb = (peak - before) / 1024
        print(f"proxy RSS before {before / 1024:.0f} MB, peak {peak / 1024:.0f} MB (+{growth_mb:.0f} MB) "
              f"for 16 concurrent {len(body) / MB:.0f} MB bodies")
        # every body reached the engine (which refuses the fake image: 422 from the error table) or
        # waited too long for body memory (429); none was lost or answered 5xx
        codes = [(st, d.get("error", {}).get("code")) for st, d in results]
        assert all(c in ((422, "vlm_client_error"), (429, "queue_timeout"), (429, "queue_full")) for c in codes), codes
        assert codes.count((422, "vlm_client_error")) >= 8, codes
        assert growth_mb < 350, f"proxy grew by {growth_mb:.0f} MB"
    finally:
        stop_process(proc)
        await runner.cleanup()


async def test_json_that_costs_more_parsed_than_sent_is_refused_before_parsing():
    """`[{},{},...]` is 3 bytes per element on the wire and ~64 bytes parsed; deep nesting makes the
    parser recurse. Both are 400 with a stable code, and the proxy's memory barely moves."""
    engine_url, runner = await _plain_sim()
    proc, url, _ = await proxy_process(engine_url)
    try:
        many = b'{"model":"' + BASE.encode() + b'","messages":[],"x":[' + b",".join([b"{}"] * (8 * MB)) + b"]}"
        deep = b'{"model":"' + BASE.encode() + b'","messages":[],"x":' + b"[" * 5_000 + b"]" * 5_000 + b"}"
        fine_deep = b'{"model":"' + BASE.encode() + b'","messages":[],"x":' + b"[" * 200 + b"]" * 200 + b"}"
        dicts = b'{"model":"' + BASE.encode() + b'","messages":[],"x":[' + b",".join([b"{}"] * 50_000) + b"]}"
        before = proc_kib(proc.pid, "VmRSS")
        (s1, d1), (s2, d2), (s3, d3), (s4, d4) = await _post_all(url, [many, deep, fine_deep, dicts])
        peak = proc_kib(proc.pid, "VmHWM")
        assert s1 == 400 and d1["error"]["code"] == "json_too_complex", (s1, d1)
        assert s2 == 400 and d2["error"]["code"] == "json_too_deep", (s2, d2)
        assert s3 == 400 and d3["error"]["code"] == "json_too_deep", (s3, d3)
        assert s4 == 400 and d4["error"]["code"] == "json_too_complex" and "objects/arrays" in d4["error"]["message"]
        assert (peak - before) / 1024 < 150, f"grew by {(peak - before) / 1024:.0f} MB"
    finally:
        stop_process(proc)
        await runner.cleanup()
