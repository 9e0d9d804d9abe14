"""--max-num-seqs queueing, --max-loras batching and the --max-cpu-loras LRU, observed through
/sim/stats and vLLM's /metrics. Requests are held in the engine with the stall fault and let go by
clearing it, so nothing here depends on wall-clock timing."""

from __future__ import annotations

import asyncio
import shutil

import aiohttp

from vlmpool.sim.server import running_sim
from vlmpool.testing.waiting import wait_until

CHAT = "/v1/chat/completions"


def stats_if(s: aiohttp.ClientSession, url: str, pred):
    """A poll for wait_until: /sim/stats once `pred` holds of them (until then the stats seen are the
    "not yet" that the deadline reports)."""
    async def poll() -> dict:
        stats = await (await s.get(url + "/sim/stats")).json()
        if not pred(stats):
            raise LookupError(f"stats: {stats}")
        return stats
    return poll


async def chat(s: aiohttp.ClientSession, url: str, model: str) -> tuple[int, dict]:
    async with s.post(url + CHAT, json={"model": model, "messages": [{"role": "user", "content": "hi"}]}) as r:
        return r.status, await r.json()


def samples(metrics: str, name: str) -> list:
    """Parse /metrics with prometheus_client's own parser; the samples named ``name``."""
    from prometheus_client.parser import text_string_to_metric_families

    return [smp for fam in text_string_to_metric_families(metrics) for smp in fam.samples if smp.name == name]


def value(metrics: str, name: str, **labels: str) -> float:
    want = {"engine": "0", "model_name": "qwen-base", **labels}
    found = [smp.value for smp in samples(metrics, name) if smp.labels == want]
    assert len(found) == 1, f"{name}{want} not exactly once in /metrics"
    return found[0]


def latest_lora_info(metrics: str) -> tuple[str, str, str]:
    rows = samples(metrics, "vllm:lora_requests_info")
    assert rows, "vllm:lora_requests_info missing"
    latest = max(rows, key=lambda smp: smp.value)
    return (latest.labels["max_lora"], latest.labels["running_lora_adapters"],
            latest.labels["waiting_lora_adapters"])


async def test_max_num_seqs_queue_shows_in_stats_and_metrics(fast_config):
    async with running_sim(fast_config(max_num_seqs=2)) as url, aiohttp.ClientSession() as s:
        await s.post(url + "/sim/faults", json={"stall_seconds": 120})
        tasks = [asyncio.create_task(chat(s, url, "qwen-base")) for _ in range(5)]
        stats = await wait_until(stats_if(s, url, lambda st: st["running"] == 2 and st["waiting"] == 3))
        assert stats["requests_total"] == 5
        metrics = await (await s.get(url + "/metrics")).text()
        assert value(metrics, "vllm:num_requests_running") == 2
        assert value(metrics, "vllm:num_requests_waiting") == 3

        await s.post(url + "/sim/faults", json={"stall_seconds": 0})
        results = await asyncio.gather(*tasks)
        assert [status for status, _ in results] == [200] * 5
        stats = await wait_until(stats_if(s, url, lambda st: st["running"] == 0 and st["waiting"] == 0))
        assert stats["peak_running"] == 2 and stats["peak_waiting"] == 3
        metrics = await (await s.get(url + "/metrics")).text()
        assert value(metrics, "vllm:request_success_total", finished_reason="stop") == 5
        completion = sum(body["usage"]["completion_tokens"] for _, body in results)
        prompt = sum(body["usage"]["prompt_tokens"] for _, body in results)
        assert value(metrics, "vllm:generation_tokens_total") == completion
        assert value(metrics, "vllm:prompt_tokens_total") == prompt
        assert value(metrics, "vllm:time_to_first_token_seconds_count") == 5
        assert value(metrics, "vllm:request_queue_time_seconds_count") == 5


async def test_max_loras_limits_distinct_adapters_in_the_batch(fast_config, adapter):
    async with running_sim(fast_config(max_loras=1, max_num_seqs=16)) as url, aiohttp.ClientSession() as s:
        for name in ("a", "b"):
            async with s.post(url + "/v1/load_lora_adapter",
                               json={"lora_name": name, "lora_path": str(adapter(name))}) as r:
                assert r.status == 200
        await s.post(url + "/sim/faults", json={"stall_seconds": 120})
        tasks = [asyncio.create_task(chat(s, url, m)) for m in ("a", "a")]
        await wait_until(stats_if(s, url, lambda st: st["running"] == 2))
        tasks += [asyncio.create_task(chat(s, url, m)) for m in ("b", "b")]
        await wait_until(stats_if(s, url, lambda st: st["waiting"] == 2))
        tasks.append(asyncio.create_task(chat(s, url, "qwen-base")))  # the base model is not held back
        stats = await wait_until(stats_if(s, url, lambda st: st["running"] == 3))
        assert stats["waiting"] == 2 and stats["running_loras"] == ["a"] and stats["waiting_loras"] == ["b"]
        assert latest_lora_info(await (await s.get(url + "/metrics")).text()) == ("1", "a", "b")

        await s.post(url + "/sim/faults", json={"stall_seconds": 0})
        results = await asyncio.gather(*tasks)
        assert [body["choices"][0]["message"]["content"].split()[0] for _, body in results] == [
            "sim:a", "sim:a", "sim:b", "sim:b", "sim:qwen-base"]
        stats = await wait_until(stats_if(s, url, lambda st: st["running"] == 0))
        assert stats["peak_running_loras"] == 1


async def test_cpu_lru_eviction_reload_and_engine_death(fast_config, adapter):
    paths = {name: adapter(name) for name in ("a", "b", "c")}
    async with running_sim(fast_config(max_loras=1, max_cpu_loras=2)) as url, aiohttp.ClientSession() as s:
        for name, path in paths.items():
            async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}) as r:
                assert r.status == 200
        stats = await (await s.get(url + "/sim/stats")).json()
        assert stats["loaded_adapters"] == ["a", "b", "c"]  # all stay registered (and listed)
        assert stats["cpu_cached_adapters"] == ["b", "c"]   # but only two stay loaded: a was evicted
        assert stats["adapter_disk_loads"] == {"a": 1, "b": 1, "c": 1}

        status, body = await chat(s, url, "a")  # evicted: read again from its registered path
        assert status == 200 and body["choices"][0]["message"]["content"].startswith(f"sim:a path={paths['a']}")
        stats = await (await s.get(url + "/sim/stats")).json()
        assert stats["adapter_disk_loads"]["a"] == 2
        assert stats["cpu_cached_adapters"] == ["c", "a"]  # b is now the least recently used, evicted

        status, _ = await chat(s, url, "c")  # cached: no disk read
        stats = await (await s.get(url + "/sim/stats")).json()
        assert stats["adapter_disk_loads"]["c"] == 1 and stats["cpu_cached_adapters"] == ["a", "c"]

        # b's files vanish while b is registered but evicted: re-reading it kills the engine, as in vLLM V1
        shutil.rmtree(paths["b"])
        status, body = await chat(s, url, "b")
        assert status == 500 and body["error"]["type"] == "InternalServerError"
        assert body["error"]["message"].startswith("EngineCore encountered an issue")
        async with s.get(url + "/health") as r:
            assert r.status == 503
        status, _ = await chat(s, url, "qwen-base")
        assert status == 500

        # engine restart: alive again, every adapter forgotten
        forgotten = await (await s.post(url + "/sim/forget")).json()
        assert forgotten == {"forgotten": ["a", "b", "c"]}
        async with s.get(url + "/health") as r:
            assert r.status == 200
        assert (await chat(s, url, "qwen-base"))[0] == 200
        status, body = await chat(s, url, "a")
        assert status == 404 and body["error"]["message"] == "The model `a` does not exist. Valid aliases: qwen-base."


async def test_request_waiting_for_an_unloaded_adapter_is_still_served(fast_config, adapter):
    """vLLM's request carries its LoRARequest (name and path): unloading the adapter from the serving
    layer does not fail a request already queued for it; the worker reads the adapter again."""
    a = adapter("a")
    async with running_sim(fast_config(max_num_seqs=1, max_loras=1, max_cpu_loras=1)) as url, \
            aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(a)}) as r:
            assert r.status == 200
        await s.post(url + "/sim/faults", json={"stall_seconds": 120})
        first = asyncio.create_task(chat(s, url, "qwen-base"))
        await wait_until(stats_if(s, url, lambda st: st["running"] == 1))
        queued = asyncio.create_task(chat(s, url, "a"))
        await wait_until(stats_if(s, url, lambda st: st["waiting"] == 1))
        async with s.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a"}) as r:
            assert r.status == 200
        await s.post(url + "/sim/faults", json={"stall_seconds": 0})
        assert (await first)[0] == 200
        status, body = await queued
        assert status == 200 and body["choices"][0]["message"]["content"].startswith(f"sim:a path={a}")
        assert (await chat(s, url, "a"))[0] == 404  # new requests no longer find it


async def test_repeated_request_ids_are_separate_sequences(fast_config):
    async with running_sim(fast_config(max_num_seqs=4)) as url, aiohttp.ClientSession() as s:
        await s.post(url + "/sim/faults", json={"stall_seconds": 120})

        async def same_id():
            async with s.post(url + CHAT, headers={"X-Request-Id": "dup"},
                              json={"model": "qwen-base", "messages": [{"role": "user", "content": "x"}]}) as r:
                return r.status, await r.json()

        tasks = [asyncio.create_task(same_id()) for _ in range(3)]
        await wait_until(stats_if(s, url, lambda st: st["running"] == 3))
        await s.post(url + "/sim/faults", json={"stall_seconds": 0})
        results = await asyncio.gather(*tasks)
        assert [(st, body["id"]) for st, body in results] == [(200, "chatcmpl-dup")] * 3
        await wait_until(stats_if(s, url, lambda st: st["running"] == 0))
