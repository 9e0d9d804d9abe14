"""Runtime LoRA routes over raw HTTP: vLLM's exact status codes and bodies."""

from __future__ import annotations

import json

import aiohttp
import pytest

from vlmpool.sim.server import running_sim


async def post(s: aiohttp.ClientSession, url: str, body) -> tuple[int, str, str]:
    async with s.post(url, json=body) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def test_load_unload_cycle_exact_answers(fast_config, adapter):
    a1 = adapter("a1")
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        status, ctype, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(a1)})
        assert (status, text) == (200, "Success: LoRA adapter 'a1' added successfully.")
        assert not ctype.startswith("application/json")  # plain text, not JSON

        status, ctype, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(a1)})
        assert status == 400 and ctype.startswith("application/json")
        assert json.loads(text) == {"error": {
            "message": "The lora adapter 'a1' has already been loaded. If you want to load the adapter in place, "
                       "set 'load_inplace' to True.",
            "type": "InvalidUserInput", "param": None, "code": 400}}

        # load_inplace replaces the registration (same name, new path)
        a1b = adapter("a1b")
        status, _, text = await post(s, url + "/v1/load_lora_adapter",
                                     {"lora_name": "a1", "lora_path": str(a1b), "load_inplace": True})
        assert status == 200
        models = await (await s.get(url + "/v1/models")).json()
        assert [m["root"] for m in models["data"] if m["id"] == "a1"] == [str(a1b)]

        status, _, text = await post(s, url + "/v1/unload_lora_adapter", {"lora_name": "a1"})
        assert (status, text) == (200, "Success: LoRA adapter 'a1' removed successfully.")

        status, _, text = await post(s, url + "/v1/unload_lora_adapter", {"lora_name": "a1"})
        assert status == 404
        assert json.loads(text) == {"error": {"message": "The lora adapter 'a1' cannot be found.",
                                              "type": "NotFoundError", "param": None, "code": 404}}

        # an unloaded adapter is an unknown model again — the self-heal trigger text
        status, _, text = await post(s, url + "/v1/chat/completions",
                                     {"model": "a1", "messages": [{"role": "user", "content": "x"}]})
        assert status == 404 and json.loads(text)["error"]["message"] == (
            "The model `a1` does not exist. Valid aliases: qwen-base.")


async def test_missing_and_empty_fields(fast_config):
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        status, _, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "", "lora_path": ""})
        assert status == 400 and json.loads(text) == {"error": {
            "message": "Both 'lora_name' and 'lora_path' must be provided.", "type": "InvalidUserInput",
            "param": None, "code": 400}}
        # a field the request model requires: FastAPI's validation error, as vLLM 0.32 answers it
        status, _, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "x"})
        assert status == 400 and json.loads(text)["error"] == {
            "message": "1 validation error:\n  {'type': 'missing', 'loc': 'body.lora_path', 'msg': 'Field required', "
                       "'input': '<dict of 1 items>'}", "type": "Bad Request", "param": "body.lora_path", "code": 400}
        status, _, text = await post(s, url + "/v1/unload_lora_adapter", {})
        assert status == 400 and json.loads(text)["error"]["param"] == "body.lora_name"
        status, _, text = await post(s, url + "/v1/unload_lora_adapter", {"lora_name": ""})
        assert status == 400 and json.loads(text)["error"]["message"] == (
            "'lora_name' needs to be provided to unload a LoRA adapter.")


async def test_missing_directory_is_404_adapter_not_found(fast_config, tmp_path):
    missing = tmp_path / "nowhere"
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        status, _, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": str(missing)})
        assert status == 404
        assert json.loads(text) == {"error": {"message": "Loading lora gone failed: No adapter found for <path>",
                                              "type": "NotFoundError", "param": None, "code": 404}}
        models = await (await s.get(url + "/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["qwen-base"]


async def test_bad_adapter_is_500_engine_failure(fast_config, adapter):
    big = adapter("big", r=128)
    async with running_sim(fast_config(max_lora_rank=64)) as url, aiohttp.ClientSession() as s:
        status, _, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(big)})
        assert status == 500
        assert json.loads(text) == {"error": {
            "message": "Call to add_lora method failed: Worker failed with error 'LoRA rank 128 is greater than "
                       "max_lora_rank 64.', please check the stack trace above for the root cause",
            "type": "InternalServerError", "param": None, "code": 500}}
        stats = await (await s.get(url + "/sim/stats")).json()
        assert stats["loaded_adapters"] == []


async def test_routes_exist_only_when_runtime_updating_is_allowed(fast_config, adapter, monkeypatch):
    a1 = adapter("a1")
    async with running_sim(fast_config(runtime_lora=False)) as url, aiohttp.ClientSession() as s:
        status, _, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(a1)})
        assert status == 404 and json.loads(text) == {"detail": "Not Found"}  # FastAPI's unknown-route answer

    # runtime_lora=None reads VLLM_ALLOW_RUNTIME_LORA_UPDATING as vLLM does ("1"/"true", any case)
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    async with running_sim(fast_config(runtime_lora=None)) as url, aiohttp.ClientSession() as s:
        status, _, _ = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(a1)})
        assert status == 200
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "no")
    async with running_sim(fast_config(runtime_lora=None)) as url, aiohttp.ClientSession() as s:
        status, _, _ = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(a1)})
        assert status == 404


async def test_runtime_routes_without_enable_lora(fast_config, adapter):
    a1 = adapter("a1")
    async with running_sim(fast_config(enable_lora=False)) as url, aiohttp.ClientSession() as s:
        status, _, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(a1)})
        assert status == 500
        assert json.loads(text)["error"]["message"] == (
            "Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA.")
        metrics = await (await s.get(url + "/metrics")).text()
        assert "vllm:lora_requests_info" not in metrics  # the gauge exists only with LoRA enabled


async def test_static_lora_modules_are_loaded_at_start(fast_config, adapter):
    a1 = adapter("a1")
    async with running_sim(fast_config(lora_modules=[("static-a", str(a1))], runtime_lora=False)) as url:
        async with aiohttp.ClientSession() as s:
            models = await (await s.get(url + "/v1/models")).json()
            assert {m["id"]: m["parent"] for m in models["data"]} == {"qwen-base": None, "static-a": "qwen-base"}


async def test_static_lora_module_that_fails_stops_startup(fast_config, adapter):
    big = adapter("big", r=128)
    with pytest.raises(RuntimeError, match="LoRA rank 128 is greater than max_lora_rank 64"):
        async with running_sim(fast_config(lora_modules=[("big", str(big))])):
            pass


@pytest.mark.parametrize("workers", [0, 1])
async def test_lora_load_workers_bound_concurrent_reads(fast_config, adapter, workers):
    """--lora-load-workers 1 reads one adapter at a time, as vLLM's EngineCore runs add_lora calls one
    after the other; 0 (the default) lets loads of different names overlap."""
    import asyncio
    import itertools
    import time

    paths = [adapter(f"w{i}") for i in range(3)]
    async with running_sim(fast_config(lora_load_ms=300, lora_load_workers=workers)) as url, \
            aiohttp.ClientSession() as s:
        async def load(i: int) -> float:
            body = {"lora_name": f"w{i}", "lora_path": str(paths[i])}
            status, _, _ = await post(s, url + "/v1/load_lora_adapter", body)
            assert status == 200
            return time.monotonic()

        done = sorted(await asyncio.gather(*(load(i) for i in range(3))))
    gaps = [b - a for a, b in itertools.pairwise(done)]
    if workers == 1:
        assert all(g >= 0.28 for g in gaps), gaps  # each read waited for the one before
    else:
        assert done[-1] - done[0] < 0.45, gaps  # the three reads overlapped
