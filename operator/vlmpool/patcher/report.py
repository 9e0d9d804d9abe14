"""The patch's outputs besides the tensors: the rewritten config, the version, patch_report.json and
the PatchSummary fields. Pure functions of what the earlier steps found."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vlmpool.patcher.config_checks import output_patterns
from vlmpool.patcher.families import PEFT_PREFIX, SUPPORTED_MODULES, module_key
from vlmpool.patcher.summary import PatchSummary

STRIPPED_CONFIG_FIELDS = ("eva_config", "lora_bias", "exclude_modules")
KEY_LAYOUT_NOTE = ("key layout: language layers written as {template}; vLLM's Qwen VL weight mappers accept "
                   "it (override with --key-template if an engine version needs another)")
ERROR_DEFINITION = ("relative Frobenius error of the weight delta, ||dW_served - dW_dora|| / ||dW_dora||, "
                    "per module; 'error' is the worst module, 'error_total' over all modules")


def config_json(cfg: dict[str, Any]) -> bytes:
    # allow_nan=False: a published config is always strict JSON (parse_config refuses NaN/Infinity first)
    return (json.dumps(cfg, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def rewrite_config(cfg: dict[str, Any], plan: Any, key_template: str, r: int, alpha: float, applied: str,
                   svd_rank: int | None) -> dict[str, Any]:
    """The config vLLM loads: target_modules from the kept tensors (tower modules after the language
    ones), DoRA fields cleared, rank/alpha patterns re-keyed to the output module names."""
    kept_names = {name for _, name in plan.kept.values()}
    new_cfg = dict(cfg)
    new_cfg["target_modules"] = ([m for m in SUPPORTED_MODULES if m in kept_names]
                                 + sorted(kept_names - set(SUPPORTED_MODULES)))  # tower modules, when kept
    for k in STRIPPED_CONFIG_FIELDS:
        new_cfg.pop(k, None)
    new_cfg["use_dora"] = False
    new_cfg["modules_to_save"] = None
    new_cfg["rank_pattern"], new_cfg["alpha_pattern"] = output_patterns(
        cfg, {m: module_key(s, key_template)[len(PEFT_PREFIX):] for m, (s, _n) in plan.kept.items()}, r, alpha)
    new_cfg["peft_type"] = "LORA"
    new_cfg["inference_mode"] = True
    if applied == "svd":
        new_cfg["r"] = svd_rank
        new_cfg["lora_alpha"] = svd_rank
        new_cfg["use_rslora"] = False
        new_cfg["rank_pattern"], new_cfg["alpha_pattern"] = {}, {}
    return new_cfg


def effective_options(opts: Any, applied: str, svd_rank: int | None) -> dict[str, Any]:
    """The options that shape the content (and so enter the version)."""
    effective = {
        "family": opts.family,
        "key_template": opts.key_template,
        "dora_policy": applied,
        "svd_rank": svd_rank,
        "svd_method": opts.svd_method if applied == "svd" else None,
        "vision_norm_threshold": opts.vision_norm_threshold,
    }
    if opts.tower_connector_lora:  # only when on: versions of existing adapters stay as they were
        effective["tower_connector_lora"] = True
    return effective


def version_of(patched_digest: str, config_bytes: bytes, effective: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({
        "weights": patched_digest,
        "config": hashlib.sha256(config_bytes).hexdigest(),
        "options": effective,
    }, sort_keys=True).encode()).hexdigest()[:16]


def key_rules(rules: dict[str, int], key_template: str) -> list[dict[str, Any]]:
    return [
        {"rule": "adapter-name", "count": rules["adapter-name"],
         "description": "removed the adapter name from '<module>.lora_X.<adapter>.weight'"},
        {"rule": "peft-prefix", "count": rules["peft-prefix"],
         "description": f"added the '{PEFT_PREFIX}' prefix vLLM strips"},
        {"rule": "language-layers", "count": rules["language-layers"],
         "description": f"language decoder layers rewritten to {key_template}"},
    ]


def build_report(*, src_dir: str, opts: Any, cfg: dict[str, Any], new_cfg: dict[str, Any], plan: Any, dora: Any,
                 use_dora: bool, applied: str, rank: int, svd_rank: int | None, scale: float, total_tensors: int,
                 tensors_kept: int, source_digest: str, patched_digest: str, version: str, check: str,
                 effective: dict[str, Any], notes: list[str], warnings: list[str],
                 source_uri: str | None, source_sha256: str | None) -> dict[str, Any]:
    """patch_report.json (without the publish fields): roboflow's PatchReport names, then vlmpool's."""
    declared = declared_base(cfg)
    errors = dora.errors
    return {
        # roboflow PatchReport fields (same names)
        "source_dir": src_dir,
        "dst_dir": None,
        "policy": opts.dora_policy,
        "source_use_dora": use_dora,
        "lora_rank": rank,
        "key_template": opts.key_template,
        "target_modules": new_cfg["target_modules"],
        "total_source_tensors": total_tensors,
        "remapped_keys": plan.remapped,
        "dropped_vision_keys": sorted(plan.dropped_vision),
        "dropped_magnitude_keys": sorted(plan.magnitudes),
        "svd_rank": svd_rank,
        "source_weights_digest": source_digest,
        "patched_weights_digest": patched_digest,
        "base_model_name_or_path": declared,
        "base_model_check": check,
        "registry_variant": opts.declared_variant,
        "notes": notes,
        # vlmpool additions
        "version": version,
        "family": opts.family,
        "source": {"uri": source_uri, "sha256": source_sha256},
        "pool_base": opts.pool_base,
        "served_base": opts.served_base,
        "base_check_mode": opts.base_check,
        "max_rank": opts.max_rank,
        "options": effective,
        "source_target_modules": cfg.get("target_modules"),
        "key_rules": key_rules(plan.rules, opts.key_template),
        "tensors_kept": tensors_kept,
        "tensors_remapped": plan.remapped,
        "tensors_dropped": len(plan.dropped_vision) + len(plan.magnitudes),
        "vision_lora_b_norm_max": plan.vision_b_max if plan.dropped_vision else None,
        "vision_norm_threshold": opts.vision_norm_threshold,
        "vision_magnitude_max_rel_change": max(dora.vision_mag_change.values()) if dora.vision_mag_change else None,
        "dora": {
            "policy_applied": applied,
            "error": dora.error,
            "error_total": dora.error_total,
            "error_definition": ERROR_DEFINITION,
            "max_error": opts.dora_max_error,
            "measured": bool(errors),
            "per_module": {module_key(plan.kept[m][0], opts.key_template): round(e, 8)
                           for m, e in sorted(errors.items())} if errors else {},
            "scale": scale if use_dora else None,
            "svd_methods": sorted(dora.methods),
            "device": dora.device,
        },
        "warnings": warnings,
    }


def build_summary(report: dict[str, Any], opts: Any, dora: Any, applied: str, check: str,
                  warnings: list[str]) -> PatchSummary:
    """The PatchSummary the operator copies into the VLMAdapter's status."""
    return PatchSummary(
        tensors_kept=report["tensors_kept"],
        tensors_remapped=report["tensors_remapped"],
        tensors_dropped=report["tensors_dropped"],
        rank=report["lora_rank"],
        dora_policy=applied,
        dora_error=dora.error,
        declared_base=report["base_model_name_or_path"],
        pool_base=opts.pool_base,
        base_check=check,
        declared_variant=opts.declared_variant,
        declared_variant_check=report.get("registry_variant_check"),
        warnings=warnings,
    )


def declared_base(cfg: dict[str, Any]) -> str | None:
    v = cfg.get("base_model_name_or_path")
    return v if isinstance(v, str) else None
