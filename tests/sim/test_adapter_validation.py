"""Adapter directories refused the way vLLM refuses them, each with its message.

Every adapter here is a real directory: adapter_config.json plus a safetensors file written with
torch (or by PEFT itself, from a tiny Qwen2.5-VL model built in memory)."""

from __future__ import annotations

import json
import struct

import aiohttp
import pytest
from sim_helpers import QWEN_LM

from vlmpool.sim.adapters import AdapterError, read_safetensors_header, validate_adapter
from vlmpool.sim.server import running_sim


def refusal(path, *, family="qwen2_5_vl", max_rank=64, strict=True, name="x") -> tuple[int, dict]:
    with pytest.raises(AdapterError) as err:
        validate_adapter(name, str(path), max_lora_rank=max_rank, family_name=family, strict_layout=strict)
    return err.value.status, json.loads(err.value.body)


def engine_message(body: dict) -> str:
    assert body["error"]["type"] == "InternalServerError" and body["error"]["code"] == 500
    # the worker's exception, wrapped by the executor and then the engine core (vLLM 0.32)
    prefix = "Call to add_lora method failed: Worker failed with error '"
    suffix = "', please check the stack trace above for the root cause"
    message = body["error"]["message"]
    assert message.startswith(prefix) and message.endswith(suffix), message
    return message[len(prefix):-len(suffix)]


def test_valid_adapter_is_accepted_with_its_modules(adapter):
    info = validate_adapter("ok", str(adapter("ok", r=16)), max_lora_rank=64, family_name="qwen2_5_vl")
    assert info.rank == 16 and info.tensors == 4
    assert info.modules == ["language_model.model.layers.0.self_attn.q_proj",
                            "language_model.model.layers.0.self_attn.v_proj"]


def test_rank_above_max(adapter):
    status, body = refusal(adapter("big", r=32), max_rank=16)
    assert status == 500 and engine_message(body) == "LoRA rank 32 is greater than max_lora_rank 16."
    # rank_pattern counts too (vLLM takes the max over r and the pattern)
    status, body = refusal(adapter("pat", r=8, config={"rank_pattern": {"v_proj": 128}}), max_rank=64)
    assert engine_message(body) == "LoRA rank 128 is greater than max_lora_rank 64."


def test_dora_is_refused(adapter):
    _, body = refusal(adapter("dora", config={"use_dora": True}))
    assert engine_message(body) == "vLLM does not yet support DoRA."
    # several problems are reported together, joined by a space, in vLLM's order
    _, body = refusal(adapter("dora2", r=128, config={"use_dora": True}))
    assert engine_message(body) == "vLLM does not yet support DoRA. LoRA rank 128 is greater than max_lora_rank 64."


def test_dora_magnitude_tensors_without_use_dora(adapter):
    import torch
    path = adapter("mag", extra_tensors={
        QWEN_LM.format(i=0, m="q_proj") + ".lora_magnitude_vector": torch.ones(16)})
    _, body = refusal(path)
    # vllm/lora/utils.py parse_fine_tuned_lora_name: the mapped key, base_model.model. put back
    assert engine_message(body) == ("base_model.model.language_model.model.layers.0.self_attn.q_proj."
                                    "lora_magnitude_vector is unsupported LoRA weight")


def test_modules_to_save_bias_and_init(adapter):
    _, body = refusal(adapter("mts", config={"modules_to_save": ["lm_head"]}))
    assert engine_message(body) == (
        "vLLM only supports modules_to_save being either None or [\"classifier\", \"score\"] for "
        "classification models. Unsupported modules_to_save: ['lm_head']")
    _, body = refusal(adapter("bias", config={"bias": "lora_only"}))
    assert engine_message(body) == "Adapter bias is not supported."
    _, body = refusal(adapter("pissa", config={"init_lora_weights": "pissa"}))
    assert engine_message(body).startswith("vLLM does not support init_lora_weights='pissa'.")


def test_config_problems(adapter, tmp_path):
    path = adapter("nor")
    cfg = json.loads((path / "adapter_config.json").read_text())
    del cfg["r"]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    _, body = refusal(path)
    assert engine_message(body) == "Missing required configuration fields: {'r'}"

    (path / "adapter_config.json").write_text("{not json")
    _, body = refusal(path)
    assert engine_message(body).startswith("Expecting property name enclosed in double quotes")

    zero = adapter("zero", config={"r": 0})
    _, body = refusal(zero)
    assert engine_message(body) == "LoRA rank `r` must be a positive integer, got 0."

    # no adapter_config.json at all: vLLM's LoRAAdapterNotFoundError → 404
    empty = tmp_path / "empty"
    empty.mkdir()
    status, body = refusal(empty, name="e")
    # vLLM hides paths in every error message it answers (sanitize_message): <path>
    assert status == 404 and body["error"] == {"message": "Loading lora e failed: No adapter found for <path>",
                                               "type": "NotFoundError", "param": None, "code": 404}


def test_weights_missing_or_unreadable(adapter):
    path = adapter("now")
    (path / "adapter_model.safetensors").unlink()
    _, body = refusal(path)
    assert engine_message(body) == "<path> doesn't contain tensors"

    path = adapter("trunc")
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    _, body = refusal(path)
    assert engine_message(body) == "Error while deserializing header: MetadataIncompleteBuffer"

    f.write_bytes(b"\xff" * 64)
    _, body = refusal(path)
    assert engine_message(body) == "Error while deserializing header: HeaderTooLarge"

    f.write_bytes(struct.pack("<Q", 4) + b"[1] ")
    _, body = refusal(path)
    assert engine_message(body) == "Error while deserializing header: InvalidHeaderStart"


def test_safetensors_header_reader_matches_the_library(adapter):
    from safetensors import safe_open
    path = adapter("hdr", r=4) / "adapter_model.safetensors"
    ours = read_safetensors_header(str(path))
    with safe_open(str(path), framework="pt") as f:
        assert sorted(ours) == sorted(f.keys())
        for key in f.keys():
            assert ours[key]["shape"] == list(f.get_slice(key).get_shape())


def test_unexpected_modules_and_weight_names(adapter):
    bad_mod = "base_model.model.model.language_model.layers.0.self_attn.qkv_fused"
    path = adapter("unexp", modules=[bad_mod])
    _, body = refusal(path)
    msg = engine_message(body)
    assert msg.startswith("While loading <path>, expected target modules in {")
    # once per tensor key (lora_A and lora_B), as vLLM's check_unexpected_modules lists them
    assert msg.endswith("but received ['language_model.model.layers.0.self_attn.qkv_fused', "
                        "'language_model.model.layers.0.self_attn.qkv_fused']. "
                        "Please verify that the loaded LoRA module is correct")

    import torch
    path = adapter("named", modules=[], extra_tensors={
        QWEN_LM.format(i=0, m="q_proj") + ".lora_A.default.weight": torch.zeros(8, 16)})
    _, body = refusal(path)
    # vLLM reports the name after its weights mapper ran
    assert engine_message(body) == ("base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A."
                                    "default.weight is unsupported LoRA weight")


# The vLLM module a PEFT q_proj of layer 0 is served as, when a family's mapper maps its layout.
SERVED_Q = "language_model.model.layers.0.self_attn.q_proj"


def test_family_layouts(adapter):
    old = ["base_model.model.model.layers.0.self_attn.q_proj"]
    new = [QWEN_LM.format(i=0, m="q_proj")]
    # Qwen2.5-VL maps both the old (model.layers) and the new (model.language_model.layers) layout
    for mods in (old, new):
        info = validate_adapter("q", str(adapter(f"q25-{len(mods[0])}", modules=mods)), max_lora_rank=64,
                                family_name="qwen2_5_vl")
        assert info.modules == [SERVED_Q], (mods, info.modules)
    # Qwen3-VL maps only the new layout: the old one is what vLLM silently ignores
    info = validate_adapter("q3", str(adapter("q3new", modules=new)), max_lora_rank=64, family_name="qwen3_vl")
    assert info.modules == [SERVED_Q]
    _, body = refusal(adapter("q3old", modules=old), family="qwen3_vl")
    msg = engine_message(body)
    assert msg.startswith("[vlmpool sim]") and "model.layers.0.self_attn.q_proj" in msg
    assert "base_model.model.model.language_model.layers.N.<module>" in msg
    # without the strict layout check the simulator accepts what vLLM accepts: a module of no language layer
    info = validate_adapter("q3", str(adapter("q3old2", modules=old)), max_lora_rank=64, family_name="qwen3_vl",
                            strict_layout=False)
    assert info.modules == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("family", ["qwen3_5", "gemma3"])
def test_new_family_layouts(adapter, family):
    """Qwen3.5 and Gemma 3 map only the model.language_model.layers layout (no bare model. rule in their
    vLLM mappers): the old one maps to no module and is refused by the strict layout check."""
    old = ["base_model.model.model.layers.0.self_attn.q_proj"]
    info = validate_adapter("n", str(adapter(f"{family}-new", modules=[QWEN_LM.format(i=0, m="q_proj")])),
                            max_lora_rank=64, family_name=family)
    assert info.modules == [SERVED_Q]
    _, body = refusal(adapter(f"{family}-old", modules=old), family=family)
    assert engine_message(body).startswith("[vlmpool sim]")


def test_mistral3_maps_the_text_only_layout(adapter):
    """Mistral 3's mapper also maps model.layers (PEFT LoRAs trained on the text submodule)."""
    info = validate_adapter("m", str(adapter("m-old", modules=["base_model.model.model.layers.0.self_attn.q_proj"])),
                            max_lora_rank=64, family_name="mistral3")
    assert info.modules == [SERVED_Q]


def test_shape_must_match_rank(adapter):
    _, body = refusal(adapter("shape", r=8, rank_in_tensors=4))
    assert "do not match rank 8" in engine_message(body)


def _tiny_qwen25_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        vocab_size=128, hidden_size=32)
    return Qwen2_5_VLForConditionalGeneration(cfg)


async def test_real_peft_adapters_over_http(fast_config, tmp_path):
    """PEFT's own save_pretrained output: a LoRA loads and serves, a DoRA is refused."""
    import peft

    lora_dir, dora_dir = tmp_path / "peft-lora", tmp_path / "peft-dora"
    model = _tiny_qwen25_vl()
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
                        ).save_pretrained(str(lora_dir))
    model = _tiny_qwen25_vl()
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
                        ).save_pretrained(str(dora_dir))

    async with running_sim(fast_config()) as url, aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": "ft", "lora_path": str(lora_dir)}) as r:
            assert r.status == 200, await r.text()
        async with s.post(url + "/v1/chat/completions", json={
                "model": "ft", "messages": [{"role": "user", "content": "hello"}]}) as r:
            assert (await r.json())["choices"][0]["message"]["content"].startswith(f"sim:ft path={lora_dir}")
        async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": "dora", "lora_path": str(dora_dir)}) as r:
            assert r.status == 500
            assert (await r.json())["error"]["message"] == (
                "Call to add_lora method failed: Worker failed with error 'vLLM does not yet support DoRA.', "
                "please check the stack trace above for the root cause")


def test_family_is_detected_from_the_model_name():
    from vlmpool.sim.adapters import detect_family
    from vlmpool.sim.server import SimConfig

    assert detect_family("Qwen/Qwen3-VL-8B-Instruct") == "qwen3_vl"
    assert detect_family("/models/qwen2.5-vl-7b") == "qwen2_5_vl"
    assert detect_family("Qwen/Qwen2-VL-2B-Instruct") == "qwen2_vl"
    assert detect_family("meta-llama/Llama-3.1-8B") == "llama"
    assert detect_family("bench-base") == "qwen2_5_vl"
    assert detect_family("roboflow/qwen3_5-2b") == "qwen3_5" and detect_family("Qwen/Qwen3.5-4B") == "qwen3_5"
    assert detect_family("google/gemma-3-4b-it") == "gemma3"
    assert detect_family("mistralai/Mistral-Small-3.1-24B-Instruct-2503") == "mistral3"
    # every family of the table is found from its own test model
    from vlmpool.families import FAMILIES
    assert {n: detect_family(f.test_model) for n, f in FAMILIES.items()} == {n: n for n in FAMILIES}
    assert SimConfig(model="Qwen/Qwen3-VL-4B-Instruct").resolved_family() == "qwen3_vl"
    assert SimConfig(model="Qwen/Qwen3-VL-4B-Instruct", family="qwen2_5_vl").resolved_family() == "qwen2_5_vl"
