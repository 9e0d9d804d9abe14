"""Every refusal of the patch pipeline, each with the message it gives (fetch refusals: test_fetch.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from patcher_testlib import (
    _DELETE,
    LANG_TARGETS,
    POOL_BASE,
    VISION_TARGETS,
    LockHolder,
    edit_config,
    make_adapter,
    refuse,
)
from safetensors.torch import load_file, save_file

from vlmpool.patcher import REASONS, PatchError, PatchOptions, patch_and_publish

FAM = "qwen2_vl"


def _edit_tensors(src, fn):
    t = load_file(str(src / "adapter_model.safetensors"))
    t = fn(t)
    save_file(t, str(src / "adapter_model.safetensors"))


def test_not_lora(lora, tmp_path):
    edit_config(lora, peft_type="IA3")
    refuse(lora, tmp_path, "NotLora", r"peft_type is 'IA3'; only LoRA")


def test_modules_to_save_is_refused(tmp_path):
    src = make_adapter(FAM, tmp_path / "mts", modules_to_save=["lm_head"])
    refuse(src, tmp_path, "ModulesToSave", r"modules_to_save is set \(\['lm_head'\]\).*cannot serve")


def test_rank_missing(lora, tmp_path):
    edit_config(lora, r=_DELETE)
    refuse(lora, tmp_path, "RankMissing", r"has no rank 'r'")


def test_rank_not_an_integer(lora, tmp_path):
    edit_config(lora, r="8")
    refuse(lora, tmp_path, "InvalidConfig", r"rank 'r' must be a positive integer of at most 65536, not '8'")


def test_rank_too_high(lora, tmp_path):
    refuse(lora, tmp_path, "RankTooHigh", r"rank r=8 is over the pool's max LoRA rank 4", max_rank=4)


def test_svd_rank_too_high(dora_dir, base_dirs, tmp_path):
    refuse(dora_dir, tmp_path, "RankTooHigh", r"svd rank 32 is over the pool's max LoRA rank 16",
           max_rank=16, dora_policy="svd", svd_rank=32, base_weights=base_dirs[FAM])


def test_svd_may_lower_a_rank_over_the_max(base_dirs, tmp_path):
    src = make_adapter(FAM, tmp_path / "big", r=16, alpha=16, dora=True)
    s = patch_and_publish(str(src), "ad", tmp_path / "vol", PatchOptions(
        family=FAM, pool_base=POOL_BASE[FAM], max_rank=8, dora_policy="svd", base_weights=base_dirs[FAM], device="cpu"))
    assert s["rank"] == 8


def test_base_model_mismatch_strict(lora, tmp_path):
    edit_config(lora, base_model_name_or_path="Qwen/Qwen2-VL-7B-Instruct")
    e = refuse(lora, tmp_path, "BaseModelMismatch",
               r"declares base model 'Qwen/Qwen2-VL-7B-Instruct', but the pool serves the pool's base "
               r"'Qwen/Qwen2-VL-2B-Instruct' \(served as 'qwen2-vl-2b'\)", served_base="qwen2-vl-2b")
    assert "'qwen2vl7binstruct'" in e.message


def test_base_model_mismatch_warn_records(lora, tmp_path):
    edit_config(lora, base_model_name_or_path="Qwen/Qwen2-VL-7B-Instruct")
    s = patch_and_publish(str(lora), "ad", tmp_path / "vol",
                          PatchOptions(family=FAM, pool_base=POOL_BASE[FAM], base_check="warn"))
    assert s["baseCheck"] == "mismatch-warned" and s["declaredBase"] == "Qwen/Qwen2-VL-7B-Instruct"
    assert any("Qwen2-VL-7B-Instruct" in w and "warn" in w for w in s["warnings"])


def test_base_model_normalisation_matches_served_name(lora, tmp_path):
    edit_config(lora, base_model_name_or_path="/models/my-pool-base/")
    s = patch_and_publish(str(lora), "ad", tmp_path / "vol", PatchOptions(
        family=FAM, pool_base="Qwen/Qwen2-VL-2B-Instruct", served_base="My_Pool.Base"))
    assert s["baseCheck"] == "match"


def test_base_model_unknown_strict(lora, tmp_path):
    edit_config(lora, base_model_name_or_path=None)
    refuse(lora, tmp_path, "BaseModelUnknown", r"no base_model_name_or_path, so the strict base check")


def test_base_model_unknown_warn_is_skipped(lora, tmp_path):
    edit_config(lora, base_model_name_or_path="")
    s = patch_and_publish(str(lora), "ad", tmp_path / "vol",
                          PatchOptions(family=FAM, pool_base=POOL_BASE[FAM], base_check="warn"))
    assert s["baseCheck"] == "skipped-missing-base_model_name_or_path"


def test_declared_variant_is_advisory(lora, tmp_path):
    s = patch_and_publish(str(lora), "ad", tmp_path / "vol", PatchOptions(
        family=FAM, pool_base=POOL_BASE[FAM], declared_variant="qwen2-vl-7b-instruct-peft"))
    assert s["baseCheck"] == "match"
    assert any("declared variant 'qwen2-vl-7b-instruct-peft' disagrees" in w for w in s["warnings"])
    report = json.loads((tmp_path / "vol/ad/current/patch_report.json").read_text())
    assert report["registry_variant"] == "qwen2-vl-7b-instruct-peft"
    # recorded as match/mismatch (spec.declaredBase -> status.report.declaredVariantCheck), never refused
    assert report["registry_variant_check"] == "mismatch" and s["declaredVariantCheck"] == "mismatch"
    assert s["declaredVariant"] == "qwen2-vl-7b-instruct-peft"
    base = POOL_BASE[FAM].split("/")[-1].lower() + "-peft"  # e.g. qwen2-vl-2b-instruct-peft
    s = patch_and_publish(str(lora), "ad2", tmp_path / "vol", PatchOptions(
        family=FAM, pool_base=POOL_BASE[FAM], declared_variant=base))
    assert s["declaredVariantCheck"] == "match" and not any("declared variant" in w for w in s["warnings"])
    s = patch_and_publish(str(lora), "ad3", tmp_path / "vol", PatchOptions(family=FAM, pool_base=POOL_BASE[FAM]))
    assert s["declaredVariantCheck"] is None


def test_dora_rejected(dora_dir, tmp_path):
    refuse(dora_dir, tmp_path, "DoraRejected", r"uses DoRA .* policy is reject; choose strip .* or svd")


def test_dora_svd_needs_base_weights(dora_dir, tmp_path):
    refuse(dora_dir, tmp_path, "DoraNeedsBaseWeights", r"svd DoRA policy needs the base model's weights",
           dora_policy="svd")


def test_base_weights_not_found(dora_dir, tmp_path):
    refuse(dora_dir, tmp_path, "BaseWeightsNotFound", r"base weights directory .*nowhere does not exist",
           dora_policy="svd", base_weights=tmp_path / "nowhere")


def test_base_weights_pickle_only(dora_dir, tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    refuse(dora_dir, tmp_path, "BaseWeightsNotFound",
           r"no \*\.safetensors .*pytorch_model\.bin: only safetensors are read", dora_policy="svd", base_weights=d)


def test_base_weights_of_another_family(dora_dir, tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, str(d / "model.safetensors"))
    refuse(dora_dir, tmp_path, "BaseWeightsNotFound",
           r"no weight for module model\.language_model\.layers\.0\.mlp\.down_proj", dora_policy="svd", base_weights=d)


def test_shape_mismatch_against_base(lora, tmp_path, base_dirs):
    d = tmp_path / "wrongbase"
    shutil.copytree(base_dirs[FAM], d)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(96, 64)
    save_file(t, str(d / "model.safetensors"))
    refuse(lora, tmp_path, "ShapeMismatch", r"q_proj: the adapter is 64x64 but the base weight is 96x64",
           base_weights=d)


def test_shape_mismatch_rank(lora, tmp_path):
    edit_config(lora, r=4, lora_alpha=8)
    refuse(lora, tmp_path, "ShapeMismatch", r"do not have the config's rank r=4")


def test_trained_vision_tower(tmp_path):
    src = make_adapter(FAM, tmp_path / "v", targets=LANG_TARGETS + VISION_TARGETS[FAM], train_vision=True)
    refuse(src, tmp_path, "TrainedVisionTower", r"trained the vision tower \(2 module\(s\) with lora_B norm over 0: "
           r"model\.visual\.blocks\.0\.(attn\.qkv|mlp\.fc1) ‖B‖=")


def test_vision_threshold_lets_tiny_norms_pass(tmp_path):
    src = make_adapter(FAM, tmp_path / "v", targets=LANG_TARGETS + VISION_TARGETS[FAM], train_vision=True)
    s = patch_and_publish(str(src), "ad", tmp_path / "vol",
                          PatchOptions(family=FAM, pool_base=POOL_BASE[FAM], vision_norm_threshold=100.0))
    assert s["ok"] and s["tensorsDropped"] == 4


def test_vision_only_adapter_has_nothing_servable(tmp_path):
    src = make_adapter(FAM, tmp_path / "v", targets=VISION_TARGETS[FAM])
    refuse(src, tmp_path, "NoServableTensors",
           r"no servable LoRA tensors are left after dropping 4 vision-tower tensor")


def test_unsupported_target_modules(tmp_path):
    src = make_adapter(FAM, tmp_path / "lm", targets=["q_proj", "lm_head"])
    refuse(src, tmp_path, "UnsupportedTargetModules",
           r"module\(s\) vLLM cannot serve for Qwen2-VL: lm_head; servable are")


def test_unrecognised_tensor(lora, tmp_path):
    def add_bias(t):
        k = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
        t[k.replace(".weight", ".bias")] = torch.zeros(t[k].shape[0])
        return t
    _edit_tensors(lora, add_bias)
    refuse(lora, tmp_path, "UnrecognisedTensor", r"1 tensor\(s\) are not LoRA A/B matrices .*q_proj\.lora_B\.bias")


def test_incomplete_module(lora, tmp_path):
    def drop_b(t):
        k = next(k for k in t if k.endswith("layers.1.mlp.up_proj.lora_B.weight"))
        del t[k]
        return t
    _edit_tensors(lora, drop_b)
    refuse(lora, tmp_path, "IncompleteModule",
           r"module model\.language_model\.layers\.1\.mlp\.up_proj has \['lora_A'\]")


def test_invalid_config_json(lora, tmp_path):
    (lora / "adapter_config.json").write_text("{not json")
    refuse(lora, tmp_path, "InvalidConfig", r"adapter_config\.json is not valid JSON")


def test_invalid_weights(lora, tmp_path):
    (lora / "adapter_model.safetensors").write_bytes(b"\x80\x04\x95 this is a pickle in disguise")
    refuse(lora, tmp_path, "InvalidWeights", r"adapter_model\.safetensors is not a readable safetensors file")


def test_invalid_adapter_name(lora, tmp_path):
    refuse(lora, tmp_path, "InvalidAdapterName", r"adapter name '\.\./x' is not a valid Kubernetes object name",
           adapter="../x")


@pytest.mark.parametrize("kw,match", [
    ({"family": "llama"}, r"unknown family 'llama'"),
    ({"dora_policy": "merge"}, r"unknown DoRA policy 'merge'"),
    ({"svd_rank": 4}, r"--svd-rank is only allowed with --dora-policy svd"),
    ({"key_template": "model.layers.{suffix}"}, r"must start with 'base_model\.model\.'"),
])
def test_invalid_arguments(lora, tmp_path, kw, match):
    refuse(lora, tmp_path, "InvalidArguments", match, **kw)


def test_lock_timeout(lora, tmp_path):
    with LockHolder(tmp_path / "vol" / "ad" / ".lock"):  # another process: a second Job on the volume
        with pytest.raises(PatchError) as ei:
            patch_and_publish(str(lora), "ad", tmp_path / "vol", PatchOptions(family=FAM, pool_base=POOL_BASE[FAM]),
                              lock_timeout=0.3)
        assert ei.value.reason == "LockTimeout" and "held" in ei.value.message
    versions = tmp_path / "vol" / "ad" / "versions"
    assert not versions.exists() or not any(versions.iterdir())


def test_current_that_is_not_a_symlink(lora, tmp_path):
    (tmp_path / "vol" / "ad" / "current").mkdir(parents=True)
    with pytest.raises(PatchError) as ei:
        patch_and_publish(str(lora), "ad", tmp_path / "vol", PatchOptions(family=FAM, pool_base=POOL_BASE[FAM]))
    assert ei.value.reason == "InternalError" and "is not a symlink" in ei.value.message


def test_every_reason_is_documented():
    doc = (__import__("pathlib").Path(__file__).resolve().parents[2] / "docs" / "patcher.md").read_text()
    missing = [r for r in REASONS if f"`{r}`" not in doc]
    assert not missing, missing


def test_trained_vision_dora_magnitudes(tmp_path, base_dirs):
    """B = 0 on the vision tower but trained DoRA magnitudes: caught when base weights are at hand,
    a warning when not."""
    src = make_adapter(FAM, tmp_path / "vm", dora=True, targets=LANG_TARGETS + VISION_TARGETS[FAM],
                       train_vision_magnitude=True)
    refuse(src, tmp_path, "TrainedVisionTower",
           r"trained the vision tower's DoRA magnitudes \(model\.visual\.blocks\.0\."
           r"(attn\.qkv|mlp\.fc1) moved by .* over 0\.01\)", dora_policy="strip", base_weights=base_dirs[FAM])
    s = patch_and_publish(str(src), "ad", tmp_path / "vol",
                          PatchOptions(family=FAM, pool_base=POOL_BASE[FAM], dora_policy="strip"))
    assert any("2 vision-tower DoRA magnitude vector(s) dropped unchecked" in w for w in s["warnings"])


def test_untrained_vision_dora_magnitudes_pass(dora_dir, base_dirs, tmp_path):
    s = patch_and_publish(str(dora_dir), "ad", tmp_path / "vol", PatchOptions(
        family=FAM, pool_base=POOL_BASE[FAM], dora_policy="strip", base_weights=base_dirs[FAM], device="cpu"))
    report = json.loads((tmp_path / "vol/ad/current/patch_report.json").read_text())
    assert s["ok"] and report["vision_magnitude_max_rel_change"] < 1e-5
