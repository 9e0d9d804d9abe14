"""vlmpool.patcher: turn a PEFT LoRA/DoRA adapter into a vLLM-ready version, published atomically.

Light at import (torch and safetensors are imported inside the functions that need them).
See docs/patcher.md.
"""

from vlmpool.patcher.api import (
    failure_summary,
    fit_summary,
    patch_and_publish,
    success_summary,
    write_termination_message,
)
from vlmpool.patcher.errors import REASONS, PatchError
from vlmpool.patcher.families import DEFAULT_KEY_TEMPLATE, FAMILIES, SUPPORTED_MODULES
from vlmpool.patcher.fetch import FetchedAdapter, fetch_adapter
from vlmpool.patcher.pipeline import (
    PatchedAdapter,
    PatchOptions,
    base_check,
    config_json,
    normalize_base_model_reference,
    patch_adapter,
)
from vlmpool.patcher.publish import STEPS, Published, clean_leftovers, current_version, publish

__all__ = [
    "DEFAULT_KEY_TEMPLATE", "FAMILIES", "REASONS", "STEPS", "SUPPORTED_MODULES",
    "FetchedAdapter", "PatchError", "PatchOptions", "PatchedAdapter", "Published",
    "base_check", "clean_leftovers", "config_json", "current_version", "failure_summary", "fetch_adapter",
    "fit_summary", "normalize_base_model_reference", "patch_adapter", "patch_and_publish", "publish",
    "success_summary", "write_termination_message",
]
