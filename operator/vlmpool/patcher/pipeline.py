"""The patch itself: a PEFT LoRA/DoRA adapter directory in, a vLLM-ready (config, tensors) out.

Order of the steps (the roboflow order, with the DoRA refusal moved before the tensors are read):
validate the config -> base-model check -> DoRA pre-flight -> read tensors -> classify every tensor
(vision: dropped; unsupported: refused; DoRA magnitudes) -> shape check (against the base when at hand)
-> DoRA policy -> key remap -> config rewrite -> serialise and digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmpool.patcher.config_checks import (
    check_alpha,
    check_patterns,
    check_rank,
    module_rank_scale,
    output_patterns,
    parse_config,
    refuse_unsupported,
)
from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.families import (
    DEFAULT_KEY_TEMPLATE,
    FAMILIES,
    PEFT_PREFIX,
    SUPPORTED_MODULES,
    canonical_key,
    is_vision,
    layer_suffix,
    module_key,
    parse_key,
    TOWER_PREFIX,
    supported_module_name,
    tower_suffix,
    validate_key_template,
)
from vlmpool.patcher.fetch import CONFIG_MAX_BYTES, CONFIG_NAME, WEIGHTS_NAME

DORA_POLICIES = ("reject", "strip", "svd")
SVD_METHODS = ("auto", "exact", "randomized")
SVD_OVERSAMPLE = 16
SVD_POWER_ITERS = 4
SVD_SEED = 0x5EED
# A vision DoRA magnitude further than this (relative) from its initial row norm counts as trained;
# the slack covers magnitudes computed and stored in bf16 (relative rounding ~4e-3).
VISION_MAGNITUDE_TOLERANCE = 1e-2
BASE_CHECKS = ("strict", "warn")
STRIPPED_CONFIG_FIELDS = ("eva_config", "lora_bias", "exclude_modules")
KEY_LAYOUT_NOTE = ("key layout: language layers written as {template}; vLLM's Qwen VL weight mappers accept "
                   "it (override with --key-template if an engine version needs another)")


@dataclass
class PatchOptions:
    family: str
    pool_base: str
    served_base: str | None = None
    max_rank: int = 64
    dora_policy: str = "reject"
    svd_rank: int | None = None
    base_weights: Path | None = None
    base_check: str = "strict"
    declared_variant: str | None = None
    vision_norm_threshold: float = 0.0
    key_template: str = DEFAULT_KEY_TEMPLATE
    device: str | None = None  # torch device for DoRA math; None: cuda when available, else cpu
    svd_method: str = "auto"   # exact | randomized | auto (exact on GPU or for small/full-rank matrices)
    tower_connector_lora: bool = False  # the pool runs vLLM with --enable-tower-connector-lora

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise PatchError("InvalidArguments", f"unknown family {self.family!r}; one of {', '.join(FAMILIES)}")
        if not self.pool_base or not self.pool_base.strip():
            raise PatchError("InvalidArguments", "the pool base model (--pool-base) is required")
        if self.dora_policy not in DORA_POLICIES:
            raise PatchError("InvalidArguments", f"unknown DoRA policy {self.dora_policy!r}; one of {', '.join(DORA_POLICIES)}")
        if self.svd_method not in SVD_METHODS:
            raise PatchError("InvalidArguments", f"unknown SVD method {self.svd_method!r}; one of {', '.join(SVD_METHODS)}")
        if self.base_check not in BASE_CHECKS:
            raise PatchError("InvalidArguments", f"unknown base check {self.base_check!r}; one of {', '.join(BASE_CHECKS)}")
        if not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise PatchError("InvalidArguments", f"--max-rank must be a positive integer, not {self.max_rank!r}")
        if self.svd_rank is not None:
            if self.dora_policy != "svd":
                raise PatchError("InvalidArguments", "--svd-rank is only allowed with --dora-policy svd")
            if not isinstance(self.svd_rank, int) or self.svd_rank < 1:
                raise PatchError("InvalidArguments", f"--svd-rank must be a positive integer, not {self.svd_rank!r}")
        if self.vision_norm_threshold < 0 or math.isnan(self.vision_norm_threshold):
            raise PatchError("InvalidArguments", "--vision-norm-threshold must be >= 0")
        try:
            validate_key_template(self.key_template)
        except ValueError as e:
            raise PatchError("InvalidArguments", f"--key-template: {e}") from None


@dataclass
class PatchedAdapter:
    """What the patch produced; ``publish`` writes it."""

    config: dict[str, Any]
    tensors: dict[str, Any]            # output key -> torch.Tensor
    weights_bytes: bytes               # the serialised adapter_model.safetensors
    version: str
    report: dict[str, Any]             # patch_report.json, without the publish fields
    summary: dict[str, Any]            # PatchSummary fields (snake_case)
    effective_options: dict[str, Any] = field(default_factory=dict)


def normalize_base_model_reference(ref: str) -> str:
    """The roboflow normalisation: trim, lower-case, keep what follows the last '/', keep only [a-z0-9].
    (A trailing '/' of a local path is dropped first, so '/models/Qwen2-VL-2B/' -> 'qwen2vl2b'.)"""
    s = ref.strip().rstrip("/").lower()
    s = s.rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9]", "", s)


def normalize_variant(variant: str) -> str:
    v = variant.strip().lower()
    if v.endswith("-peft"):
        v = v[: -len("-peft")]
    return normalize_base_model_reference(v)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PatchError("MissingConfig", f"{CONFIG_NAME} is missing")
    if path.stat().st_size > CONFIG_MAX_BYTES:
        raise PatchError("FileTooLarge", f"{CONFIG_NAME} is over {CONFIG_MAX_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PatchError("InvalidConfig", f"{CONFIG_NAME} is not valid JSON: {e}") from None
    return parse_config(text)


def validate_config(cfg: dict[str, Any], opts: PatchOptions) -> int:
    """The config-level refusals. Returns the rank r."""
    peft_type = cfg.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise PatchError("NotLora", f"peft_type is {peft_type!r}; only LoRA (and DoRA) adapters can be served by vLLM")
    mts = cfg.get("modules_to_save")
    if mts:
        raise PatchError("ModulesToSave", f"modules_to_save is set ({mts!r}): the adapter replaces whole modules, "
                         "which vLLM's dynamic LoRA cannot serve; retrain without modules_to_save (or merge the "
                         "adapter into a separate model)")
    if "r" not in cfg or cfg["r"] is None:
        raise PatchError("RankMissing", f"{CONFIG_NAME} has no rank 'r'")
    r = check_rank(cfg["r"], opts.max_rank)
    alpha = cfg.get("lora_alpha", r)
    check_alpha(r if alpha is None else alpha)
    svd_applies = bool(cfg.get("use_dora")) and opts.dora_policy == "svd"
    check_patterns(cfg, opts.max_rank, svd_applies)
    refuse_unsupported(cfg)
    if r > opts.max_rank and not svd_applies:
        raise PatchError("RankTooHigh", f"the adapter's rank r={r} is over the pool's max LoRA rank {opts.max_rank} "
                         "(VLMPool spec.engine.maxLoraRank, vLLM --max-lora-rank); retrain with a lower rank or "
                         "raise the pool's max rank")
    return r


def base_check(cfg: dict[str, Any], opts: PatchOptions) -> tuple[str, list[str]]:
    """File-authoritative base-model check. Returns (result, warnings)."""
    warnings: list[str] = []
    declared = cfg.get("base_model_name_or_path")
    declared = declared.strip() if isinstance(declared, str) else ""
    targets = {opts.pool_base}
    if opts.served_base:
        targets.add(opts.served_base)
    if opts.declared_variant:
        v = normalize_variant(opts.declared_variant)
        if declared and v != normalize_base_model_reference(declared):
            warnings.append(f"declared variant {opts.declared_variant!r} disagrees with adapter_config.json's "
                            f"base_model_name_or_path {declared!r}; the file is the authority (fix the registry record)")
        elif not declared and v not in {normalize_base_model_reference(t) for t in targets}:
            warnings.append(f"declared variant {opts.declared_variant!r} is not the pool's base {opts.pool_base!r}; "
                            "it is advisory only")
    if not declared:
        if opts.base_check == "strict":
            raise PatchError("BaseModelUnknown", "adapter_config.json has no base_model_name_or_path, so the strict "
                             f"base check against the pool's base {opts.pool_base!r} cannot pass; set it in the "
                             "adapter's config, or use baseModelCheck: warn to serve it unchecked")
        warnings.append("adapter_config.json has no base_model_name_or_path: base check skipped")
        return "skipped-missing-base_model_name_or_path", warnings
    wanted = {normalize_base_model_reference(t) for t in targets}
    if normalize_base_model_reference(declared) in wanted:
        return "match", warnings
    names = f"the pool's base {opts.pool_base!r}" + (f" (served as {opts.served_base!r})" if opts.served_base else "")
    if opts.base_check == "strict":
        raise PatchError("BaseModelMismatch", f"adapter_config.json declares base model {declared!r}, but the pool serves "
                         f"{names}; names are compared after normalisation "
                         f"({normalize_base_model_reference(declared)!r} vs {', '.join(sorted(repr(w) for w in wanted))}). "
                         "The adapter file is the authority: attach the adapter to a pool of its base model, or fix "
                         "the registry record that sent it here")
    warnings.append(f"adapter_config.json declares base model {declared!r}, not {names}; served anyway (baseModelCheck: warn)")
    return "mismatch-warned", warnings


def _fro(t) -> float:
    import torch

    return float(torch.linalg.vector_norm(t.float()))


def patch_adapter(src_dir: Path | str, opts: PatchOptions, *, source_uri: str | None = None,
                  source_sha256: str | None = None, fetch_warnings: list[str] | None = None) -> PatchedAdapter:
    """Patch the adapter in ``src_dir`` (adapter_config.json + adapter_model.safetensors)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    opts.validate()
    family = FAMILIES[opts.family]
    src_dir = Path(src_dir)
    warnings: list[str] = list(fetch_warnings or [])
    notes: list[str] = []

    cfg = _read_config(src_dir / CONFIG_NAME)
    weights_path = src_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise PatchError("MissingWeights", f"{WEIGHTS_NAME} is missing")
    r = validate_config(cfg, opts)
    alpha = cfg.get("lora_alpha") or r
    use_rslora = bool(cfg.get("use_rslora"))
    use_dora = bool(cfg.get("use_dora"))
    check, base_warnings = base_check(cfg, opts)
    warnings += base_warnings

    applied = "none"
    if use_dora:
        applied = opts.dora_policy
        if applied == "reject":
            raise PatchError("DoraRejected", "the adapter uses DoRA (use_dora: true), which vLLM cannot serve, and the "
                             "DoRA policy is reject; choose strip (drop the magnitude vectors: an approximation, "
                             "measured when base weights are given) or svd (exact merge re-factored to a LoRA; needs "
                             "the base weights)")
        if applied == "svd" and opts.base_weights is None:
            raise PatchError("DoraNeedsBaseWeights", "the svd DoRA policy needs the base model's weights "
                             "(--base-weights DIR, the pool's spec.model.weights) to merge exactly; none were given")
    svd_rank = None
    if applied == "svd":
        svd_rank = opts.svd_rank or min(r, opts.max_rank)
        if svd_rank > opts.max_rank:
            raise PatchError("RankTooHigh", f"the svd rank {svd_rank} is over the pool's max LoRA rank {opts.max_rank}")

    try:
        source = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PatchError("InvalidWeights", f"{WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    source_digest = _sha256_file(weights_path)

    # ---- classify every tensor
    modules: dict[str, dict[str, tuple[str, Any]]] = {}
    parsed_by_key = {}
    unrecognised = []
    for key, t in source.items():
        p = parse_key(key)
        if p is None:
            unrecognised.append(key)
            continue
        parsed_by_key[key] = p
        slot = modules.setdefault(p.module, {})
        if p.kind in slot:
            raise PatchError("UnrecognisedTensor", f"two tensors for {p.module} {p.kind}: {slot[p.kind][0]} and {key}")
        slot[p.kind] = (key, t)

    dropped_vision: list[str] = []
    dropped_magnitude: list[str] = []
    trained_vision: list[tuple[str, float]] = []
    unsupported: dict[str, list[str]] = {}
    vision_b_max = 0.0
    vision_mags: list[str] = []
    vision_mag_change = None
    kept: dict[str, tuple[str, str]] = {}  # module -> (suffix, module name)
    for module, slot in sorted(modules.items()):
        tower = tower_suffix(module, family) if opts.tower_connector_lora and is_vision(module, family) else None
        if tower is not None:  # served by vLLM with --enable-tower-connector-lora: kept like a language module
            if not {"lora_A", "lora_B"} <= set(slot) or set(slot) - {"lora_A", "lora_B", "magnitude"}:
                raise PatchError("IncompleteModule", f"module {module} has {sorted(slot)}; a servable module needs "
                                 "exactly lora_A and lora_B (plus a magnitude vector for DoRA)")
            kept[module] = (tower, tower.rsplit(".", 1)[-1])
            continue
        if is_vision(module, family):
            for kind, (key, t) in slot.items():
                dropped_vision.append(key)
                if kind == "magnitude":
                    vision_mags.append(module)
                if kind in ("lora_B", "lora_embedding_B"):
                    n = _fro(t)
                    vision_b_max = max(vision_b_max, n)
                    if n > opts.vision_norm_threshold:
                        trained_vision.append((module, n))
            continue
        found = layer_suffix(module, family)
        name = supported_module_name(found[1]) if found else None
        if name is None:
            unsupported.setdefault(module, []).extend(k for k, _ in slot.values())
            continue
        kinds = set(slot)
        if not {"lora_A", "lora_B"} <= kinds or kinds - {"lora_A", "lora_B", "magnitude"}:
            raise PatchError("IncompleteModule", f"module {module} has {sorted(kinds)}; a servable module needs exactly "
                             "lora_A and lora_B (plus a magnitude vector for DoRA)")
        kept[module] = (found[1], name)
    if trained_vision:
        worst = sorted(trained_vision, key=lambda x: -x[1])[:5]
        raise PatchError("TrainedVisionTower", f"the adapter trained the vision tower ({len(trained_vision)} module(s) "
                         f"with lora_B norm over {opts.vision_norm_threshold:g}: "
                         + ", ".join(f"{m} ‖B‖={n:.4g}" for m, n in worst)
                         + "); vLLM serves LoRA on the language model only, so dropping them would change the "
                         "model. Retrain with target_modules limited to the language model")
    if unsupported:
        names = sorted(unsupported)
        raise PatchError("UnsupportedTargetModules", f"LoRA on module(s) vLLM cannot serve for {family.title}: "
                         f"{', '.join(names[:5])}{' …' if len(names) > 5 else ''}; servable are the language "
                         f"model's {', '.join(SUPPORTED_MODULES)}")
    if unrecognised:
        full = [k for k in unrecognised if k.endswith(".base_layer.weight")]
        hint = (" (full layer weights, which PEFT saves when embeddings or lm_head are adapted: vLLM cannot "
                "serve them)" if full else "")
        raise PatchError("UnrecognisedTensor", f"{len(unrecognised)} tensor(s) are not LoRA A/B matrices or DoRA "
                         f"magnitude vectors: {', '.join(sorted(unrecognised)[:5])}{hint}")
    if not kept:
        raise PatchError("NoServableTensors", "no servable LoRA tensors are left after dropping "
                         f"{len(dropped_vision)} vision-tower tensor(s)")

    # ---- shapes: internal consistency, then against the base when at hand
    base = None
    if opts.base_weights is not None:
        from vlmpool.patcher.base import BaseWeights

        base = BaseWeights(opts.base_weights, family)
    for module in kept:
        slot = modules[module]
        a, b = slot["lora_A"][1], slot["lora_B"][1]
        want = module_rank_scale(cfg, module, r, alpha)[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != want or b.shape[1] != want:
            raise PatchError("ShapeMismatch", f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                             f"have the config's rank {'r' if want == r else 'rank_pattern'}={want}")
        mag = slot.get("magnitude")
        if mag is not None and use_dora and tuple(mag[1].shape) != (b.shape[0],):
            raise PatchError("ShapeMismatch", f"{module}: magnitude vector {tuple(mag[1].shape)} does not match "
                             f"lora_B's {b.shape[0]} output features")
        if base is not None and not kept[module][0].startswith(TOWER_PREFIX):  # base weights: language only
            shape = base.shape(module)
            if tuple(shape) != (b.shape[0], a.shape[1]):
                raise PatchError("ShapeMismatch", f"{module}: the adapter is {b.shape[0]}x{a.shape[1]} but the base "
                                 f"weight is {'x'.join(map(str, shape))}: the adapter was trained on another model")

    # ---- DoRA magnitudes on the (dropped) vision tower: training them changes the model even with B = 0
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    if vision_mags and use_dora:
        if base is None:
            warnings.append(f"{len(vision_mags)} vision-tower DoRA magnitude vector(s) dropped unchecked (no base "
                            "weights): if training moved them, the served model differs from the trained one")
        else:
            vision_mag_change = _vision_magnitude_change(modules, vision_mags, base, scale)
            worst = max(vision_mag_change.items(), key=lambda kv: kv[1])
            if worst[1] > VISION_MAGNITUDE_TOLERANCE:
                raise PatchError("TrainedVisionTower", f"the adapter trained the vision tower's DoRA magnitudes "
                                 f"({worst[0]} moved by {worst[1]:.3g} relative to the weight's row norms, over "
                                 f"{VISION_MAGNITUDE_TOLERANCE:g}); vLLM serves LoRA on the language model only. "
                                 "Retrain with target_modules limited to the language model")

    # ---- DoRA policy (and stray magnitude vectors)
    device = torch.device(opts.device) if opts.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    new_ab: dict[str, tuple[Any, Any]] = {}
    errors: dict[str, float] = {}
    methods_used: set[str] = set()
    err_num = err_den = 0.0
    for module in kept:
        slot = modules[module]
        mag = slot.get("magnitude")
        if mag is not None:
            dropped_magnitude.append(mag[0])
        a, b = slot["lora_A"][1], slot["lora_B"][1]
        tower = kept[module][0].startswith(TOWER_PREFIX)
        if tower and applied == "svd":
            raise PatchError("UnsupportedTargetModules", f"{module}: the svd DoRA policy cannot re-factor a vision-tower "
                             "module (base weights are read for the language model only); use the strip policy")
        if not use_dora or (applied == "strip" and (base is None or tower)):
            new_ab[module] = (a, b)
            continue
        w0 = base.get(module).to(device=device, dtype=torch.float32)
        af, bf = a.to(device=device, dtype=torch.float32), b.to(device=device, dtype=torch.float32)
        lora = module_rank_scale(cfg, module, r, alpha)[1] * (bf @ af)
        w = w0 + lora
        if mag is not None:
            norm = torch.linalg.vector_norm(w, dim=1)
            merged = (mag[1].to(device=device, dtype=torch.float32) / norm).unsqueeze(1) * w
        else:
            merged = w
        delta = merged - w0
        den = float(torch.linalg.vector_norm(delta))
        if applied == "strip":
            approx = lora
            new_ab[module] = (a, b)
        else:
            method = svd_method_for(opts.svd_method, delta.shape, svd_rank, device)
            methods_used.add(method)
            u, s, vh = truncated_svd(delta, svd_rank, method)
            k = min(svd_rank, s.shape[0])
            sq = torch.sqrt(s[:k])
            nb = torch.zeros((delta.shape[0], svd_rank), device=device, dtype=torch.float32)
            na = torch.zeros((svd_rank, delta.shape[1]), device=device, dtype=torch.float32)
            nb[:, :k] = u[:, :k] * sq
            na[:k] = sq.unsqueeze(1) * vh[:k]
            approx = nb @ na
            new_ab[module] = (na.to(dtype=a.dtype).cpu().contiguous(), nb.to(dtype=b.dtype).cpu().contiguous())
        num = float(torch.linalg.vector_norm(approx - delta))
        errors[module] = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
        err_num += num * num
        err_den += den * den
    if use_dora and applied == "strip":
        notes.append("strip: DoRA magnitude vectors dropped; the served adapter approximates the trained one"
                     + ("" if base is not None else " (error not measured: no base weights given)"))
    if applied == "svd":
        notes.append(f"svd: exact DoRA merge with the base weights, delta re-factored by truncated SVD to rank {svd_rank}; "
                     "r = lora_alpha = rank (scale 1)")
    if dropped_magnitude and not use_dora:
        warnings.append(f"dropped {len(dropped_magnitude)} stray DoRA magnitude vector(s) of a non-DoRA adapter")
    dora_error = max(errors.values()) if errors else None
    dora_error_total = math.sqrt(err_num / err_den) if err_den > 0 else (0.0 if errors else None)

    # ---- remap keys
    rules = {"adapter-name": 0, "peft-prefix": 0, "language-layers": 0}
    tensors: dict[str, Any] = {}
    remapped = 0
    for module, (suffix, _name) in kept.items():
        a, b = new_ab[module]
        for kind, t in (("lora_A", a), ("lora_B", b)):
            orig = modules[module][kind][0]
            p = parsed_by_key[orig]
            out = canonical_key(suffix, kind, opts.key_template)
            if p.had_adapter_name:
                rules["adapter-name"] += 1
            if not p.had_prefix:
                rules["peft-prefix"] += 1
            if module_key(suffix, opts.key_template) != PEFT_PREFIX + module:
                rules["language-layers"] += 1
            if out != orig:
                remapped += 1
            tensors[out] = t.contiguous()

    # ---- config rewrite
    kept_names = {name for _, name in kept.values()}
    new_cfg = dict(cfg)
    new_cfg["target_modules"] = ([m for m in SUPPORTED_MODULES if m in kept_names]
                                 + sorted(kept_names - set(SUPPORTED_MODULES)))  # tower modules, when kept
    for k in STRIPPED_CONFIG_FIELDS:
        new_cfg.pop(k, None)
    new_cfg["use_dora"] = False
    new_cfg["modules_to_save"] = None
    new_cfg["rank_pattern"], new_cfg["alpha_pattern"] = output_patterns(
        cfg, {m: module_key(s, opts.key_template)[len(PEFT_PREFIX):] for m, (s, _n) in kept.items()}, r, alpha)
    new_cfg["peft_type"] = "LORA"
    new_cfg["inference_mode"] = True
    rank = r
    if applied == "svd":
        rank = svd_rank
        new_cfg["r"] = svd_rank
        new_cfg["lora_alpha"] = svd_rank
        new_cfg["use_rslora"] = False
        new_cfg["rank_pattern"], new_cfg["alpha_pattern"] = {}, {}

    weights_bytes = save({k: tensors[k] for k in sorted(tensors)}, metadata={"format": "pt"})
    patched_digest = hashlib.sha256(weights_bytes).hexdigest()
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
    config_bytes = config_json(new_cfg)
    version = hashlib.sha256(json.dumps({
        "weights": patched_digest,
        "config": hashlib.sha256(config_bytes).hexdigest(),
        "options": effective,
    }, sort_keys=True).encode()).hexdigest()[:16]

    notes.append(KEY_LAYOUT_NOTE.format(template=opts.key_template))
    declared = cfg.get("base_model_name_or_path") if isinstance(cfg.get("base_model_name_or_path"), str) else None
    tensors_dropped = len(dropped_vision) + len(dropped_magnitude)
    report: dict[str, Any] = {
        # roboflow PatchReport fields (same names)
        "source_dir": str(src_dir.resolve()),
        "dst_dir": None,
        "policy": opts.dora_policy,
        "source_use_dora": use_dora,
        "lora_rank": rank,
        "key_template": opts.key_template,
        "target_modules": new_cfg["target_modules"],
        "total_source_tensors": len(source),
        "remapped_keys": remapped,
        "dropped_vision_keys": sorted(dropped_vision),
        "dropped_magnitude_keys": sorted(dropped_magnitude),
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
        "key_rules": [
            {"rule": "adapter-name", "count": rules["adapter-name"],
             "description": "removed the adapter name from '<module>.lora_X.<adapter>.weight'"},
            {"rule": "peft-prefix", "count": rules["peft-prefix"],
             "description": f"added the '{PEFT_PREFIX}' prefix vLLM strips"},
            {"rule": "language-layers", "count": rules["language-layers"],
             "description": f"language decoder layers rewritten to {opts.key_template}"},
        ],
        "tensors_kept": len(tensors),
        "tensors_remapped": remapped,
        "tensors_dropped": tensors_dropped,
        "vision_lora_b_norm_max": vision_b_max if dropped_vision else None,
        "vision_norm_threshold": opts.vision_norm_threshold,
        "vision_magnitude_max_rel_change": max(vision_mag_change.values()) if vision_mag_change else None,
        "dora": {
            "policy_applied": applied,
            "error": dora_error,
            "error_total": dora_error_total,
            "error_definition": "relative Frobenius error of the weight delta, ||dW_served - dW_dora|| / ||dW_dora||, "
                                "per module; 'error' is the worst module, 'error_total' over all modules",
            "measured": bool(errors),
            "per_module": {module_key(kept[m][0], opts.key_template): round(e, 8)
                           for m, e in sorted(errors.items())} if errors else {},
            "scale": scale if use_dora else None,
            "svd_methods": sorted(methods_used),
            "device": str(device) if errors else None,
        },
        "warnings": warnings,
    }
    summary = {
        "tensors_kept": len(tensors),
        "tensors_remapped": remapped,
        "tensors_dropped": tensors_dropped,
        "rank": rank,
        "dora_policy": applied,
        "dora_error": dora_error,
        "declared_base": declared,
        "pool_base": opts.pool_base,
        "base_check": check,
        "warnings": warnings,
    }
    return PatchedAdapter(new_cfg, tensors, weights_bytes, version, report, summary, effective)


def svd_method_for(requested: str, shape, rank: int, device) -> str:
    """auto: the exact SVD on a GPU, or when the matrix is small or the rank (nearly) full; otherwise the
    randomized one (seeded, so the result is reproducible), whose error is measured all the same."""
    if requested != "auto":
        return requested
    if getattr(device, "type", str(device)) == "cuda":
        return "exact"
    return "exact" if min(shape) <= 4 * (rank + SVD_OVERSAMPLE) else "randomized"


def truncated_svd(a, rank: int, method: str):
    """(U, S, Vh) of the leading ``rank`` singular triplets of ``a`` (float32 2-D)."""
    import torch

    m, n = a.shape
    if method == "exact" or rank + SVD_OVERSAMPLE >= min(m, n):
        if m < n:  # LAPACK is much faster on tall matrices
            u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
            return vh.T[:, :rank], s[:rank], u.T[:rank]
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    # Halko, Martinsson & Tropp (2011), algorithm 4.4: randomized range finder with power iterations.
    g = torch.Generator(device=a.device).manual_seed(SVD_SEED)
    omega = torch.randn(n, rank + SVD_OVERSAMPLE, generator=g, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(SVD_POWER_ITERS):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def _vision_magnitude_change(modules, names: list[str], base, scale: float) -> dict[str, float]:
    """Per vision module: max |m - ||W0 + s·B·A||_row| / ||W0 + s·B·A||_row, i.e. how far training moved
    the DoRA magnitude from where PEFT initialised it (0 up to the storage dtype's rounding)."""
    import torch

    out = {}
    for module in names:
        slot = modules[module]
        try:
            w = base.get(module).float()
        except PatchError:
            continue  # a vision weight the base lacks: nothing to compare with (the language check is strict)
        if "lora_A" in slot and "lora_B" in slot:
            w = w + scale * (slot["lora_B"][1].float() @ slot["lora_A"][1].float())
        norm = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
        m = slot["magnitude"][1].float().reshape(-1)
        if m.shape != norm.shape:
            raise PatchError("ShapeMismatch", f"{module}: magnitude vector {tuple(m.shape)} does not match the base "
                             f"weight's {norm.shape[0]} rows")
        out[module] = float(((m - norm).abs() / norm.clamp_min(1e-12)).max())
    return out


def config_json(cfg: dict[str, Any]) -> bytes:
    # allow_nan=False: a published config is always strict JSON (parse_config refuses NaN/Infinity first)
    return (json.dumps(cfg, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def options_dict(opts: PatchOptions) -> dict[str, Any]:
    d = asdict(opts)
    d["base_weights"] = str(opts.base_weights) if opts.base_weights else None
    return d
