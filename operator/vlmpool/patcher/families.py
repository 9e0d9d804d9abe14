"""The tensor-key rules that turn a PEFT adapter's keys into the layout vLLM loads.

vLLM reads ``adapter_model.safetensors`` of a LoRA with keys of the form
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``. It strips the
``base_model.model.`` prefix and maps the rest with the model's ``hf_to_vllm_mapper``. For the
Qwen VL families the language model's layers live at ``model.language_model.layers.N`` in the
current Hugging Face layout (transformers >= 4.52 and all Qwen3-VL checkpoints), and vLLM's mapper
for Qwen3-VL only knows that prefix. Adapters trained with older transformers (Qwen2-VL, Qwen2.5-VL)
store ``model.layers.N``. So the patcher rewrites every language-layer key to one canonical
template, ``base_model.model.model.language_model.layers.{suffix}`` by default (the same default as
the roboflow patcher's ``VLLM_ADAPTER_KEY_TEMPLATE``).

Rules (each is counted in patch_report.json under ``key_rules``):

``adapter-name``
    ``...lora_A.<adapter>.weight`` -> ``...lora_A.weight``. A state dict taken straight from a
    ``PeftModel`` (not through ``save_pretrained``) keeps the adapter name; PEFT's saved format and
    vLLM do not.
``peft-prefix``
    a key without the ``base_model.model.`` prefix gets it: vLLM strips exactly that prefix.
``language-layers``
    ``model.layers.N.`` or ``model.language_model.layers.N.`` -> the key template. Legacy Qwen2-VL /
    Qwen2.5-VL adapters use the first; Qwen3-VL in vLLM only accepts the second.

Only the language model's modules the family serves are kept (``Family.language_modules`` in
vlmpool/families.py, the one family table: q/k/v/o and gate/up/down, plus Qwen3.5's linear-attention
projections). Vision-tower and connector tensors (``Family.vision_markers``) are dropped (and the adapter
refused if it trained them) unless the pool serves tower LoRA and the family's vLLM model has the module;
LoRA on anything else (lm_head, embed_tokens, norms) is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmpool.families import FAMILIES, Family

PEFT_PREFIX = "base_model.model."
DEFAULT_KEY_TEMPLATE = "base_model.model.model.language_model.layers.{suffix}"

# The Qwen-VL target_modules order of the rewritten config (the roboflow order); each family's own list is
# Family.module_names (vlmpool.families), which starts with these.
SUPPORTED_MODULES = FAMILIES["qwen2_vl"].module_names

# <module>.lora_A[.<adapter>].weight, <module>.lora_B[.<adapter>].weight
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# <module>.lora_embedding_A[.<adapter>]
_EMB_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
# <module>.lora_magnitude_vector[.<adapter>][.weight]
_MAG_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>(?!weight$)[^.]+))?(?:\.weight)?$")

__all__ = ["DEFAULT_KEY_TEMPLATE", "FAMILIES", "PEFT_PREFIX", "SUPPORTED_MODULES", "Family"]


@dataclass(frozen=True)
class ParsedKey:
    """One adapter tensor key, understood."""

    original: str
    module: str          # module path without the PEFT prefix, adapter name removed
    kind: str            # lora_A | lora_B | lora_embedding_A | lora_embedding_B | magnitude
    had_prefix: bool
    had_adapter_name: bool


def parse_key(key: str) -> ParsedKey | None:
    """Split a PEFT tensor key into module path and tensor kind; None when it is no LoRA tensor."""
    had_prefix = key.startswith(PEFT_PREFIX)
    rest = key[len(PEFT_PREFIX):] if had_prefix else key
    for rx in (_LORA_KEY, _EMB_KEY):
        m = rx.fullmatch(rest)
        if m:
            return ParsedKey(key, m.group("module"), m.group("kind"), had_prefix, m.group("adapter") is not None)
    m = _MAG_KEY.fullmatch(rest)
    if m:
        return ParsedKey(key, m.group("module"), "magnitude", had_prefix, m.group("adapter") is not None)
    return None


def is_vision(module: str, family: Family) -> bool:
    return any(marker in module for marker in family.vision_markers)


def layer_suffix(module: str, family: Family) -> tuple[str, str] | None:
    """(prefix found, suffix after it) when the module is in the language model's decoder layers."""
    for prefix in family.layer_prefixes:
        if module.startswith(prefix):
            return prefix, module[len(prefix):]
    return None


def supported_module_name(suffix: str, family: Family) -> str | None:
    """'q_proj' etc. when the layer suffix is a projection the family serves, else None."""
    return family.layer_module(suffix)


TOWER_PREFIX = "visual:"  # marks a kept vision-tower/connector module's suffix (tower LoRA on)
TOWER_KEY_PREFIX = PEFT_PREFIX + "model.visual."  # vLLM's mappers turn model.visual. into visual.


def tower_suffix(module: str, family: Family) -> str | None:
    """With --tower-connector-lora: TOWER_PREFIX + the module path under the vision tower when vLLM's model
    of the family serves LoRA on it and vlmpool keeps it (Family.tower_lora_modules, the same names the
    simulator checks and tests/vllm compares with vLLM's classes), else None (dropped or refused as without it)."""
    name = module[len("model."):] if module.startswith("model.visual.") else module
    if family.tower_lora_modules is None or not re.fullmatch(family.tower_lora_modules, name):
        return None
    return TOWER_PREFIX + name[len("visual."):]


def module_key(suffix: str, template: str) -> str:
    """The output key of a kept module, before ``.lora_A|lora_B.weight``."""
    if suffix.startswith(TOWER_PREFIX):
        return TOWER_KEY_PREFIX + suffix[len(TOWER_PREFIX):]
    return template.format(suffix=suffix)


def validate_key_template(template: str) -> None:
    if template.count("{suffix}") != 1 or not template.endswith("{suffix}"):
        raise ValueError("the key template must end with exactly one '{suffix}'")
    if not template.startswith(PEFT_PREFIX):
        raise ValueError(f"the key template must start with {PEFT_PREFIX!r} (vLLM strips exactly that prefix)")


def canonical_key(suffix: str, kind: str, template: str) -> str:
    """The output key of a servable LoRA tensor."""
    return module_key(suffix, template) + f".{kind}.weight"
