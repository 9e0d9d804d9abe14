"""Plan the tensors: which are kept (and under which key), dropped or refused. Byte work only.

Input: the weights (names, shapes, and the norm of the vision tower's lora_B), the rank and the
options. Output: a ``TensorPlan``. No tensor is copied or converted here; the norm of a vision
``lora_B`` is the only value read, and an untrained one (all zero bytes) needs no maths at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmpool.patcher.config_checks import module_rank_scale
from vlmpool.patcher.errors import PatchError
from vlmpool.patcher.families import (
    PEFT_PREFIX,
    TOWER_PREFIX,
    Family,
    ParsedKey,
    canonical_key,
    is_vision,
    layer_suffix,
    module_key,
    parse_key,
    supported_module_name,
    tower_suffix,
)

KEY_RULES = ("adapter-name", "peft-prefix", "language-layers")


@dataclass
class TensorPlan:
    modules: dict[str, dict[str, str]]          # module -> {kind: source key}
    parsed: dict[str, ParsedKey]                 # source key -> parsed
    kept: dict[str, tuple[str, str]]             # servable module -> (layer suffix, module name)
    dropped_vision: list[str] = field(default_factory=list)
    vision_mags: list[str] = field(default_factory=list)   # vision modules with a DoRA magnitude
    vision_b_max: float = 0.0
    magnitudes: list[str] = field(default_factory=list)    # source keys of the kept modules' magnitudes
    out_keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (module, lora_A|lora_B) -> key
    rules: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEY_RULES, 0))
    remapped: int = 0

    def key(self, module: str, kind: str) -> str:
        """The source key of a module's tensor."""
        return self.modules[module][kind]

    def is_tower(self, module: str) -> bool:
        """A kept vision-tower/connector module (served with --enable-tower-connector-lora)."""
        return self.kept[module][0].startswith(TOWER_PREFIX)


def plan_tensors(weights: Any, family: Family, r: int, use_dora: bool, vision_norm_threshold: float,
                 key_template: str, *, cfg: dict[str, Any] | None = None, alpha: float | None = None,
                 tower_connector_lora: bool = False) -> TensorPlan:
    """Classify every tensor (vision: dropped, or kept when the pool serves tower LoRA and vLLM's model
    of the family has the module; unsupported or unrecognised: refused), check the servable modules'
    shapes against their rank (``rank_pattern`` of ``cfg`` included), and give each kept tensor its
    output key."""
    modules: dict[str, dict[str, str]] = {}
    parsed_by_key: dict[str, ParsedKey] = {}
    unrecognised = []
    for key in weights.keys():
        p = parse_key(key)
        if p is None:
            unrecognised.append(key)
            continue
        parsed_by_key[key] = p
        slot = modules.setdefault(p.module, {})
        if p.kind in slot:
            raise PatchError("UnrecognisedTensor", f"two tensors for {p.module} {p.kind}: {slot[p.kind]} and {key}")
        slot[p.kind] = key

    plan = TensorPlan(modules, parsed_by_key, {})
    trained_vision: list[tuple[str, float]] = []
    unsupported: dict[str, list[str]] = {}
    for module, slot in sorted(modules.items()):
        tower = tower_suffix(module, family) if tower_connector_lora and is_vision(module, family) else None
        if tower is not None:  # served by vLLM with --enable-tower-connector-lora: kept like a language module
            _check_complete(module, slot)
            plan.kept[module] = (tower, tower.rsplit(".", 1)[-1])
            continue
        if is_vision(module, family):
            for kind, key in slot.items():
                plan.dropped_vision.append(key)
                if kind == "magnitude":
                    plan.vision_mags.append(module)
                if kind in ("lora_B", "lora_embedding_B"):
                    n = weights.norm(key)
                    plan.vision_b_max = max(plan.vision_b_max, n)
                    if n > vision_norm_threshold:
                        trained_vision.append((module, n))
            continue
        found = layer_suffix(module, family)
        name = supported_module_name(found[1], family) if found else None
        if found is None or name is None:
            unsupported.setdefault(module, []).extend(slot.values())
            continue
        _check_complete(module, slot)
        plan.kept[module] = (found[1], name)
    if trained_vision:
        worst = sorted(trained_vision, key=lambda x: -x[1])[:5]
        raise PatchError("TrainedVisionTower", f"the adapter trained the vision tower ({len(trained_vision)} module(s) "
                         f"with lora_B norm over {vision_norm_threshold:g}: "
                         + ", ".join(f"{m} ‖B‖={n:.4g}" for m, n in worst)
                         + "); vLLM serves LoRA on the language model only, so dropping them would change the "
                         "model. Retrain with target_modules limited to the language model")
    if unsupported:
        names = sorted(unsupported)
        raise PatchError("UnsupportedTargetModules", f"LoRA on module(s) vLLM cannot serve for {family.title}: "
                         f"{', '.join(names[:5])}{' …' if len(names) > 5 else ''}; servable are the language "
                         f"model's {', '.join(family.module_names)}")
    if unrecognised:
        full = [k for k in unrecognised if k.endswith(".base_layer.weight")]
        hint = (" (full layer weights, which PEFT saves when embeddings or lm_head are adapted: vLLM cannot "
                "serve them)" if full else "")
        raise PatchError("UnrecognisedTensor", f"{len(unrecognised)} tensor(s) are not LoRA A/B matrices or DoRA "
                         f"magnitude vectors: {', '.join(sorted(unrecognised)[:5])}{hint}")
    if not plan.kept:
        raise PatchError("NoServableTensors", "no servable LoRA tensors are left after dropping "
                         f"{len(plan.dropped_vision)} vision-tower tensor(s)")
    check_rank_shapes(plan, weights, r, use_dora, cfg=cfg, alpha=alpha)
    remap_keys(plan, key_template)
    return plan


def _check_complete(module: str, slot: dict[str, str]) -> None:
    kinds = set(slot)
    if not {"lora_A", "lora_B"} <= kinds or kinds - {"lora_A", "lora_B", "magnitude"}:
        raise PatchError("IncompleteModule", f"module {module} has {sorted(kinds)}; a servable module needs exactly "
                         "lora_A and lora_B (plus a magnitude vector for DoRA)")


def check_rank_shapes(plan: TensorPlan, weights: Any, r: int, use_dora: bool, *, cfg: dict[str, Any] | None = None,
                      alpha: float | None = None) -> None:
    """Internal consistency: A is rank x in, B is out x rank (the module's rank: ``rank_pattern`` or
    r), a DoRA magnitude has B's out features."""
    for module in plan.kept:
        a, b = weights.shape(plan.key(module, "lora_A")), weights.shape(plan.key(module, "lora_B"))
        want = module_rank_scale(cfg, module, r, alpha if alpha is not None else r)[0] if cfg else r
        if len(a) != 2 or len(b) != 2 or a[0] != want or b[1] != want:
            raise PatchError("ShapeMismatch", f"{module}: lora_A {tuple(a)} and lora_B {tuple(b)} do not "
                             f"have the config's rank {'r' if want == r else 'rank_pattern'}={want}")
        mag = plan.modules[module].get("magnitude")
        if mag is not None and use_dora and tuple(weights.shape(mag)) != (b[0],):
            raise PatchError("ShapeMismatch", f"{module}: magnitude vector {tuple(weights.shape(mag))} does not match "
                             f"lora_B's {b[0]} output features")


def check_base_shapes(plan: TensorPlan, weights: Any, base: Any) -> None:
    """The adapter's out x in against the base model's weight (when the base weights are at hand; the
    base weights are read for the language model only, so tower modules are not checked)."""
    for module in plan.kept:
        if plan.is_tower(module):
            continue
        a, b = weights.shape(plan.key(module, "lora_A")), weights.shape(plan.key(module, "lora_B"))
        shape = base.shape(module)
        if tuple(shape) != (b[0], a[1]):
            raise PatchError("ShapeMismatch", f"{module}: the adapter is {b[0]}x{a[1]} but the base "
                             f"weight is {'x'.join(map(str, shape))}: the adapter was trained on another model")


def remap_keys(plan: TensorPlan, key_template: str) -> None:
    """Each kept A/B gets its output key (counting the rules applied); two source modules that land
    on the same output key (the same layer saved under two layouts) are refused, not overwritten."""
    owner: dict[str, str] = {}
    for module, (suffix, _name) in plan.kept.items():
        mag = plan.modules[module].get("magnitude")
        if mag is not None:
            plan.magnitudes.append(mag)
        for kind in ("lora_A", "lora_B"):
            orig = plan.key(module, kind)
            p = plan.parsed[orig]
            out = canonical_key(suffix, kind, key_template)
            if out in owner:
                raise PatchError("UnrecognisedTensor", f"two tensors map to the same output key {out}: "
                                 f"{owner[out]} and {orig} (the adapter holds one layer under two layouts)")
            owner[out] = orig
            if p.had_adapter_name:
                plan.rules["adapter-name"] += 1
            if not p.had_prefix:
                plan.rules["peft-prefix"] += 1
            if module_key(suffix, key_template) != PEFT_PREFIX + module:
                plan.rules["language-layers"] += 1
            if out != orig:
                plan.remapped += 1
            plan.out_keys[(module, kind)] = out
