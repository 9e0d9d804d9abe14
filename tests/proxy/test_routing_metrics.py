"""The vLLM-named series the proxy exports for a router's endpoint picker (GIE's EPP scrapes the
proxy's port): the LoRA family under SERVED names from the proxy's own view (never the internal
``name@version``), always present even when idle; waiting = proxy queue + engine; running and KV usage
from the engine; the per-served-name queue gauge. Real HTTP on loopback: client -> proxy -> simulator."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from vlmtest.proxy import Admin, proxy_config, start_sim

from vlmpool.proxy.server import run_proxy
from vlmpool.testing.waiting import wait_until

MSG = [{"role": "user", "content": "what is in the picture?"}]


async def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def lora_info(m: dict) -> dict[str, str]:
    series = m["vllm:lora_requests_info"]
    assert len(series) == 1, series  # one current series (the EPP takes the newest anyway)
    return series[0][0]


async def generate(url: str, model: str, max_tokens: int) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions",
                          json={"model": model, "messages": MSG, "max_tokens": max_tokens,
                                "ignore_eos": True}) as r:
            await r.read()
            return r.status


async def test_lora_family_under_served_names(adapters):
    # a slow engine (50 ms per token) so a request stays running while the next one queues in the proxy
    sim, runner = await start_sim(tpot_ms=50.0, max_num_seqs=4, max_loras=2)
    try:
        async with run_proxy(proxy_config(sim.url, max_loras=2)) as p:
            m = await scrape(p.url)
            # present before any adapter or request: empty adapter lists, max_lora from the pool
            assert lora_info(m) == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
            assert m["vllm:num_requests_waiting"][0][1] == 0 and m["vllm:num_requests_running"][0][1] == 0
            assert "vllm:kv_cache_usage_perc" in m

            status, body = await Admin(p.admin_url).put({"generation": 1, "concurrency": 1, "adapters": [
                {"name": "cats", "version": "00000001", "path": adapters("cats", "00000001")},
                {"name": "acme/dogs", "version": "00000007", "path": adapters("dogs", "00000007")}]})
            assert status == 200, body
            m = await scrape(p.url)
            assert {lbl["model"]: v for lbl, v in m["vlmpool_proxy_adapter_queue_depth"]} == {
                "cats": 0.0, "acme/dogs": 0.0}

            first = asyncio.create_task(generate(p.url, "cats", 60))  # ~3 s at the engine
            await wait_until(lambda: _running(p.url, "cats"), timeout=10, what="cats running")
            second = asyncio.create_task(generate(p.url, "acme/dogs", 2))  # queued: concurrency 1
            m = await wait_until(lambda: _waiting(p.url, "acme/dogs"), timeout=10, what="acme/dogs waiting")
            info = lora_info(m)
            assert info == {"max_lora": "2", "running_lora_adapters": "cats", "waiting_lora_adapters": "acme/dogs"}
            assert "@" not in info["running_lora_adapters"] + info["waiting_lora_adapters"]
            assert m["vllm:num_requests_waiting"][0][1] >= 1  # the proxy's queue counts
            assert m["vllm:num_requests_running"][0][1] == 1  # the engine's own count
            assert m["vllm:kv_cache_usage_perc"][0][1] > 0  # the engine's value passed through
            assert {lbl["model"]: v for lbl, v in m["vlmpool_proxy_adapter_queue_depth"]} == {
                "cats": 0.0, "acme/dogs": 1.0}
            assert m["vlmpool_proxy_queue_depth"][0][1] == 1
            # the internal names the engine itself reports never leak into the routing series
            engine = await scrape(sim.url)
            assert any("cats@00000001" in lbl["running_lora_adapters"] for lbl, _ in engine["vllm:lora_requests_info"])

            assert await first == 200 and await second == 200
            m = await wait_until(lambda: _idle(p.url), timeout=10, what="idle LoRA series")
            t1 = m["vllm:lora_requests_info"][0][1]
            m = await scrape(p.url)
            assert m["vllm:lora_requests_info"][0][1] >= t1  # the value is the time (newest wins)
    finally:
        await runner.cleanup()


async def _running(url: str, served: str):
    m = await scrape(url)
    return m if served in lora_info(m)["running_lora_adapters"].split(",") else None


async def _waiting(url: str, served: str):
    """A scrape with `served` queued in the proxy and the engine's (cached, <= 0.2 s old) view caught up
    with the running request."""
    m = await scrape(url)
    if served in lora_info(m)["waiting_lora_adapters"].split(",") and m["vllm:num_requests_running"][0][1]:
        return m
    return None


async def _idle(url: str):
    m = await scrape(url)
    info = lora_info(m)  # still present: the EPP would keep stale state if the series vanished
    return m if info["running_lora_adapters"] == info["waiting_lora_adapters"] == "" else None


async def test_engine_gauges_parse():
    from vlmpool.proxy.metrics import EngineGauges

    g = EngineGauges()
    g.update('vllm:num_requests_waiting{engine="0"} 3\nvllm:num_requests_waiting{engine="1"} 2\n'
             'vllm:num_requests_running{engine="0"} 4\nvllm:kv_cache_usage_perc{engine="0"} 0.5\n'
             'vllm:kv_cache_usage_perc{engine="1"} 0.25\n')
    assert (g.waiting, g.running, g.kv_usage) == (5, 4, 0.375)
    g.update("this is { not prometheus")
    assert (g.waiting, g.running, g.kv_usage) == (0, None, 0)
    g.update(None)
    assert (g.waiting, g.running, g.kv_usage) == (0, None, 0)


async def test_the_engines_own_metrics_are_served_through_the_proxy(tmp_path):
    """The engine listens on the pod's loopback only (manifests/pool.py ENGINE_HOST): its full vllm:*
    set reaches Prometheus through the proxy's GET /metrics/engine (open like /metrics, also with API
    keys on), the engine read at most once a second whatever the scrape rate; 503 when it is gone."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "k").write_text("sk-client")
    sim, runner = await start_sim()
    try:
        async with run_proxy(proxy_config(sim.url, api_key_dir=str(keys))) as p:
            async with aiohttp.ClientSession() as s:
                texts = []
                for _ in range(5):
                    async with s.get(p.url + "/metrics/engine") as r:
                        assert r.status == 200 and r.content_type == "text/plain"
                        texts.append(await r.text())
            names = {f.name for f in text_string_to_metric_families(texts[0])}
            assert "vllm:num_requests_running" in names and "vllm:kv_cache_usage_perc" in names, names
            assert sum(1 for e in sim.log if e["path"] == "/metrics") <= 2  # 5 scrapes within a second
            await runner.cleanup()
            await asyncio.sleep(1.1)
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url + "/metrics/engine") as r:
                    assert r.status == 503
    finally:
        await runner.cleanup()
