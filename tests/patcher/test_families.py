"""Plain LoRA adapters of each family: the patched adapter, loaded by PEFT into the same base, gives
the same outputs as the original one (its vision-tower LoRA was untrained, so dropping it is exact);
keys and config are what vLLM loads."""

from __future__ import annotations

import json

import pytest
import torch
from patcher_testlib import FAMILIES, POOL_BASE, load_peft, make_adapter
from safetensors import safe_open

from vlmpool.families import FAMILIES as TABLE
from vlmpool.patcher import PatchOptions, patch_and_publish
from vlmpool.patcher.families import parse_key

TEMPLATE_PREFIX = "base_model.model.model.language_model.layers."


def _logits(model, seed=0):
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_patch_keeps_outputs_and_drops_vision(family, lora_dirs, tmp_path):
    src = lora_dirs[family]
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f:
        src_keys = list(f.keys())
    vision_keys = [k for k in src_keys if any(m in k for m in TABLE[family].vision_markers)]
    assert vision_keys, "the fixture has a vision-tower LoRA"

    s = patch_and_publish(str(src), "ad", tmp_path / "vol", PatchOptions(family=family, pool_base=POOL_BASE[family]))
    assert s["ok"] and s["baseCheck"] == "match" and s["doraPolicy"] == "none"
    out = tmp_path / "vol" / "ad" / "versions" / s["version"]
    assert s["path"] == str(out)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert all(k.startswith(TEMPLATE_PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert len(keys) == len(src_keys) - len(vision_keys) == s["tensorsKept"]
    assert s["tensorsDropped"] == len(vision_keys)
    report = json.loads((out / "patch_report.json").read_text())
    assert sorted(report["dropped_vision_keys"]) == sorted(vision_keys)
    assert report["vision_lora_b_norm_max"] == 0.0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg["use_dora"] is False and cfg["r"] == 8 and cfg["lora_alpha"] == 16

    original, patched = load_peft(family, src), load_peft(family, out)
    lo, lp = _logits(original), _logits(patched)
    assert torch.allclose(lo, lp, atol=1e-5, rtol=1e-5)
    # and the adapter does something: without it the outputs differ
    with original.disable_adapter():
        assert not torch.allclose(_logits(original), lo, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_legacy_layer_keys_and_adapter_names_are_remapped(family, lora_dirs, tmp_path):
    """An adapter saved with transformers < 4.52 (language layers at model.layers.N) and with the adapter
    name still in its keys: both rules rewrite it to the template; outputs are unchanged."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "legacy"
    src.mkdir()
    (src / "adapter_config.json").write_text((lora_dirs[family] / "adapter_config.json").read_text())
    tensors = load_file(str(lora_dirs[family] / "adapter_model.safetensors"))
    legacy = {}
    for k, t in tensors.items():
        k = k.replace("model.language_model.layers.", "model.layers.")
        k = k.replace(".lora_A.weight", ".lora_A.default.weight")
        legacy[k] = t
    save_file(legacy, str(src / "adapter_model.safetensors"))
    s = patch_and_publish(str(src), "ad", tmp_path / "vol", PatchOptions(family=family, pool_base=POOL_BASE[family]))
    out = tmp_path / "vol" / "ad" / "current"
    report = json.loads((out / "patch_report.json").read_text())
    rules = {r["rule"]: r["count"] for r in report["key_rules"]}
    n = s["tensorsKept"]
    assert rules == {"adapter-name": n // 2, "peft-prefix": 0, "language-layers": n}
    assert s["tensorsRemapped"] == n
    assert torch.allclose(_logits(load_peft(family, lora_dirs[family])), _logits(load_peft(family, out)), atol=1e-5)


def test_keys_without_peft_prefix_get_it(lora_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "noprefix"
    src.mkdir()
    (src / "adapter_config.json").write_text((lora_dirs["qwen3_vl"] / "adapter_config.json").read_text())
    tensors = load_file(str(lora_dirs["qwen3_vl"] / "adapter_model.safetensors"))
    save_file({k.removeprefix("base_model.model."): t for k, t in tensors.items()},
              str(src / "adapter_model.safetensors"))
    s = patch_and_publish(str(src), "ad", tmp_path / "vol",
                          PatchOptions(family="qwen3_vl", pool_base=POOL_BASE["qwen3_vl"]))
    report = json.loads((tmp_path / "vol/ad/current/patch_report.json").read_text())
    assert {r["rule"]: r["count"] for r in report["key_rules"]}["peft-prefix"] == s["tensorsKept"]
    assert torch.allclose(_logits(load_peft("qwen3_vl", lora_dirs["qwen3_vl"])),
                          _logits(load_peft("qwen3_vl", tmp_path / "vol/ad/current")), atol=1e-5)


def test_rslora_scale_is_kept(tmp_path):
    src = make_adapter("qwen2_5_vl", tmp_path / "rs", rslora=True, r=4, alpha=8)
    s = patch_and_publish(str(src), "ad", tmp_path / "vol",
                          PatchOptions(family="qwen2_5_vl", pool_base=POOL_BASE["qwen2_5_vl"]))
    cfg = json.loads((tmp_path / "vol/ad/current/adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and s["rank"] == 4
    assert torch.allclose(_logits(load_peft("qwen2_5_vl", src)),
                          _logits(load_peft("qwen2_5_vl", tmp_path / "vol/ad/current")), atol=1e-5)


def test_parse_key_forms():
    p = parse_key("base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight")
    assert (p.module, p.kind, p.had_prefix, p.had_adapter_name) == (
        "model.layers.3.mlp.down_proj", "lora_B", True, True)
    p = parse_key("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_magnitude_vector")
    assert (p.module, p.kind, p.had_adapter_name) == (
        "model.language_model.layers.0.self_attn.q_proj", "magnitude", False)
    p = parse_key("base_model.model.model.language_model.layers.0.self_attn.q_proj"
                  ".lora_magnitude_vector.default.weight")
    assert (p.kind, p.had_adapter_name) == ("magnitude", True)
    assert parse_key("base_model.model.lm_head.weight") is None
    assert parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias") is None


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_adapter_loads_in_the_simulator(family, lora_dirs, tmp_path):
    """The simulator's add_lora validation (vLLM's checks: config fields, key parsing and mapping,
    expected modules, shapes within the max rank) accepts what the patcher publishes."""
    from vlmpool.sim.adapters import validate_adapter

    s = patch_and_publish(str(lora_dirs[family]), "ad", tmp_path / "vol",
                          PatchOptions(family=family, pool_base=POOL_BASE[family]))
    info = validate_adapter("ad@" + s["version"], s["path"], max_lora_rank=64, family_name=family)
    assert info.rank == s["rank"] and info.tensors == s["tensorsKept"]


def test_qwen3_5_linear_attention_layers_are_served(tmp_path):
    """Qwen3.5's hybrid decoder: LoRA on its Gated DeltaNet projections (linear_attn.in_proj_qkv/z/b/a,
    out_proj) and on the full-attention layers is kept, remapped, gives the same outputs in PEFT, and the
    simulator's strict layout (vLLM's Qwen3.5 mapper and modules) accepts it."""
    from vlmpool.sim.adapters import validate_adapter

    fam = TABLE["qwen3_5"]
    src = make_adapter("qwen3_5", tmp_path / "gdn", targets=list(fam.module_names))
    s = patch_and_publish(str(src), "ad", tmp_path / "vol",
                          PatchOptions(family="qwen3_5", pool_base=POOL_BASE["qwen3_5"]))
    out = tmp_path / "vol" / "ad" / "current"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    gdn = [k for k in keys if ".linear_attn." in k]
    # layer 0 is linear attention: its five projections, A and B each
    assert len(gdn) == 10 and all(k.startswith(TEMPLATE_PREFIX + "0.linear_attn.") for k in gdn)
    assert any(k.startswith(TEMPLATE_PREFIX + "1.self_attn.q_proj.") for k in keys)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(fam.module_names)
    assert torch.allclose(_logits(load_peft("qwen3_5", src)), _logits(load_peft("qwen3_5", out)), atol=1e-5)
    info = validate_adapter("ad", s["path"], max_lora_rank=64, family_name="qwen3_5")
    assert "language_model.model.layers.0.linear_attn.in_proj_qkv" in info.modules


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "mistral3"])
def test_linear_attention_keys_are_refused_outside_qwen3_5(family, tmp_path):
    """The GDN projections exist only in Qwen3.5: elsewhere such keys are refused, not passed through."""
    from safetensors.torch import load_file, save_file

    from vlmpool.patcher.errors import PatchError

    src = make_adapter(family, tmp_path / "src", targets=["q_proj"])
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k.replace("self_attn.q_proj", "linear_attn.in_proj_qkv"): t for k, t in tensors.items()},
              str(src / "adapter_model.safetensors"))
    with pytest.raises(PatchError, match=r"linear_attn\.in_proj_qkv") as err:
        patch_and_publish(str(src), "ad", tmp_path / "vol", PatchOptions(family=family, pool_base=POOL_BASE[family]))
    assert err.value.reason == "UnsupportedTargetModules"
