"""Adapter directory validation as vLLM's worker does it at ``add_lora`` time, without torch.

Order and texts follow ``WorkerLoRAManager._load_adapter``: read ``adapter_config.json``
(``PEFTHelper.from_local_dir``; a missing file is ``LoRAAdapterNotFoundError``), build the helper
(missing required fields, ``r`` <= 0), ``validate_legal`` (unsupported features, rank, bias), then
``LoRAModel.from_local_checkpoint``: the safetensors file (or ``adapter_model.bin``/``.pt``), its
header, every key through the family's ``hf_to_vllm_mapper`` and ``parse_fine_tuned_lora_name``,
the unexpected-module check, DoRA magnitude vectors.

Then, as vLLM 0.32 does inside ``add_lora`` (the worker activates the adapter during the load:
``set_lora`` copies each A/B into the model's stacked LoRA buffers), tensors that do not fit those buffers
are refused at load, with torch's text, and the engine stays healthy: a rank above ``--max-lora-rank``
in the tensors, and — when the model's dimensions are known (``ModelDims``, read from the model
directory's config.json) — in-features or out-features larger than the module's. Smaller ones fit the
buffers and load, as in vLLM.

The simulator adds two checks vLLM does not make. The layout check (``strict_layout``, on by default)
refuses what vLLM would load and then *silently* not apply, the failure that hurts most in production:
every mapped module must be a module the family's model has (a key such as ``model.layers.N`` on Qwen3-VL
maps to nothing in vLLM and is ignored). The rank check (``shape_check="load"``, default: A/B must
agree with the rank in adapter_config.json, a "[vlmpool sim]" refusal) catches an adapter vLLM loads
and serves with the wrong scaling; ``shape_check="off"`` leaves it out, as vLLM does.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from vlmpool import families
from vlmpool.sim import contract
from vlmpool.sim.st_header import SafetensorsError, data_offsets, read_safetensors_header


class AdapterError(Exception):
    """A load refusal: ``status`` and ``body`` are exactly what the HTTP route answers."""

    def __init__(self, status: int, body: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body
        self.reason = reason


def _engine_failure(message: str) -> AdapterError:
    # every check runs in the worker process, whose exception the engine core wraps twice
    status, body = contract.worker_failure("add_lora", message)
    return AdapterError(status, body, message)


@dataclass(frozen=True)
class ModelDims:
    """The language model's sizes, which the LoRA buffers vLLM copies an adapter into have."""

    hidden: int
    intermediate: int
    q_out: int   # num_attention_heads * head_dim
    kv_out: int  # num_key_value_heads * head_dim

    def features(self, module: str) -> tuple[int, int] | None:
        """(in, out) of a language-model projection, by its last name part; None for anything else."""
        table = {"q_proj": (self.hidden, self.q_out), "k_proj": (self.hidden, self.kv_out),
                 "v_proj": (self.hidden, self.kv_out), "o_proj": (self.q_out, self.hidden),
                 "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
                 "down_proj": (self.intermediate, self.hidden)}
        return table.get(module)

    @classmethod
    def from_model_dir(cls, model: str) -> ModelDims | None:
        """From ``<model>/config.json`` (its ``text_config`` where it has one); None when the model is a
        name, not a directory with a readable config."""
        try:
            with open(os.path.join(os.path.expanduser(model), "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
            text = cfg.get("text_config") or cfg
            hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
            head_dim = int(text.get("head_dim") or hidden // heads)
            return cls(hidden=hidden, intermediate=int(text["intermediate_size"]), q_out=heads * head_dim,
                       kv_out=int(text.get("num_key_value_heads") or heads) * head_dim)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


# ---- model families (views of the one family table, vlmpool/families.py) ---------------------------

@dataclass(frozen=True)
class Family:
    """What vLLM's model class for a family exposes to the LoRA loader."""

    name: str
    architecture: str
    # WeightsMapper(orig_to_new_prefix=...) of the vLLM model class as its rename mapper applies it to LoRA
    # names (get_rename_mapper: entries mapping to None removed), in order, first match.
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


def _view(f: families.Family) -> Family:
    if f.vlm:
        patterns = (f.vllm_layer_pattern(),) + ((re.compile(f.vision_modules),) if f.vision_modules else ())
        legacy = " or base_model.model.model.layers.N.<module>" if ("model.", "language_model.model.") in \
            f.weights_mapper else ""
        hint = "base_model.model.model.language_model.layers.N.<module>" + legacy
    else:  # a plain decoder-only model: vLLM's module names are the checkpoint's
        alts = "|".join(re.escape(m) for m in f.language_modules)
        patterns, hint = (re.compile(rf"^model\.layers\.\d+\.({alts})$"),), "base_model.model.model.layers.N.<module>"
    return Family(f.name, f.vllm_architecture, tuple((a, b) for a, b in f.weights_mapper if b is not None),
                  f.expected_modules, patterns, hint)


FAMILIES: dict[str, Family] = {name: _view(f) for name, f in families.FAMILIES.items()}
# Vision tower and connector modules (vLLM names) of each family: what --enable-tower-connector-lora serves.
VISION_MODULES = {name: re.compile(f.tower_lora_modules) for name, f in families.FAMILIES.items()
                  if f.tower_lora_modules}
detect_family = families.detect_family


def family(name: str) -> Family:
    return FAMILIES[families.family(name).name]


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


SHAPE_CHECKS = ("load", "off")


def validate_adapter(lora_name: str, lora_path: str, *, max_lora_rank: int, family_name: str,
                     strict_layout: bool = True, shape_check: str = "load",
                     model_dims: ModelDims | None = None) -> AdapterInfo:
    """Validate ``lora_path`` as vLLM's ``add_lora`` would; raise ``AdapterError`` on refusal."""
    fam = family(family_name)
    if shape_check not in SHAPE_CHECKS:
        raise ValueError(f"shape_check must be one of {SHAPE_CHECKS}, not {shape_check!r}")
    path = os.path.expanduser(lora_path)
    cfg = _read_config(lora_name, lora_path, path)
    r, rank_pattern, max_rank = _check_config(cfg, max_lora_rank)
    st_path, header = _read_weights_header(lora_path, path)
    modules, peft_names = _lora_modules(header, fam, lora_path)
    if strict_layout:
        _check_layout(modules, fam, lora_path)
    _check_buffers(modules, max_lora_rank, model_dims)  # vLLM's own refusals (and texts) come first
    if shape_check == "load":
        _check_shapes(modules, peft_names, r, rank_pattern, lora_path)

    data_bytes = max((data_offsets(v)[1] for v in header.values()), default=0)
    return AdapterInfo(path=lora_path, rank=max_rank, lora_alpha=cfg["lora_alpha"],
                       target_modules=cfg["target_modules"], modules=sorted(modules),
                       tensors=len(header), weights_bytes=data_bytes, weights_file=st_path)


def _read_config(lora_name: str, lora_path: str, path: str) -> dict[str, Any]:
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
    return cfg


def _check_config(cfg: dict[str, Any], max_lora_rank: int) -> tuple[int, dict[str, Any], int]:
    """PEFTHelper's checks, in its order; returns (r, rank_pattern, the largest rank)."""
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
    return r, rank_pattern, max_rank


def _read_weights_header(lora_path: str, path: str) -> tuple[str, dict[str, Any]]:
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
    return st_path, header


def _lora_modules(header: dict[str, Any], fam: Family,
                  lora_path: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """check_unexpected_modules, in the file's key order; returns (module -> {kind: tensor info},
    vLLM module name -> the checkpoint's, which rank_pattern matches)."""
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
    return modules, peft_names


def _check_layout(modules: dict[str, dict[str, Any]], fam: Family, lora_path: str) -> None:
    """--strict-lora-layout: refuse what vLLM would load and silently ignore."""
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


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
# vLLM's module order inside a layer (qkv_proj packs q, k, v; gate_up_proj packs gate, up), as activate_adapter
# walks the model's modules and set_lora copies the slices of a packed module in order.
_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _torch_size_mismatch(a: int, b: int, dim: int) -> str:
    return f"The size of tensor a ({a}) must match the size of tensor b ({b}) at non-singleton dimension {dim}"


def _check_buffers(modules: dict[str, dict[str, Any]], max_lora_rank: int, dims: ModelDims | None) -> None:
    """What vLLM 0.32's ``set_lora`` refuses inside ``add_lora`` (lora/layers/base_linear.py: ``lora_a_stacked
    [index, 0, :A.shape[0], :A.shape[1]].copy_(A)`` into a [max_lora_rank, in] buffer, then the same for B into
    [out, max_lora_rank]): a tensor larger than its buffer, torch's message for the first one in vLLM's order
    (language layers only: vision modules get no buffers without tower LoRA)."""
    ordered = []
    for module, kinds in modules.items():
        m = _LAYER.search(module)
        if m is None or m.group(2) not in _ORDER:
            continue
        ordered.append(((int(m.group(1)), _ORDER.index(m.group(2))), m.group(2), kinds))
    for _, name, kinds in sorted(ordered, key=lambda t: t[0]):
        feats = dims.features(name) if dims is not None else None
        for kind, buffer in (("lora_A", (max_lora_rank, feats[0] if feats else None)),
                             ("lora_B", (feats[1] if feats else None, max_lora_rank))):
            info = kinds.get(kind)
            shape = info.get("shape") if info else None
            if not isinstance(shape, list) or len(shape) != 2:
                continue
            # torch compares the trailing dimension first
            for dim in (1, 0):
                limit = buffer[dim]
                if limit is not None and shape[dim] > limit:
                    raise _engine_failure(_torch_size_mismatch(limit, shape[dim], dim))


def _check_shapes(modules: dict[str, dict[str, Any]], peft_names: dict[str, str], r: int,
                  rank_pattern: dict[str, Any], lora_path: str) -> None:
    """A/B shapes against the configured ranks (``shape_check="load"``, a sim extra: vLLM copies what fits)."""
    for module, kinds in sorted(modules.items()):
        a, b = kinds.get("lora_A"), kinds.get("lora_B")
        if a is None or b is None:
            continue
        want = _rank_for(peft_names[module], r, rank_pattern)
        if len(a["shape"]) != 2 or len(b["shape"]) != 2 or a["shape"][0] != want or b["shape"][1] != want:
            raise _engine_failure(
                f"[vlmpool sim] {lora_path}: module {module} has lora_A {a['shape']} and lora_B {b['shape']}, "
                f"which do not match rank {want} from adapter_config.json (vLLM would load it)")


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
