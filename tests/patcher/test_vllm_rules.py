"""What the pinned vLLM release refuses or serves at load time, decided at patch time instead
(vllm/lora/peft_helper.py; docs/sim.md has the lines): unsupported LoRA features are refused with
UnsupportedLoraFeature, rank_pattern/alpha_pattern are served (and still select the same modules after the
key rewrite), keys already in vLLM's module layout are accepted."""

from __future__ import annotations

import json

import pytest
import torch
from patcher_testlib import LANG_TARGETS, POOL_BASE, edit_config, load_peft, refuse, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmpool.patcher import PatchOptions, patch_and_publish

FAM = "qwen2_vl"


@pytest.mark.parametrize("changes, match", [
    ({"lora_bias": True}, r"lora_bias is set"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa': inits such as PiSSA"),
    ({"init_lora_weights": "olora"}, r"init_lora_weights='olora'"),
    ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq'"),
    ({"alora_invocation_tokens": [1, 2]}, r"Activated LoRA \(aLoRA\)"),
    ({"layer_replication": [[0, 1]]}, r"layer_replication is set"),
    ({"use_bdlora": {"nblocks": 2}}, r"block-diagonal LoRA \(BD-LoRA\)"),
    ({"use_qalora": True}, r"QALoRA"),
    ({"bias": "lora_only"}, r"bias='lora_only'"),
    ({"bias": None}, r"bias=None"),
])
def test_features_vllm_refuses_are_refused_at_patch_time(lora, tmp_path, changes, match):
    edit_config(lora, **changes)
    refuse(lora, tmp_path, "UnsupportedLoraFeature", r"^vLLM refuses this adapter at load time: .*" + match)


def test_several_features_are_named_together(lora, tmp_path):
    edit_config(lora, use_qalora=True, layer_replication=[[0, 1]])
    e = refuse(lora, tmp_path, "UnsupportedLoraFeature", r"layer_replication is set.*; use_qalora is set")
    assert e.message.count(";") == 1


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica", "lora_ga", "Gaussian"])
def test_inits_that_only_choose_the_start_are_served(lora, tmp_path, init):
    edit_config(lora, init_lora_weights=init)
    s = patch_and_publish(str(lora), "ad", tmp_path / "vol", PatchOptions(family=FAM, pool_base=POOL_BASE[FAM]))
    # served as written, without a word: how training started does not change what vLLM loads
    published = tmp_path / "vol" / "ad" / "versions" / s["version"]
    assert json.loads((published / "adapter_config.json").read_text())["init_lora_weights"] == init
    assert (published / "adapter_model.safetensors").is_file() and s["warnings"] == []


def _pattern_adapter(out, family=FAM):
    """A real PEFT adapter with per-module ranks and alphas (q_proj rank 4, v_proj alpha 64, layer 1's
    o_proj rank 2 by a full-path key), lora_B randomised as if trained."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(LANG_TARGETS), lora_dropout=0.0,
                     rank_pattern={"q_proj": 4, "model.language_model.layers.1.self_attn.o_proj": 2},
                     alpha_pattern={"v_proj": 64})
    pm = get_peft_model(tiny_model(family), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(out)
    edit_config(out, base_model_name_or_path=POOL_BASE[family])
    return out


def _logits(model):
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_rank_and_alpha_patterns_are_served_and_keep_outputs(tmp_path):
    src = _pattern_adapter(tmp_path / "src")
    # legacy layer keys: the rewrite renames modules, and the patterns must still select the same ones
    tensors = {k.replace("model.language_model.layers.", "model.layers."): t
               for k, t in load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(tensors, str(src / "adapter_model.safetensors"))
    edit_config(src, rank_pattern={"q_proj": 4, "model.layers.1.self_attn.o_proj": 2})  # as that layout names it
    s = patch_and_publish(str(src), "ad", tmp_path / "vol", PatchOptions(family=FAM, pool_base=POOL_BASE[FAM]))
    out = tmp_path / "vol" / "ad" / "versions" / s["version"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    q0 = r"model\.language_model\.layers\.0\.self_attn\.q_proj"
    assert cfg["rank_pattern"][q0] == 4
    assert cfg["rank_pattern"][r"model\.language_model\.layers\.1\.self_attn\.o_proj"] == 2
    assert cfg["alpha_pattern"][r"model\.language_model\.layers\.1\.self_attn\.v_proj"] == 64
    assert len(cfg["rank_pattern"]) == 3 and len(cfg["alpha_pattern"]) == 2  # only the modules that differ
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.get_tensor("base_model.model." + q0.replace("\\", "") + ".lora_A.weight").shape[0] == 4
    # PEFT reads the rewritten patterns back to the same model as the source adapter
    # (the source's keys were rewritten above; a fresh copy of the same adapter is the reference)
    fresh = _pattern_adapter(tmp_path / "src0")
    assert torch.allclose(_logits(load_peft(FAM, fresh)), _logits(load_peft(FAM, out)), atol=1e-5)


def test_a_pattern_rank_over_the_max_is_rank_too_high(tmp_path):
    src = _pattern_adapter(tmp_path / "src")
    edit_config(src, rank_pattern={"q_proj": 128})
    refuse(src, tmp_path, "RankTooHigh", r"rank_pattern gives 'q_proj' rank 128, over the pool's max LoRA rank 64")


def test_a_pattern_that_does_not_fit_the_tensors_is_a_shape_mismatch(tmp_path):
    src = _pattern_adapter(tmp_path / "src")
    edit_config(src, rank_pattern={"q_proj": 2})
    refuse(src, tmp_path, "ShapeMismatch", r"q_proj: lora_A \(4, 64\) .* rank_pattern=2")


def test_keys_in_vllm_layout_are_accepted(lora, tmp_path):
    peft_prefix = "base_model.model.model.language_model.layers."
    vllm_prefix = "base_model.model.language_model.model.layers."
    tensors = {k.replace(peft_prefix, vllm_prefix): t
               for k, t in load_file(str(lora / "adapter_model.safetensors")).items()}
    assert any(k.startswith("base_model.model.language_model.model.layers.") for k in tensors)
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    s = patch_and_publish(str(lora), "ad", tmp_path / "vol", PatchOptions(family=FAM, pool_base=POOL_BASE[FAM]))
    out = tmp_path / "vol" / "ad" / "versions" / s["version"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    assert s["tensorsKept"] == 2 * 7 * 2  # 2 layers x 7 projections x A/B


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_tower_connector_lora_keeps_the_vision_modules_vllm_serves(family, tmp_path):
    """engine.towerConnectorLora (vLLM --enable-tower-connector-lora): a trained vision-tower LoRA is served,
    written under model.visual. (vLLM maps it to visual.); without the flag it is refused as before."""
    from patcher_testlib import VISION_TARGETS, make_adapter

    src = make_adapter(family, tmp_path / "src", targets=LANG_TARGETS + VISION_TARGETS[family], train_vision=True)
    with pytest.raises(Exception) as ei:
        patch_and_publish(str(src), "ad", tmp_path / "vol0", PatchOptions(family=family, pool_base=POOL_BASE[family]))
    assert getattr(ei.value, "reason", None) == "TrainedVisionTower"
    s = patch_and_publish(str(src), "ad", tmp_path / "vol", PatchOptions(family=family, pool_base=POOL_BASE[family],
                                                                          tower_connector_lora=True))
    out = tmp_path / "vol" / "ad" / "versions" / s["version"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    source = load_file(str(src / "adapter_model.safetensors"))
    vision_src = [k for k in source if ".visual." in k]
    vision_out = [k for k in keys if k.startswith("base_model.model.model.visual.")]
    assert vision_src and len(vision_out) == len(vision_src) and s["tensorsDropped"] == 0
    assert len(keys) == len(source)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(VISION_TARGETS[family]) <= set(cfg["target_modules"])
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        for k in vision_out:  # the trained tensors, unchanged
            assert torch.equal(f.get_tensor(k), source[k])
