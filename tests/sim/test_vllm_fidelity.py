"""Behaviours of the pinned vLLM release that the simulator follows (docs/sim.md has the source lines):
a shape mismatch that loads and fails at first use, the base-name clash, unload that keeps the CPU
LRU entry, rank_pattern texts and the single release pin."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp

from vlmpool.sim import contract
from vlmpool.sim.server import running_sim

CHAT = [{"role": "user", "content": "hi"}]


async def post(s: aiohttp.ClientSession, url: str, body) -> tuple[int, str]:
    async with s.post(url, json=body) as r:
        return r.status, await r.text()


async def test_shape_mismatch_loads_and_kills_the_engine_at_first_use(fast_config, adapter):
    bad = adapter("bad", r=8, rank_in_tensors=4)   # A/B of rank 4, config says 8
    good = adapter("good")
    async with running_sim(fast_config(lora_shape_check="first-use")) as url, aiohttp.ClientSession() as s:
        assert (await post(s, url + "/v1/load_lora_adapter", {"lora_name": "good", "lora_path": str(good)}))[0] == 200
        status, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
        assert (status, text) == (200, "Success: LoRA adapter 'bad' added successfully.")
        # the base model and other adapters serve until a request uses it
        assert (await post(s, url + "/v1/chat/completions", {"model": "good", "messages": CHAT}))[0] == 200
        status, text = await post(s, url + "/v1/chat/completions", {"model": "bad", "messages": CHAT})
        assert status == 500
        assert json.loads(text)["error"]["message"] == contract.ENGINE_DEAD_MESSAGE
        # the engine core is dead: everything fails and /health says so, as vLLM's V1 engine does
        assert (await post(s, url + "/v1/chat/completions", {"model": "qwen-base", "messages": CHAT}))[0] == 500
        async with s.get(url + "/health") as r:
            assert r.status == 503
        stats = await (await s.get(url + "/sim/stats")).json()
        assert stats["engine_dead"] and "bad failed at its first use" in stats["engine_dead_reason"]
        assert "do not match rank 8" in stats["engine_dead_reason"]


async def test_shape_mismatch_is_refused_at_load_by_default(fast_config, adapter):
    bad = adapter("bad", r=8, rank_in_tensors=4)
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        status, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
        assert status == 500 and "[vlmpool sim]" in text and "do not match rank 8" in text


async def test_rank_pattern_is_matched_on_the_checkpoint_name(fast_config, adapter):
    # rank 4 for q_proj through rank_pattern (a suffix of the checkpoint's module name): it fits
    path = adapter("rp", r=8, rank_in_tensors=4, config={"rank_pattern": {"q_proj": 4, "v_proj": 4}})
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        assert (await post(s, url + "/v1/load_lora_adapter", {"lora_name": "rp", "lora_path": str(path)}))[0] == 200
        bad = adapter("rp0", config={"rank_pattern": {"q_proj": 0}})
        status, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "rp0", "lora_path": str(bad)})
        assert status == 500 and json.loads(text)["error"]["message"] == (
            "Call to add_lora method failed: LoRA rank for `q_proj` in `rank_pattern` must be a positive "
            "integer, got 0.")


async def test_a_lora_named_like_the_base_model_is_400(fast_config, adapter):
    a = adapter("a")
    cfg = fast_config(served_model_name=["qwen-base", "alias"])
    async with running_sim(cfg) as url, aiohttp.ClientSession() as s:
        for name in ("qwen-base", "alias"):
            status, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(a)})
            assert status == 400
            assert json.loads(text) == {"error": {
                "message": f"The lora adapter '{name}' conflicts with a served base model.",
                "type": "InvalidUserInput", "param": None, "code": 400}}
        stats = await (await s.get(url + "/sim/stats")).json()
        assert stats["loaded_adapters"] == []


async def test_unload_keeps_the_weights_in_the_cpu_lru(fast_config, adapter):
    a = adapter("a")
    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        assert (await post(s, url + "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(a)}))[0] == 200
        assert (await post(s, url + "/v1/unload_lora_adapter", {"lora_name": "a"}))[0] == 200
        stats = await (await s.get(url + "/sim/stats")).json()
        assert stats["loaded_adapters"] == [] and stats["cpu_cached_adapters"] == ["a"]


def test_one_release_pin_for_sim_image_and_test_env():
    root = Path(__file__).resolve().parents[2]
    assert re.fullmatch(r"\d+\.\d+\.\d+", contract.VLLM_RELEASE)
    from vlmpool.api.pool import DEFAULT_ENGINE_IMAGE
    assert DEFAULT_ENGINE_IMAGE == f"vllm/vllm-openai:v{contract.VLLM_RELEASE}"
    crd = root / "crds" / "vlmpool.io_vlmpools.yaml"
    assert f"vllm/vllm-openai:v{contract.VLLM_RELEASE}" in crd.read_text()
    # hack/vllm-env.sh (make test-vllm) reads the pin from contract.py, nowhere else
    assert "operator/vlmpool/sim/contract.py" in (root / "hack" / "vllm-env.sh").read_text()
