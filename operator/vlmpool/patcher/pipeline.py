"""The patch itself: a PEFT LoRA/DoRA adapter directory in, a vLLM-ready (config, tensors) out.

``patch_adapter`` runs the steps in the roboflow order (the DoRA refusal moved before the tensors are
read), each a function with its own input and output:

  fetch_config (here)       the config (bounded) and the weights' path
  validate_config (here)    config-level refusals -> rank r
  base_check (here)         declared base vs the pool's -> (result, warnings)
  dora_preflight (here)     the policy that applies, the svd rank; refusals before any tensor is read
  read_weights (weights.py) the safetensors header validated, the tensors as byte ranges (no torch)
  plan_tensors (plan.py)    classify (vision dropped; unsupported/unrecognised refused), rank shapes,
                            output keys -> TensorPlan; check_base_shapes with --base-weights
  apply_dora (dora.py)      the only tensor maths, and the only torch import: svd, strip measured
  output_tensors + Weights.serialize   the output file, kept tensors byte for byte
  report.py                 config rewrite, version, patch_report.json, PatchSummary

Publishing is publish.py's; fetching fetch.py's; api.patch_and_publish runs all three.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmpool.families import VLM_FAMILIES
from vlmpool.patcher.base import BaseWeights
from vlmpool.patcher.config_checks import (
    check_alpha,
    check_patterns,
    check_rank,
    module_rank_scale,
    parse_config,
    refuse_unsupported,
)
from vlmpool.patcher.dora import (  # noqa: F401 - svd helpers re-exported (tests, bench)
    SVD_METHODS,
    VISION_MAGNITUDE_TOLERANCE,
    DoraResult,
    apply_dora,
    check_max_error,
    svd_method_for,
    truncated_svd,
)
from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.families import FAMILIES, validate_key_template
from vlmpool.patcher.options import BASE_CHECKS, DEFAULTS, DORA_POLICIES
from vlmpool.patcher.plan import TensorPlan, check_base_shapes, plan_tensors
from vlmpool.patcher.report import (
    KEY_LAYOUT_NOTE,
    build_report,
    build_summary,
    config_json,
    effective_options,
    rewrite_config,
    version_of,
)
from vlmpool.patcher.sources.fetchlib import CONFIG_MAX_BYTES, CONFIG_NAME, WEIGHTS_NAME
from vlmpool.patcher.summary import PatchSummary
from vlmpool.patcher.weights import TorchWeights, Weights


@dataclass
class PatchOptions:
    """The options that shape the patch: each field is the `vlmpool patch` option of its name, with
    that option's default (vlmpool.patcher.options declares them)."""

    family: str
    pool_base: str
    served_base: str | None = DEFAULTS["served_base"]
    max_rank: int = DEFAULTS["max_rank"]
    dora_policy: str = DEFAULTS["dora_policy"]
    svd_rank: int | None = DEFAULTS["svd_rank"]
    base_weights: Path | None = DEFAULTS["base_weights"]
    base_check: str = DEFAULTS["base_check"]
    declared_variant: str | None = DEFAULTS["declared_variant"]
    vision_norm_threshold: float = DEFAULTS["vision_norm_threshold"]
    key_template: str = DEFAULTS["key_template"]
    device: str | None = DEFAULTS["device"]  # torch device for DoRA math; None: cuda when available, else cpu
    svd_method: str = DEFAULTS["svd_method"]  # exact | randomized | auto (exact on GPU or for small/full-rank)
    tower_connector_lora: bool = DEFAULTS["tower_connector_lora"]  # the pool's vLLM has --enable-tower-connector-lora
    dora_max_error: float | None = DEFAULTS["dora_max_error"]  # refuse a strip/svd whose measured error is above

    def validate(self) -> None:
        if self.family not in VLM_FAMILIES:
            raise PatchError("InvalidArguments",
                             f"unknown family {self.family!r}; one of {', '.join(VLM_FAMILIES)}")
        if not self.pool_base or not self.pool_base.strip():
            raise PatchError("InvalidArguments", "the pool base model (--pool-base) is required")
        if self.dora_policy not in DORA_POLICIES:
            raise PatchError("InvalidArguments",
                             f"unknown DoRA policy {self.dora_policy!r}; one of {', '.join(DORA_POLICIES)}")
        if self.svd_method not in SVD_METHODS:
            raise PatchError("InvalidArguments",
                             f"unknown SVD method {self.svd_method!r}; one of {', '.join(SVD_METHODS)}")
        if self.base_check not in BASE_CHECKS:
            raise PatchError("InvalidArguments",
                             f"unknown base check {self.base_check!r}; one of {', '.join(BASE_CHECKS)}")
        if not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise PatchError("InvalidArguments", f"--max-rank must be a positive integer, not {self.max_rank!r}")
        if self.svd_rank is not None:
            if self.dora_policy != "svd":
                raise PatchError("InvalidArguments", "--svd-rank is only allowed with --dora-policy svd")
            if not isinstance(self.svd_rank, int) or self.svd_rank < 1:
                raise PatchError("InvalidArguments", f"--svd-rank must be a positive integer, not {self.svd_rank!r}")
        if self.dora_max_error is not None and not 0 <= self.dora_max_error < math.inf:
            raise PatchError("InvalidArguments", f"--dora-max-error must be a finite number >= 0, "
                             f"not {self.dora_max_error!r}")
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
    tensors: dict[str, Any]            # output key -> RawTensor (torch.Tensor with tensor_io="torch")
    weights_bytes: bytes               # the serialised adapter_model.safetensors
    version: str
    report: dict[str, Any]             # patch_report.json, without the publish fields
    summary: PatchSummary              # what status.report gets
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


def variant_check(cfg: dict[str, Any], opts: PatchOptions) -> str | None:
    """The advisory registry variant (--declared-variant, the adapter's spec.declaredBase) against what the
    adapter's own config declares (else the pool's base): "match" or "mismatch"; None when none was given.
    Never a refusal: adapter_config.json is the authority."""
    if not opts.declared_variant:
        return None
    v = normalize_variant(opts.declared_variant)
    declared = cfg.get("base_model_name_or_path")
    declared = declared.strip() if isinstance(declared, str) else ""
    if declared:
        return "match" if v == normalize_base_model_reference(declared) else "mismatch"
    targets = {opts.pool_base} | ({opts.served_base} if opts.served_base else set())
    return "match" if v in {normalize_base_model_reference(t) for t in targets} else "mismatch"


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
                            f"base_model_name_or_path {declared!r}; the file is the authority "
                            "(fix the registry record)")
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
        raise PatchError("BaseModelMismatch",
                         f"adapter_config.json declares base model {declared!r}, but the pool serves "
                         f"{names}; names are compared after normalisation "
                         f"({normalize_base_model_reference(declared)!r} vs "
                         f"{', '.join(sorted(repr(w) for w in wanted))}). "
                         "The adapter file is the authority: attach the adapter to a pool of its base model, or fix "
                         "the registry record that sent it here")
    warnings.append(f"adapter_config.json declares base model {declared!r}, not {names}; served anyway "
                    "(baseModelCheck: warn)")
    return "mismatch-warned", warnings


TENSOR_IO = ("bytes", "torch")


def fetch_config(src_dir: Path) -> tuple[dict[str, Any], Path]:
    """Step: the config (read, bounded) and where the weights are."""
    cfg = _read_config(src_dir / CONFIG_NAME)
    weights_path = src_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise PatchError("MissingWeights", f"{WEIGHTS_NAME} is missing")
    return cfg, weights_path


def dora_preflight(use_dora: bool, r: int, opts: PatchOptions) -> tuple[str, int | None]:
    """Step: the DoRA policy that applies (``none`` for a plain LoRA) and the svd rank, refusing before
    any tensor is read. Returns (applied, svd_rank)."""
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
    return applied, svd_rank


def read_weights(path: Path, tensor_io: str):
    """Step: the weights, validated (the byte path parses the header itself; torch only with 'torch')."""
    if tensor_io == "torch":
        return TorchWeights(path)
    return Weights.read(path)


def output_tensors(plan: TensorPlan, dora: DoraResult) -> dict[str, tuple[str | None, Any]]:
    """Step: output key -> (source key kept as it is, or None and the DoRA step's new tensor), sorted."""
    out: dict[str, tuple[str | None, Any]] = {}
    for module in plan.kept:
        new = dora.new_ab.get(module)
        for i, kind in enumerate(("lora_A", "lora_B")):
            out[plan.out_keys[(module, kind)]] = (None, new[i]) if new else (plan.key(module, kind), None)
    return {k: out[k] for k in sorted(out)}


def patch_adapter(src_dir: Path | str, opts: PatchOptions, *, source_uri: str | None = None,
                  source_sha256: str | None = None, fetch_warnings: list[str] | None = None,
                  tensor_io: str = "bytes") -> PatchedAdapter:
    """Patch the adapter in ``src_dir`` (adapter_config.json + adapter_model.safetensors): config ->
    base-model check -> DoRA pre-flight -> read and plan the tensors -> DoRA maths (only when needed)
    -> write -> version and report. ``tensor_io='torch'`` is the torch path (same bytes out)."""
    opts.validate()
    if tensor_io not in TENSOR_IO:
        raise PatchError("InvalidArguments", f"unknown tensor io {tensor_io!r}; one of {', '.join(TENSOR_IO)}")
    family = FAMILIES[opts.family]
    src_dir = Path(src_dir)
    warnings: list[str] = list(fetch_warnings or [])
    notes: list[str] = []

    cfg, weights_path = fetch_config(src_dir)
    r = validate_config(cfg, opts)
    alpha = cfg.get("lora_alpha") or r
    use_rslora = bool(cfg.get("use_rslora"))
    use_dora = bool(cfg.get("use_dora"))
    check, base_warnings = base_check(cfg, opts)
    warnings += base_warnings
    applied, svd_rank = dora_preflight(use_dora, r, opts)

    weights = read_weights(weights_path, tensor_io)
    plan = plan_tensors(weights, family, r, use_dora, opts.vision_norm_threshold, opts.key_template,
                        cfg=cfg, alpha=alpha, tower_connector_lora=opts.tower_connector_lora)
    base = None
    if opts.base_weights is not None:
        base = BaseWeights(opts.base_weights, family)
        check_base_shapes(plan, weights, base)

    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    dora = DoraResult()
    if use_dora and applied == "strip" and base is not None and importlib.util.find_spec("torch") is None:
        # strip keeps A and B as they are: without torch (the default patcher image) only the
        # measurement is lost, so the version is the same and the adapter is served all the same
        warnings.append("strip: error not measured (no torch in this patcher; the patcher-dora image measures it)")
        base = None
    if use_dora and base is not None:  # svd, strip measured, the vision magnitudes: torch from here
        dora = apply_dora(plan, weights, base, applied=applied, scale=scale, svd_rank=svd_rank,
                          svd_method=opts.svd_method, device_name=opts.device,
                          module_scale=lambda m: module_rank_scale(cfg, m, r, alpha)[1])
    elif plan.vision_mags and use_dora:
        warnings.append(f"{len(plan.vision_mags)} vision-tower DoRA magnitude vector(s) dropped unchecked (no base "
                        "weights): if training moved them, the served model differs from the trained one")
    if use_dora and opts.dora_max_error is not None:  # before anything is written or published
        check_max_error(dora, applied, opts.dora_max_error)
    if use_dora and applied == "strip":
        notes.append("strip: DoRA magnitude vectors dropped; the served adapter approximates the trained one"
                     + ("" if base is not None else " (error not measured: no base weights given)"))
    if applied == "svd":
        notes.append("svd: exact DoRA merge with the base weights, delta re-factored by truncated SVD to rank "
                     f"{svd_rank}; r = lora_alpha = rank (scale 1)")
    if plan.magnitudes and not use_dora:
        warnings.append(f"dropped {len(plan.magnitudes)} stray DoRA magnitude vector(s) of a non-DoRA adapter")

    weights_bytes, tensors = weights.serialize(output_tensors(plan, dora), {"format": "pt"})
    new_cfg = rewrite_config(cfg, plan, opts.key_template, r, alpha, applied, svd_rank)
    patched_digest = hashlib.sha256(weights_bytes).hexdigest()
    effective = effective_options(opts, applied, svd_rank)
    version = version_of(patched_digest, config_json(new_cfg), effective)
    notes.append(KEY_LAYOUT_NOTE.format(template=opts.key_template))
    report = build_report(
        src_dir=str(src_dir.resolve()), opts=opts, cfg=cfg, new_cfg=new_cfg, plan=plan, dora=dora, use_dora=use_dora,
        applied=applied, rank=r if svd_rank is None else svd_rank, svd_rank=svd_rank, scale=scale,
        total_tensors=len(weights), tensors_kept=len(tensors), source_digest=weights.digest,
        patched_digest=patched_digest, version=version, check=check, effective=effective, notes=notes,
        warnings=warnings, source_uri=source_uri, source_sha256=source_sha256)
    report["registry_variant_check"] = variant_check(cfg, opts)  # advisory: match | mismatch | None
    summary = build_summary(report, opts, dora, applied, check, warnings)
    return PatchedAdapter(new_cfg, tensors, weights_bytes, version, report, summary, effective)


def options_dict(opts: PatchOptions) -> dict[str, Any]:
    d = asdict(opts)
    d["base_weights"] = str(opts.base_weights) if opts.base_weights else None
    return d
