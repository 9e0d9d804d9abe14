"""Termination in a rolling pool (proxy/drain.py): after SIGTERM the proxy is unready but keeps serving new
requests for drain_seconds (endpoints catch up meanwhile), then stops listening and finishes the requests
in flight; GET /drainz, the engine container's preStop hook, answers only after that, so the engine is
never stopped under a request. Not timed: ordering is asserted from the events themselves."""

from __future__ import annotations

import asyncio

import aiohttp
from vlmtest.proxy import BASE, proxy_config, start_sim

from vlmpool.proxy import drain as drain_mod
from vlmpool.proxy.server import start_proxy, stop_proxy


def chat(max_tokens: int) -> dict:
    return {"model": BASE, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "describe"}]}


async def test_a_stopping_proxy_serves_through_its_drain_and_releases_the_engine_after_the_last_request():
    sim, sim_runner = await start_sim(tpot_ms=20.0)  # 60 tokens: a request of about 1.2 s
    running, runners = await start_proxy(proxy_config(sim.url, drain_seconds=0.6, shutdown_timeout=10.0))
    order: list[str] = []
    try:
        async with aiohttp.ClientSession() as s:
            async def post(tag: str, max_tokens: int) -> int:
                async with s.post(running.url + "/v1/chat/completions", json=chat(max_tokens)) as r:
                    await r.read()
                    order.append(tag)
                    return r.status

            async def drainz() -> dict:
                async with s.get(running.url + "/drainz") as r:
                    body = await r.json()
                    order.append("drainz")
                    return body

            long = asyncio.create_task(post("long", 60))
            while running.proxy.drain.active < 1:  # the long request is in flight
                await asyncio.sleep(0.01)
            hook = asyncio.create_task(drainz())  # the kubelet runs the engine's hook as SIGTERM goes out
            stop = asyncio.create_task(stop_proxy(running, runners))
            while not running.proxy.drain.draining:
                await asyncio.sleep(0.01)
            async with s.get(running.url + "/readyz") as r:
                assert r.status == 503 and "shutting down" in (await r.json())["reasons"]
            # a request that a stale endpoint still sends during the drain is served
            assert await post("late", 2) == 200
            assert not hook.done()  # the engine must not stop yet: the long request is still running
            assert await long == 200
            body = await asyncio.wait_for(hook, 15)
            assert body == {"draining": True, "drained": True, "in_flight": 0}
            await asyncio.wait_for(stop, 15)
        assert order == ["late", "long", "drainz"], order
    finally:
        if not running.proxy.shutting_down:
            await stop_proxy(running, runners)
        await sim_runner.cleanup()


async def test_drainz_answers_at_once_when_only_the_engine_restarts(monkeypatch):
    """A failed liveness probe restarts the engine alone: its hook must not hold it (no SIGTERM comes)."""
    monkeypatch.setattr(drain_mod, "TERM_WAIT_S", 0.2)
    sim, sim_runner = await start_sim()
    running, runners = await start_proxy(proxy_config(sim.url, drain_seconds=30.0))
    try:
        async with aiohttp.ClientSession() as s, s.get(running.url + "/drainz") as r:
            assert r.status == 200 and await r.json() == {"draining": False}
        async with aiohttp.ClientSession() as s, s.get(running.url + "/readyz") as r:
            assert "shutting down" not in str(await r.json())
    finally:
        running.proxy.drain.drain_seconds = 0
        await stop_proxy(running, runners)
        await sim_runner.cleanup()
