"""Every option of `vlmpool patch`, declared once: its flag, type, choices, default and help.

The CLI (patcher/cli.py) adds these flags; PatchOptions and patch_and_publish take their defaults from
here; the operator's patch Job (manifests/adapter.py patch_args) names its arguments through `argv`,
which knows only the flags declared here. The DoRA policies and base checks are declared here too, for
the patcher and the VLMAdapter CRD alike.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from vlmpool.families import VLM_FAMILIES
from vlmpool.patcher.dora import SVD_METHODS
from vlmpool.patcher.families import DEFAULT_KEY_TEMPLATE
from vlmpool.patcher.sources import registry as sources
from vlmpool.patcher.sources.scheme import SOURCES_ROOT

DoraPolicy = Literal["reject", "strip", "svd"]
DORA_POLICIES: tuple[str, ...] = get_args(DoraPolicy)
# The policies that do DoRA maths: they use the base weights (svd needs them, strip measures its error
# with them), take --dora-max-error, and need the torch image.
DORA_MATHS_POLICIES: tuple[str, ...] = ("strip", "svd")
BaseCheck = Literal["strict", "warn"]
BASE_CHECKS: tuple[str, ...] = get_args(BaseCheck)
TENSOR_IO = ("bytes", "torch")

DEFAULT_MAX_FILE_BYTES = 4 * 1024**3
DEFAULT_FETCH_TIMEOUT = 1800.0  # seconds for a whole remote fetch (the operator passes half the Job's deadline)
DEFAULT_LOCK_TIMEOUT = 600.0


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} must be >= 1")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{s!r} must be a positive number")
    return v


@dataclass(frozen=True)
class Option:
    """One option of `vlmpool patch`: `dest` is also its PatchOptions field or patch_and_publish argument."""

    dest: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a flag without a value (store_true)

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.switch:
            parser.add_argument(self.flag, action="store_true", help=self.help)
            return
        kwargs: dict[str, Any] = {"default": self.default, "help": self.help}
        if self.type is not None:
            kwargs["type"] = self.type
        if self.choices is not None:
            kwargs["choices"] = self.choices
        parser.add_argument(self.flag, **kwargs)


OPTIONS: tuple[Option, ...] = (
    Option("source", f"adapter source: a local path, {sources.uri_forms()}"),
    Option("adapter", "adapter name (the VLMAdapter's metadata.name)"),
    Option("root", "the adapter volume's mount path", type=Path),
    Option("pool_base", "the pool's base model id (e.g. Qwen/Qwen2-VL-2B-Instruct)"),
    Option("family", "the pool's model family", choices=VLM_FAMILIES),
    Option("served_base", "the pool's served model name (also accepted by the base check)"),
    Option("max_rank", "the pool's max LoRA rank (default 64)", 64, positive_int),
    Option("dora_policy", "what to do with a DoRA adapter (default reject)", "reject", choices=DORA_POLICIES),
    Option("svd_rank", "rank of the LoRA made by --dora-policy svd (default min(r, --max-rank))",
           type=positive_int),
    Option("dora_max_error", "refuse (DoraErrorTooHigh) a strip/svd whose measured relative error is above this; "
           "an unmeasured one is refused too (DoraErrorNotMeasured)", type=float),
    Option("base_weights", "directory of the base model's *.safetensors (needed by svd; lets strip measure its "
           "error)", type=Path),
    Option("base_check", "base_model_name_or_path vs the pool's base: strict fails, warn records (default strict)",
           "strict", choices=BASE_CHECKS),
    Option("sha256", "pin: sha256 of the archive, or of adapter_model.safetensors"),
    Option("max_file_bytes", f"largest file accepted (default {DEFAULT_MAX_FILE_BYTES})", DEFAULT_MAX_FILE_BYTES,
           positive_int),
    Option("fetch_timeout", "seconds a remote (https, hf, s3) fetch may take in all, however slowly its bytes "
           f"arrive; then FetchTimeout (default {DEFAULT_FETCH_TIMEOUT:g})", DEFAULT_FETCH_TIMEOUT, positive_float),
    Option("declared_variant", "base variant a registry declares (advisory: a disagreement with the file is a "
           "warning)"),
    Option("pvc_root", f"where pvc://<claim>/ sources are mounted, as <pvc-root>/<claim> (default {SOURCES_ROOT})",
           Path(SOURCES_ROOT), Path),
    Option("vision_norm_threshold", "refuse when a dropped vision-tower lora_B has a norm above this (default 0.0)",
           0.0, float),
    Option("key_template", f"output key of a language-layer tensor (default {DEFAULT_KEY_TEMPLATE})",
           DEFAULT_KEY_TEMPLATE),
    Option("svd_method", "truncated SVD of --dora-policy svd: exact, randomized (seeded), or auto (exact on a GPU "
           "or for small matrices, randomized otherwise)", "auto", choices=SVD_METHODS),
    Option("tower_connector_lora", "the pool's vLLM runs with --enable-tower-connector-lora: keep the LoRA tensors "
           "of the vision tower and connector modules vLLM serves for the family (default: drop untrained ones, "
           "refuse trained ones)", False, switch=True),
    Option("device", "torch device for the DoRA math (default: cuda when available)"),
    Option("tensor_io", "how the adapter's tensors are read and written: bytes (the safetensors header and byte "
           "ranges, no torch unless DoRA maths is needed; default) or torch (load_file/save; same output, kept to "
           "compare with)", "bytes", choices=TENSOR_IO),
    Option("lock_timeout", "seconds to wait for the publish lock", DEFAULT_LOCK_TIMEOUT, float),
    Option("termination_log", "file for the JSON summary (default /dev/termination-log when it exists)"),
)
BY_DEST: dict[str, Option] = {o.dest: o for o in OPTIONS}
DEFAULTS: dict[str, Any] = {o.dest: o.default for o in OPTIONS}
# Options of the patch itself without which it does not run (not argparse-required, so that
# `vlmpool patch prune …` parses).
REQUIRED = ("source", "adapter", "root", "pool_base", "family")


def flag(dest: str) -> str:
    """The flag of a declared option (KeyError for any other)."""
    return BY_DEST[dest].flag


def argv(values: Iterable[tuple[str, str | bool]]) -> list[str]:
    """Command-line arguments for (option, value) pairs, in their order: a switch is given when True."""
    out: list[str] = []
    for dest, value in values:
        if BY_DEST[dest].switch:
            out += [flag(dest)] if value is True else []
        else:
            out += [flag(dest), str(value)]
    return out
