"""Behaviours of the pinned vLLM release that the simulator follows (docs/sim.md has the source lines):
tensors that do not fit vLLM's LoRA buffers refused at load (the engine stays healthy), prompts over
max-model-len, token counts from the model's tokenizer, the base-name clash, unload that keeps the CPU
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


def _model_dir(tmp_path: Path, hidden: int = 16, heads: int = 2, head_dim: int = 8) -> str:
    """A model directory with only a config.json: the sizes the simulator reads (no tokenizer)."""
    d = tmp_path / "Qwen2.5-VL-sized"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"text_config": {
        "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_attention_heads": heads,
        "num_key_value_heads": 1, "head_dim": head_dim}}))
    return str(d)


async def test_tensors_larger_than_the_lora_buffers_are_refused_at_load_and_the_engine_stays_healthy(
        fast_config, adapter, tmp_path):
    # vLLM 0.32 activates an adapter inside add_lora: set_lora copies A [r, in] into a [max_lora_rank, in]
    # buffer, and a larger tensor fails the load (500, torch's text) while the engine stays up
    wide = adapter("wide", hidden=32)    # in-features 32, the model's 16
    narrow = adapter("narrow", hidden=8)  # smaller: fits the buffers, loads and serves
    cfg = fast_config(model=_model_dir(tmp_path), max_lora_rank=8, lora_shape_check="off")
    async with running_sim(cfg) as url, aiohttp.ClientSession() as s:
        status, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "wide", "lora_path": str(wide)})
        assert status == 500 and json.loads(text)["error"] == {
            "message": "Call to add_lora method failed: Worker failed with error 'The size of tensor a (16) must "
                       "match the size of tensor b (32) at non-singleton dimension 1', please check the stack "
                       "trace above for the root cause",
            "type": "InternalServerError", "param": None, "code": 500}
        async with s.get(url + "/health") as r:
            assert r.status == 200
        load = {"lora_name": "narrow", "lora_path": str(narrow)}
        assert (await post(s, url + "/v1/load_lora_adapter", load))[0] == 200
        assert (await post(s, url + "/v1/chat/completions", {"model": "narrow", "messages": CHAT}))[0] == 200
        # a rank in the tensors above --max-lora-rank (the config says 8): the buffer's rank dimension
        deep = adapter("deep", r=8, rank_in_tensors=16)
        status, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "deep", "lora_path": str(deep)})
        assert status == 500 and "tensor a (8) must match the size of tensor b (16) at non-singleton dimension 0" \
            in text
        stats = await (await s.get(url + "/sim/stats")).json()
        assert not stats["engine_dead"] and stats["loaded_adapters"] == ["narrow"]


async def test_rank_mismatch_that_fits_loads_as_in_vllm_with_shape_check_off(fast_config, adapter):
    bad = adapter("bad", r=8, rank_in_tensors=4)   # A/B of rank 4, config says 8: vLLM copies what fits
    async with running_sim(fast_config(lora_shape_check="off")) as url, aiohttp.ClientSession() as s:
        status, text = await post(s, url + "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
        assert (status, text) == (200, "Success: LoRA adapter 'bad' added successfully.")
        assert (await post(s, url + "/v1/chat/completions", {"model": "bad", "messages": CHAT}))[0] == 200


async def test_kill_engine_on_adapter_fault(fast_config, adapter):
    """The fault the proxy's adapter_failed handling is tested with: an engine that dies at the first request
    through one adapter (an exception in a model step), every later request 500 and /health 503."""
    good = adapter("good")
    cfg = fast_config()
    cfg.faults.kill_engine_on_adapter = "bad"
    async with running_sim(cfg) as url, aiohttp.ClientSession() as s:
        for name in ("good", "bad"):
            assert (await post(s, url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(good)}))[0] == 200
        assert (await post(s, url + "/v1/chat/completions", {"model": "good", "messages": CHAT}))[0] == 200
        status, text = await post(s, url + "/v1/chat/completions", {"model": "bad", "messages": CHAT})
        assert status == 500 and json.loads(text)["error"]["message"] == contract.ENGINE_DEAD_MESSAGE
        assert (await post(s, url + "/v1/chat/completions", {"model": "qwen-base", "messages": CHAT}))[0] == 500
        async with s.get(url + "/health") as r:
            assert r.status == 503
        stats = await (await s.get(url + "/sim/stats")).json()
        assert stats["engine_dead"] and "kill_engine_on_adapter" in stats["engine_dead_reason"]


async def test_prompt_over_max_model_len_is_vllms_400(fast_config):
    async with running_sim(fast_config(max_model_len=64)) as url, aiohttp.ClientSession() as s:
        status, text = await post(s, url + "/v1/chat/completions",
                                  {"model": "qwen-base", "messages": [{"role": "user", "content": "w " * 100}]})
        assert status == 400 and json.loads(text)["error"] == {
            "message": "This model's maximum context length is 64 tokens. However, your prompt contains at least 65 "
                       "input tokens, which exceeds this limit even without any output tokens. Please reduce the "
                       "length of the input prompt. (parameter=input_tokens, value=65)",
            "type": "BadRequestError", "param": "input_tokens", "code": 400}
        status, _ = await post(s, url + "/v1/completions", {"model": "qwen-base", "prompt": "w " * 100})
        assert status == 400


async def test_tokens_come_from_the_models_tokenizer(fast_config, tmp_path):
    """With a tokenizer in the model directory, prompt tokens are vLLM's: chat template applied (68 for
    "Hello there" on the tiny Qwen2.5-VL, as real vLLM counts), an image's placeholder expanded to its tokens
    (a 64x64 PNG: 4), a completion's text tokenized (11); without one, words (6)."""
    import base64

    from vlmpool.testing.images import png
    from vlmpool.testing.vlm_model import make_model

    model = str(make_model(tmp_path / "Qwen2.5-VL-tiny"))
    image = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()
    big = "data:image/png;base64," + base64.b64encode(png(600, 300)).decode()
    async with running_sim(fast_config(model=model)) as url, aiohttp.ClientSession() as s:
        def usage(text: str) -> int:
            return json.loads(text)["usage"]["prompt_tokens"]
        status, text = await post(s, url + "/v1/chat/completions",
                                  {"model": "qwen-base", "messages": [{"role": "user", "content": "Hello there"}]})
        assert status == 200 and usage(text) == 68
        parts = [{"type": "text", "text": "Hello there"}, {"type": "image_url", "image_url": {"url": image}}]
        status, text = await post(s, url + "/v1/chat/completions",
                                  {"model": "qwen-base", "messages": [{"role": "user", "content": parts}]})
        # the template's <|vision_start|><|image_pad|><|vision_end|> (3) with the pad expanded to 4 tokens
        assert status == 200 and usage(text) == 68 + 3 + 3
        parts[1] = {"type": "image_url", "image_url": {"url": big}}
        status, text = await post(s, url + "/v1/chat/completions",
                                  {"model": "qwen-base", "messages": [{"role": "user", "content": parts}]})
        # 600x300 over the 64 x 28^2 pixel budget: resized to 308x140 (multiples of 28), 22 x 10 patches of 14,
        # merged 2x2: 55 tokens
        assert status == 200 and usage(text) == 68 + 2 + 55
        status, text = await post(s, url + "/v1/completions", {"model": "qwen-base", "prompt": "Hello there"})
        assert status == 200 and usage(text) == 11
    async with running_sim(fast_config(model=model, model_tokenizer=False)) as url, aiohttp.ClientSession() as s:
        status, text = await post(s, url + "/v1/chat/completions",
                                  {"model": "qwen-base", "messages": [{"role": "user", "content": "Hello there"}]})
        assert status == 200 and json.loads(text)["usage"]["prompt_tokens"] == 6


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
            "Call to add_lora method failed: Worker failed with error 'LoRA rank for `q_proj` in `rank_pattern` "
            "must be a positive integer, got 0.', please check the stack trace above for the root cause")


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
    # hack/vllm-env.sh (make test-vllm) reads the pin from pins.py, nowhere else
    assert "operator/vlmpool/pins.py VLLM_RELEASE" in (root / "hack" / "vllm-env.sh").read_text()
