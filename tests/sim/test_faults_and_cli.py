"""Fault switches (run time and flags), /sim routes, and `vlmpool sim` as a process."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys

import aiohttp
import openai
import pytest

from vlmpool.sim.server import running_sim

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hello"}]


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def test_fail_next_loads(fast_config, adapter):
    a = adapter("a")
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        assert (await (await s.post(url + "/sim/faults", json={"fail_next_loads": 2})).json())["fail_next_loads"] == 2
        for _ in range(2):
            async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(a)}) as r:
                assert r.status == 500
                body = await r.json()
                assert body["error"]["type"] == "InternalServerError"
                assert body["error"]["message"].startswith("Call to add_lora method failed: simulated load failure")
        async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(a)}) as r:
            assert r.status == 200
        assert (await (await s.get(url + "/sim/faults")).json())["fail_next_loads"] == 0


async def test_fail_next_requests_and_moderation(fast_config):
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        await s.post(url + "/sim/faults", json={"fail_next_requests": 1, "moderation_phrase": "Forbidden Topic"})
        c = client(url)
        with pytest.raises(openai.InternalServerError):
            await c.chat.completions.create(model="qwen-base", messages=MSG)
        assert (await c.chat.completions.create(model="qwen-base", messages=MSG)).choices[0].message.content
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model="qwen-base", messages=[
                {"role": "user", "content": [{"type": "text", "text": "tell me about the forbidden topic"}]}])
        assert err.value.body == {"message": "Input data may contain inappropriate content.",
                                  "type": "data_inspection_failed", "param": None, "code": 400}
        await s.post(url + "/sim/faults", json={"moderation_phrase": None})
        await c.chat.completions.create(model="qwen-base", messages=[{"role": "user", "content": "forbidden topic"}])


async def test_close_next_drops_the_connection(fast_config):
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        await s.post(url + "/sim/faults", json={"close_next": 1})
        with pytest.raises(aiohttp.ClientError):
            async with s.post(url + CHAT, json={"model": "qwen-base", "messages": MSG}) as r:
                await r.read()
        async with s.post(url + CHAT, json={"model": "qwen-base", "messages": MSG}) as r:
            assert r.status == 200
        await s.post(url + "/sim/faults", json={"close_next": 1})
        with pytest.raises(openai.APIConnectionError):
            await client(url).chat.completions.create(model="qwen-base", messages=MSG)


async def test_stall_holds_requests_until_cleared(fast_config):
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        await s.post(url + "/sim/faults", json={"stall_seconds": 300})
        task = asyncio.create_task(client(url).chat.completions.create(model="qwen-base", messages=MSG))
        for _ in range(3000):
            stats = await (await s.get(url + "/sim/stats")).json()
            if stats["running"] == 1:
                break
            await asyncio.sleep(0.02)
        assert stats["running"] == 1 and not task.done()
        await s.post(url + "/sim/faults", json={"stall_seconds": 0})
        # the stall (300 s) ends as soon as the faults change, not when it runs out
        done = await asyncio.wait_for(task, 10)
        assert done.choices[0].message.content.startswith("sim:qwen-base")


async def test_unhealthy_and_fault_validation(fast_config):
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        await s.post(url + "/sim/faults", json={"unhealthy": True})
        assert (await s.get(url + "/health")).status == 503
        await s.post(url + "/sim/faults", json={"unhealthy": False})
        assert (await s.get(url + "/health")).status == 200
        for bad in ({"nope": 1}, {"close_next": -1}, {"stall_seconds": "long"}, {"unhealthy": 1}, [1]):
            async with s.post(url + "/sim/faults", json=bad) as r:
                assert r.status == 400 and "error" in await r.json()


async def test_stats_reset(fast_config):
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        await client(url).chat.completions.create(model="qwen-base", messages=MSG)
        assert (await (await s.get(url + "/sim/stats")).json())["requests_total"] == 1
        stats = await (await s.post(url + "/sim/stats/reset")).json()
        assert stats["requests_total"] == 0 and stats["peak_running"] == 0 and stats["recent_requests"] == []


def test_cli_flags_map_to_config():
    from vlmpool.sim import cli

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args([
        "Qwen/Qwen2.5-VL-7B-Instruct", "--served-model-name", "qwen", "--enable-lora", "--max-loras", "2",
        "--max-cpu-loras", "8", "--max-lora-rank", "32", "--max-num-seqs", "16", "--max-model-len", "8192",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9", "--disable-log-requests",
        "--enforce-eager", "--no-enable-prefix-caching", "--dtype", "bfloat16",
        "--fault-fail-next-loads", "3", "--fault-moderation-phrase", "bad", "--fault-stall-seconds", "1.5"])
    cfg = cli.config_from_args(args)
    assert (cfg.model, cfg.served_names(), cfg.enable_lora) == ("Qwen/Qwen2.5-VL-7B-Instruct", ["qwen"], True)
    assert (cfg.max_loras, cfg.max_cpu_loras, cfg.max_lora_rank, cfg.max_num_seqs, cfg.max_model_len) == (
        2, 8, 32, 16, 8192)
    assert cfg.family == "auto" and cfg.resolved_family() == "qwen2_5_vl"
    assert (cfg.faults.fail_next_loads, cfg.faults.moderation_phrase, cfg.faults.stall_seconds) == (3, "bad", 1.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--max-lora-rank", "48"])  # not a rank vLLM accepts
    with pytest.raises(SystemExit, match="max_cpu_loras"):
        cli.config_from_args(parser.parse_args(["m", "--max-loras", "4", "--max-cpu-loras", "2"]))


async def test_vlmpool_sim_process_stands_in_for_vllm_serve(adapter):
    a = adapter("a")
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vlmpool", "sim", "Qwen/Qwen2.5-VL-3B-Instruct", "--port", "0",
        "--served-model-name", "qwen", "--enable-lora", "--max-model-len", "4096",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.85", "--disable-log-requests",
        "--trust-remote-code", "--ttft-ms", "1", "--tpot-ms", "0",
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 120)).decode()
        m = re.search(r"on (http://\S+) ", line)
        assert m, line
        url = m.group(1)
        async with aiohttp.ClientSession() as s:
            assert (await s.get(url + "/health")).status == 200
            async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(a)}) as r:
                assert r.status == 200
            models = (await (await s.get(url + "/v1/models")).json())["data"]
            assert [(m["id"], m["max_model_len"]) for m in models] == [("qwen", 4096), ("a", None)]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_client_leaving_mid_stream_frees_the_slot_as_abort(fast_config):
    async with running_sim(fast_config(tpot_ms=50)) as url, aiohttp.ClientSession() as s:
        r = await s.post(url + CHAT, json={"model": "qwen-base", "stream": True, "max_tokens": 200,
                                           "ignore_eos": True, "messages": MSG})
        assert (await r.content.readline()).startswith(b"data: ")
        r.close()
        for _ in range(3000):
            stats = await (await s.get(url + "/sim/stats")).json()
            if stats["running"] == 0:
                break
            await asyncio.sleep(0.02)
        assert stats["running"] == 0 and stats["finished"] == {"abort": 1}
