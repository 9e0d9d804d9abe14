"""DoRA policies checked against PEFT itself: PEFT's merge_and_unload of the DoRA adapter is the
reference; the converted adapter is loaded back with PEFT and merged the same way."""

from __future__ import annotations

import json

import pytest
import torch
from patcher_testlib import POOL_BASE, load_peft, make_adapter, tiny_model

from vlmpool.patcher import PatchOptions, patch_and_publish

FAM = "qwen2_vl"


def _lang_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if ".language_model.layers." in k and k.endswith("_proj.weight")}


@pytest.fixture(scope="module")
def reference(dora_dir):
    """W0 and PEFT's merged DoRA weights, per language projection."""
    w0 = _lang_weights(tiny_model(FAM))
    dora = load_peft(FAM, dora_dir)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dora_logits = dora(input_ids=ids).logits
    merged = _lang_weights(dora.merge_and_unload())
    return {"w0": w0, "dora": merged, "ids": ids, "dora_logits": dora_logits}


def _run(src, tmp_path, **kw):
    opts = PatchOptions(family=FAM, pool_base=POOL_BASE[FAM], device="cpu", **kw)
    s = patch_and_publish(str(src), "ad", tmp_path / "vol", opts)
    out = tmp_path / "vol" / "ad" / "current"
    return s, out, json.loads((out / "patch_report.json").read_text())


def _per_module_error(reference, converted_dir):
    conv = _lang_weights(load_peft(FAM, converted_dir).merge_and_unload())
    errs = {}
    for k, wd in reference["dora"].items():
        delta = wd - reference["w0"][k]
        errs[k] = float(torch.linalg.norm(conv[k] - wd) / torch.linalg.norm(delta))
    return conv, errs


def _module_key(report_key: str) -> str:
    # base_model.model.model.language_model.layers.0.self_attn.q_proj
    #   -> model.language_model.layers.0.self_attn.q_proj.weight
    return report_key.removeprefix("base_model.model.") + ".weight"


def test_svd_full_rank_is_exact(dora_dir, base_dirs, reference, tmp_path):
    # rank 64 >= min(out, in) of every projection of the tiny model: no truncation.
    s, out, _report = _run(dora_dir, tmp_path, dora_policy="svd", svd_rank=64, base_weights=base_dirs[FAM])
    assert s["doraPolicy"] == "svd" and s["rank"] == 64
    assert s["doraError"] < 1e-5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"], cfg["use_rslora"]) == (64, 64, False, False)
    _, errs = _per_module_error(reference, out)
    assert max(errs.values()) < 1e-5
    converted = load_peft(FAM, out)
    with torch.no_grad():
        logits = converted(input_ids=reference["ids"]).logits
    assert torch.allclose(logits, reference["dora_logits"], atol=1e-4, rtol=1e-4)


def test_svd_truncated_matches_peft_within_reported_error(dora_dir, base_dirs, reference, tmp_path):
    s, out, report = _run(dora_dir, tmp_path, dora_policy="svd", svd_rank=4, base_weights=base_dirs[FAM])
    assert s["rank"] == 4 and report["svd_rank"] == 4
    per_module = report["dora"]["per_module"]
    assert len(per_module) == 14 and s["doraError"] == pytest.approx(max(per_module.values()), abs=1e-6)
    assert s["doraError"] > 1e-3, "rank 4 of a full-rank DoRA delta is an approximation"
    conv, errs = _per_module_error(reference, out)
    g = torch.Generator().manual_seed(3)
    for rk, reported in per_module.items():
        k = _module_key(rk)
        # the reported error is the one PEFT's own merges show ...
        assert errs[k] == pytest.approx(reported, abs=1e-4)
        # ... and bounds the layer's outputs: ||X (Wc - Wd)^T|| <= err * ||dW_dora|| * ||X||
        wd, w0 = reference["dora"][k], reference["w0"][k]
        x = torch.randn(16, wd.shape[1], generator=g)
        diff = torch.linalg.norm(x @ (conv[k] - wd).T)
        bound = (reported + 1e-5) * torch.linalg.norm(wd - w0) * torch.linalg.norm(x)
        assert diff <= bound
    # more rank, less error
    s8, _, _ = _run(dora_dir, tmp_path / "r16", dora_policy="svd", svd_rank=16, base_weights=base_dirs[FAM])
    assert s8["doraError"] < s["doraError"]


def test_strip_reports_its_measured_error(dora_dir, base_dirs, reference, tmp_path):
    s, out, report = _run(dora_dir, tmp_path, dora_policy="strip", base_weights=base_dirs[FAM])
    assert s["doraPolicy"] == "strip" and s["rank"] == 8
    assert len(report["dropped_magnitude_keys"]) == 14
    assert s["tensorsDropped"] == len(report["dropped_magnitude_keys"]) + len(report["dropped_vision_keys"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is False and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    _, errs = _per_module_error(reference, out)
    for rk, reported in report["dora"]["per_module"].items():
        assert errs[_module_key(rk)] == pytest.approx(reported, abs=1e-4)
    assert s["doraError"] == pytest.approx(max(errs.values()), abs=1e-4)
    assert s["doraError"] > 0.01  # the magnitudes were trained: stripping them is visible


def test_strip_without_base_weights_is_unmeasured(dora_dir, tmp_path):
    s, _out, report = _run(dora_dir, tmp_path, dora_policy="strip")
    assert s["doraPolicy"] == "strip" and s["doraError"] is None
    assert report["dora"]["measured"] is False
    assert any("not measured" in n for n in report["notes"])


def test_strip_is_exact_when_magnitudes_untrained(tmp_path, base_dirs):
    """A DoRA adapter whose magnitudes equal the row norms of W0 + sBA (what DoRA starts from when B=0
    only for the initial B; here we set m to the norm of the adapted weight) strips with no error."""
    from safetensors.torch import load_file, save_file

    src = make_adapter(FAM, tmp_path / "d", dora=True, magnitude_jitter=0.0)
    t = load_file(str(src / "adapter_model.safetensors"))
    w0 = tiny_model(FAM).state_dict()
    for k in [k for k in t if k.endswith("lora_magnitude_vector")]:
        mod = k.removesuffix(".lora_magnitude_vector")
        a, b = t[mod + ".lora_A.weight"], t[mod + ".lora_B.weight"]
        w = w0[mod.removeprefix("base_model.model.") + ".weight"] + 2.0 * (b @ a)
        t[k] = torch.linalg.norm(w, dim=1)
    save_file(t, str(src / "adapter_model.safetensors"))
    s, _, _ = _run(src, tmp_path, dora_policy="strip", base_weights=base_dirs[FAM])
    assert s["doraError"] < 1e-5


def test_non_dora_adapter_ignores_the_policy(lora_dirs, tmp_path, base_dirs):
    s, _, report = _run(lora_dirs[FAM], tmp_path, dora_policy="svd", svd_rank=4, base_weights=base_dirs[FAM])
    assert s["doraPolicy"] == "none" and s["rank"] == 8 and s["doraError"] is None and report["svd_rank"] is None


def test_randomized_svd_is_reproducible_and_near_optimal(dora_dir, base_dirs, reference, tmp_path):
    _exact, _, rep_exact = _run(dora_dir, tmp_path / "e", dora_policy="svd", svd_rank=4, base_weights=base_dirs[FAM],
                               svd_method="exact")
    rnd, out, rep = _run(dora_dir, tmp_path / "r", dora_policy="svd", svd_rank=4, base_weights=base_dirs[FAM],
                         svd_method="randomized")
    assert rep["dora"]["svd_methods"] == ["randomized"] and rep_exact["dora"]["svd_methods"] == ["exact"]
    again, _, _ = _run(dora_dir, tmp_path / "r2", dora_policy="svd", svd_rank=4, base_weights=base_dirs[FAM],
                       svd_method="randomized")
    assert again["version"] == rnd["version"]  # seeded: a re-run is the same version
    _, errs = _per_module_error(reference, out)
    for rk, reported in rep["dora"]["per_module"].items():
        assert errs[_module_key(rk)] == pytest.approx(reported, abs=1e-4)
        # Eckart-Young: the exact truncation is optimal; the randomized one is close to it
        optimal = rep_exact["dora"]["per_module"][rk]
        assert optimal - 1e-6 <= reported <= optimal * 1.05 + 1e-4


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_svd_full_rank_other_families(family, base_dirs, tmp_path):
    src = make_adapter(family, tmp_path / "d", dora=True, r=4, alpha=8)
    dora = load_peft(family, src)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dora(input_ids=ids).logits
    s = patch_and_publish(str(src), "ad", tmp_path / "vol", PatchOptions(
        family=family, pool_base=POOL_BASE[family], dora_policy="svd", svd_rank=64, base_weights=base_dirs[family],
        device="cpu"))
    assert s["doraError"] < 1e-5
    with torch.no_grad():
        got = load_peft(family, tmp_path / "vol" / "ad" / "current")(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_max_error_refuses_a_strip_above_it_and_publishes_one_below(dora_dir, base_dirs, tmp_path):
    """spec.dora.maxError (--dora-max-error): the worst module's measured error above the bound is refused
    with DoraErrorTooHigh before anything is published; at or under it, published with the bound in the report."""
    from vlmpool.patcher.errors import PatchError

    with pytest.raises(PatchError) as e:
        _run(dora_dir, tmp_path / "tight", dora_policy="strip", base_weights=base_dirs[FAM], dora_max_error=0.001)
    assert e.value.reason == "DoraErrorTooHigh" and "above spec.dora.maxError 0.001" in str(e.value)
    assert not (tmp_path / "tight" / "vol" / "ad" / "current").exists()  # nothing published
    s, _out, report = _run(dora_dir, tmp_path / "loose", dora_policy="strip", base_weights=base_dirs[FAM],
                           dora_max_error=0.99)
    assert 0.01 < s["doraError"] <= 0.99 and report["dora"]["max_error"] == 0.99
    # unmeasured (no base weights) cannot pass a bound
    with pytest.raises(PatchError) as e:
        _run(dora_dir, tmp_path / "blind", dora_policy="strip", dora_max_error=0.99)
    assert e.value.reason == "DoraErrorNotMeasured"
