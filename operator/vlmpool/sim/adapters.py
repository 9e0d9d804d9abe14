"""Adapter directory validation as vLLM's worker does it at ``add_lora`` time, without torch.

Order and texts follow ``WorkerLoRAManager._load_adapter``: read ``adapter_config.json``
(``PEFTHelper.from_local_dir``; a missing file is ``LoRAAdapterNotFoundError``), build the helper
(missing required fields, ``r`` <= 0), ``validate_legal`` (unsupported features, rank, bias), then
``LoRAModel.from_local_checkpoint``: the safetensors file (or ``adapter_model.bin``/``.pt``), its
header, every key through the family's ``hf_to_vllm_mapper`` and ``parse_fine_tuned_lora_name``,
the unexpected-module check, DoRA magnitude vectors.

The simulator adds two checks vLLM does not make at load time. The layout check (``strict_layout``,
on by default) refuses what vLLM would load and then *silently* not apply, the failure that hurts most
in production: every mapped module must be a module the family's model has (a key such as
``model.layers.N`` on Qwen3-VL maps to nothing in vLLM and is ignored). The shape check (A/B must agree
with the rank of their module) runs at load (``shape_check="load"``, a "[vlmpool sim]" refusal), or, as
vLLM does it, at the first request that uses the adapter (``shape_check="first-use"``: the load answers
200 and that request kills the engine, see engine.py).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from vlmpool.sim import contract


class AdapterError(Exception):
    """A load refusal: ``status`` and ``body`` are exactly what the HTTP route answers."""

    def __init__(self, status: int, body: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body
        self.reason = reason


def _engine_failure(message: str) -> AdapterError:
    status, body = contract.engine_utility_failure("add_lora", message)
    return AdapterError(status, body, message)


# ---- model families ----------------------------------------------------------------------------

LANGUAGE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LM_LAYER = re.compile(
    r"^language_model\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj))$")
_PLAIN_LAYER = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj))$")


@dataclass(frozen=True)
class Family:
    """What vLLM's model class for a family exposes to the LoRA loader."""

    name: str
    architecture: str
    # WeightsMapper(orig_to_new_prefix=...) of the vLLM model class, applied in order, first match.
    prefix_map: tuple[tuple[str, str], ...]
    # supported_lora_modules after packed_modules_mapping expansion (the suffixes vLLM expects).
    expected_modules: frozenset[str]
    # full vLLM module names (after mapping) that exist in the model (strict layout check).
    module_patterns: tuple[re.Pattern[str], ...]
    layout_hint: str

    def map_name(self, name: str) -> str:
        for old, new in self.prefix_map:
            if name.startswith(old):
                return new + name[len(old):]
        return name


_QWEN2_5_VL_VISION = re.compile(
    r"^visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))"
    r"|merger\.mlp\.(0|2))$")
_QWEN2_VL_VISION = re.compile(
    r"^visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))|merger\.mlp\.(0|2))$")
_QWEN3_VL_VISION = re.compile(
    r"^visual\.(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(linear_fc1|linear_fc2))"
    r"|(merger|deepstack_merger_list\.\d+)\.(linear_fc1|linear_fc2))$")

# Vision tower and connector modules (vLLM names) of each family: what --enable-tower-connector-lora serves.
VISION_MODULES = {"qwen2_vl": _QWEN2_VL_VISION, "qwen2_5_vl": _QWEN2_5_VL_VISION, "qwen3_vl": _QWEN3_VL_VISION}

# Qwen2-VL / Qwen2.5-VL (vllm/model_executor/models/qwen2_5_vl.py): checkpoints of both the old
# layout (model.layers.N, before transformers 4.52) and the new one (model.language_model.layers.N).
_QWEN2_MAP = (
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "visual."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
)
# Qwen3-VL (qwen3_vl.py): new layout only; a bare "model." prefix is not mapped.
_QWEN3_MAP = (
    ("model.visual.", "visual."),
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
)

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        "qwen2_vl", "Qwen2VLForConditionalGeneration", _QWEN2_MAP,
        frozenset(LANGUAGE_MODULES + ("qkv", "proj", "fc1", "fc2", "0", "2")),
        (_LM_LAYER, _QWEN2_VL_VISION),
        "base_model.model.model.language_model.layers.N.<module> or base_model.model.model.layers.N.<module>"),
    "qwen2_5_vl": Family(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", _QWEN2_MAP,
        frozenset(LANGUAGE_MODULES + ("qkv", "proj", "0", "2")),
        (_LM_LAYER, _QWEN2_5_VL_VISION),
        "base_model.model.model.language_model.layers.N.<module> or base_model.model.model.layers.N.<module>"),
    "qwen3_vl": Family(
        "qwen3_vl", "Qwen3VLForConditionalGeneration", _QWEN3_MAP,
        # embed_tokens and lm_head: Qwen3LLMForCausalLM's embedding_modules (vllm qwen3.py)
        frozenset(LANGUAGE_MODULES + ("qkv", "proj", "linear_fc1", "linear_fc2", "embed_tokens", "lm_head")),
        (_LM_LAYER, _QWEN3_VL_VISION),
        "base_model.model.model.language_model.layers.N.<module>"),
    # Plain decoder-only models (Llama, Qwen2, Qwen3 text): no mapper.
    "llama": Family(
        "llama", "LlamaForCausalLM", (),
        frozenset(LANGUAGE_MODULES), (_PLAIN_LAYER,),
        "base_model.model.model.layers.N.<module>"),
}


def detect_family(model: str, default: str = "qwen2_5_vl") -> str:
    """The family vLLM would pick from the model's architecture, guessed from its name or path."""
    key = re.sub(r"[^a-z0-9]", "", model.lower())
    for marker, fam in (("qwen3vl", "qwen3_vl"), ("qwen25vl", "qwen2_5_vl"), ("qwen2vl", "qwen2_vl"),
                        ("llama", "llama")):
        if marker in key:
            return fam
    return default


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


# ---- safetensors header ------------------------------------------------------------------------

_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_MAX_HEADER = 100_000_000  # the safetensors crate's own limit


class SafetensorsError(Exception):
    pass


def read_safetensors_header(path: str) -> dict[str, dict[str, Any]]:
    """Parse and check a safetensors file's header the way the safetensors crate does.

    Returns ``{tensor_name: {"dtype", "shape", "data_offsets"}}`` (``__metadata__`` dropped).
    Raises ``SafetensorsError`` with the crate's wording ("Error while deserializing header: ...").
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError("Error while deserializing header: HeaderTooSmall")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError("Error while deserializing header: HeaderTooLarge")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise SafetensorsError("Error while deserializing header: InvalidHeaderStart")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SafetensorsError("Error while deserializing header: InvalidHeaderDeserialization") from None
    if not isinstance(header, dict):
        raise SafetensorsError("Error while deserializing header: InvalidHeaderDeserialization")
    header.pop("__metadata__", None)
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: _offsets(kv[1])[0]):
        start, stop = _offsets(info)
        dtype, shape = info.get("dtype"), info.get("shape")
        if dtype not in _DTYPE_SIZES or not isinstance(shape, list) or not all(
                isinstance(d, int) and d >= 0 for d in shape):
            raise SafetensorsError("Error while deserializing header: InvalidHeaderDeserialization")
        if start != end or stop < start:
            raise SafetensorsError(f"Error while deserializing header: InvalidOffset({name!r})")
        count = 1
        for d in shape:
            count *= d
        if (stop - start) != count * _DTYPE_SIZES[dtype]:
            raise SafetensorsError("Error while deserializing header: TensorInvalidInfo")
        end = stop
    if 8 + n + end != size:
        raise SafetensorsError("Error while deserializing header: MetadataIncompleteBuffer")
    return header


def _offsets(info: Any) -> tuple[int, int]:
    try:
        a, b = info["data_offsets"]
        return int(a), int(b)
    except (TypeError, KeyError, ValueError):
        raise SafetensorsError("Error while deserializing header: InvalidHeaderDeserialization") from None


# ---- the adapter -------------------------------------------------------------------------------

@dataclass
class AdapterInfo:
    """What the engine keeps of a validated adapter (the simulator holds no weights)."""

    path: str
    rank: int
    lora_alpha: float
    target_modules: Any
    modules: list[str] = field(default_factory=list)  # vLLM module names, sorted
    tensors: int = 0
    weights_bytes: int = 0
    weights_file: str = ""
    # shape_check="first-use": why the first request using the adapter fails (None: it fits)
    first_use_error: str | None = None


_FEATURE_FIELDS = ("modules_to_save", "use_dora", "lora_bias", "init_lora_weights",
                   "alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora")


def _features_errors(cfg: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    mts = cfg.get("modules_to_save")
    if mts:
        unsupported = [m for m in mts if m not in ("classifier", "score")]
        if unsupported:
            errors.append(
                "vLLM only supports modules_to_save being either None or [\"classifier\", \"score\"] "
                f"for classification models. Unsupported modules_to_save: {unsupported}")
    if cfg.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if cfg.get("lora_bias"):
        errors.append("vLLM does not support LoRA bias (lora_bias).")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        errors.append(
            f"vLLM does not support init_lora_weights={init!r}. Inits such as PiSSA, OLoRA, CorDA and "
            "LoftQ modify the base model weights when PEFT loads the adapter. Convert it to a regular "
            "LoRA adapter with PEFT's path_initial_model_for_weight_conversion, or set "
            "init_lora_weights to true if the served base model already contains the modified weights.")
    if cfg.get("alora_invocation_tokens"):
        errors.append("vLLM does not support Activated LoRA (aLoRA).")
    if cfg.get("layer_replication"):
        errors.append("vLLM does not support layer_replication.")
    if cfg.get("use_bdlora"):
        errors.append("vLLM does not support block-diagonal LoRA (BD-LoRA).")
    if cfg.get("use_qalora"):
        errors.append("vLLM does not support QALoRA.")
    return errors


def _parse_lora_name(key: str, fam: Family) -> tuple[str, str]:
    """vllm.lora.utils.parse_fine_tuned_lora_name; returns (module_name, weight_kind)."""
    name = key
    if name.startswith("base_model.model."):
        name = "base_model.model." + fam.map_name(name[len("base_model.model."):])
    else:
        name = fam.map_name(name)
    start = 2 if name.startswith("base_model.model.") else 0
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2]
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[start:-1]), parts[-1]
    # anything else, DoRA's lora_magnitude_vector and lora_B.bias included
    raise ValueError(contract.unsupported_lora_weight(name))


def _is_base_embedding(key: str) -> bool:
    return key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight"))


SHAPE_CHECKS = ("load", "first-use")


def validate_adapter(lora_name: str, lora_path: str, *, max_lora_rank: int, family_name: str,
                     strict_layout: bool = True, shape_check: str = "load") -> AdapterInfo:
    """Validate ``lora_path`` as vLLM's ``add_lora`` would; raise ``AdapterError`` on refusal."""
    fam = family(family_name)
    if shape_check not in SHAPE_CHECKS:
        raise ValueError(f"shape_check must be one of {SHAPE_CHECKS}, not {shape_check!r}")
    path = os.path.expanduser(lora_path)
    cfg_path = os.path.join(path, "adapter_config.json")
    # PEFTHelper.from_local_dir: open() failing with FileNotFoundError → LoRAAdapterNotFoundError.
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = f.read()
    except FileNotFoundError:
        status, body = contract.lora_adapter_not_found(lora_name, lora_path)
        raise AdapterError(status, body, f"no adapter_config.json under {lora_path}") from None
    except OSError as e:  # unreadable (permissions, a directory named adapter_config.json, ...)
        raise _engine_failure(f"[Errno {e.errno}] {e.strerror}: '{cfg_path}'") from None
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise _engine_failure(str(e)) from None
    if not isinstance(cfg, dict):
        raise _engine_failure("adapter_config.json is not a JSON object")

    missing = {"r", "lora_alpha", "target_modules"} - set(cfg)
    if missing:
        raise _engine_failure(f"Missing required configuration fields: {missing}")
    r = cfg["r"]
    if not isinstance(r, int) or isinstance(r, bool):
        raise _engine_failure(f"LoRA rank `r` must be a positive integer, got {r}.")
    if r <= 0:
        raise _engine_failure(f"LoRA rank `r` must be a positive integer, got {r}.")
    rank_pattern = cfg.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict):
        raise _engine_failure("rank_pattern must be a mapping")

    errors = _features_errors(cfg)
    for key, value in rank_pattern.items():
        if not isinstance(value, int) or value <= 0:
            raise _engine_failure(
                f"LoRA rank for `{key}` in `rank_pattern` must be a positive integer, got {value}.")
    max_rank = max([r, *rank_pattern.values()])
    if max_rank > max_lora_rank:
        errors.append(f"LoRA rank {max_rank} is greater than max_lora_rank {max_lora_rank}.")
    if cfg.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    if errors:
        raise _engine_failure(" ".join(errors))

    st_path = os.path.join(path, "adapter_model.safetensors")
    bin_path = os.path.join(path, "adapter_model.bin")
    pt_path = os.path.join(path, "adapter_model.pt")
    if not os.path.isfile(st_path):
        if os.path.isfile(bin_path) or os.path.isfile(pt_path):
            # vLLM would torch.load(weights_only=True) these; the simulator reads safetensors only.
            raise _engine_failure(
                f"[vlmpool sim] {lora_path} has only pickle weights (adapter_model.bin/.pt); the "
                "simulator validates safetensors only — convert the adapter to safetensors")
        raise _engine_failure(f"{lora_path} doesn't contain tensors")
    try:
        header = read_safetensors_header(st_path)
    except SafetensorsError as e:
        raise _engine_failure(str(e)) from None
    except OSError as e:
        raise _engine_failure(f"[Errno {e.errno}] {e.strerror}: '{st_path}'") from None

    # check_unexpected_modules, in the file's key order.
    expected = fam.expected_modules
    modules: dict[str, dict[str, Any]] = {}
    peft_names: dict[str, str] = {}  # vLLM module name -> the checkpoint's (rank_pattern matches this)
    unexpected: list[str] = []
    for key in header:
        if _is_base_embedding(key) or "base_layer" in key:
            continue
        try:
            module, kind = _parse_lora_name(key, fam)
        except ValueError as e:
            raise _engine_failure(str(e)) from None
        if module.rsplit(".", 1)[-1] not in expected:
            unexpected.append(module)  # once per tensor key, as vLLM lists them (lora_model.py)
        modules.setdefault(module, {})[kind] = header[key]
        peft_names.setdefault(module, _peft_module_name(key))
    if unexpected:
        raise _engine_failure(
            f"While loading {lora_path}, expected target modules in {_py_set(expected)} but received "
            f"{unexpected}. Please verify that the loaded LoRA module is correct")
    if not modules:
        raise _engine_failure(f"[vlmpool sim] {lora_path}: adapter_model.safetensors holds no LoRA tensors")

    if strict_layout:
        stray = sorted(m for m in modules
                       if not m.endswith(("embed_tokens", "lm_head"))
                       and not any(p.match(m) for p in fam.module_patterns))
        if stray:
            shown = ", ".join(stray[:5]) + (f" (+{len(stray) - 5} more)" if len(stray) > 5 else "")
            raise _engine_failure(
                f"[vlmpool sim] {lora_path}: {len(stray)} LoRA module(s) map to no module of "
                f"{fam.architecture} after vLLM's key mapping: {shown}. vLLM would load the adapter "
                f"and silently ignore them. Expected keys like {fam.layout_hint}")
        for module, kinds in sorted(modules.items()):
            a, b = kinds.get("lora_A"), kinds.get("lora_B")
            if a is None or b is None:
                if "lora_embedding_A" in kinds or "lora_embedding_B" in kinds:
                    continue
                raise _engine_failure(
                    f"[vlmpool sim] {lora_path}: module {module} has only "
                    f"{'lora_A' if a is not None else 'lora_B'}; both lora_A and lora_B are needed")
    first_use_error = None
    for module, kinds in sorted(modules.items()) if (strict_layout or shape_check == "first-use") else ():
        a, b = kinds.get("lora_A"), kinds.get("lora_B")
        if a is None or b is None:
            continue
        want = _rank_for(peft_names[module], r, rank_pattern)
        if len(a["shape"]) != 2 or len(b["shape"]) != 2 or a["shape"][0] != want or b["shape"][1] != want:
            problem = (f"module {module} has lora_A {a['shape']} and lora_B {b['shape']}, which do not match "
                       f"rank {want} from adapter_config.json")
            if shape_check == "load":
                raise _engine_failure(f"[vlmpool sim] {lora_path}: {problem}")
            first_use_error = first_use_error or problem

    data_bytes = max((_offsets(v)[1] for v in header.values()), default=0)
    return AdapterInfo(path=lora_path, rank=max_rank, lora_alpha=cfg["lora_alpha"],
                       target_modules=cfg["target_modules"], modules=sorted(modules),
                       tensors=len(header), weights_bytes=data_bytes, weights_file=st_path,
                       first_use_error=first_use_error)


def _peft_module_name(key: str) -> str:
    """The checkpoint's module name of a tensor key (no base_model.model., no weights mapping): what
    vLLM matches rank_pattern against (lora_model.py, ``parse_fine_tuned_lora_name(tensor_name)``)."""
    name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    parts = name.split(".")
    return ".".join(parts[:-2] if parts[-1] == "weight" else parts[:-1])


def _rank_for(module: str, r: int, rank_pattern: dict[str, Any]) -> int:
    # PEFTHelper._match_pattern: a key matches a suffix of the name at a "." boundary; first match wins
    for key, value in rank_pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return int(value)
    return r


def _py_set(items: frozenset[str]) -> str:
    return "{" + ", ".join(repr(x) for x in sorted(items)) + "}"
