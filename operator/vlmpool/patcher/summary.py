"""The patch summary: the one layout of what a patch Job reports back. The patcher builds it
(report.build_summary) and writes it camelCase into its JSON summary (api.success_summary); the
operator reads it back from the Job's termination message (PatchSummary.from_message); the
VLMAdapter CRD carries it as status.report (api/adapter.py)."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

TEXT_MAX = 1024      # characters of a string field the operator copies into status
WARNINGS_MAX = 50    # warnings the operator copies into status


class PatchSummary(BaseModel):
    """The patch Job's report, as copied into status (the full report is patch_report.json)."""

    # As vlmpool.api.common.Model (camelCase on the wire, unknown fields refused): the CRD renders it.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    tensors_kept: int | None = Field(default=None, ge=0, description="LoRA tensors in the served version.")
    tensors_remapped: int | None = Field(default=None, ge=0, description="Tensors whose key was rewritten.")
    tensors_dropped: int | None = Field(default=None, ge=0,
                                        description="Tensors dropped (vision tower, DoRA magnitudes).")
    rank: int | None = Field(default=None, ge=0, description="Rank of the served LoRA.")
    dora_policy: str | None = Field(default=None, description="DoRA policy applied, or none.")
    dora_error: float | None = Field(default=None, description="Measured relative error of strip/svd, when measured.")
    declared_base: str | None = Field(default=None, description="base_model_name_or_path of adapter_config.json.")
    pool_base: str | None = Field(default=None, description="The pool's base model.")
    base_check: str | None = Field(default=None, description="match, mismatch-warned or skipped.")
    declared_variant: str | None = Field(default=None, description="spec.declaredBase as the patch Job saw it.")
    declared_variant_check: Literal["match", "mismatch"] | None = Field(
        default=None, description="spec.declaredBase against adapter_config.json's base (else the pool's): "
        "advisory, never a refusal; mismatch means the registry record is wrong.")
    warnings: list[str] = Field(default_factory=list, description="Warnings recorded by the patch.")

    def to_message(self) -> dict[str, Any]:
        """The camelCase fields of the patcher's JSON summary (every field, unset ones as null)."""
        return self.model_dump(by_alias=True, mode="json")

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> dict[str, Any]:
        """The summary fields of a patcher's success message as status.report takes them: each field of
        its type or dropped (no coercion: a rank "8" is no int), strings and warnings bounded."""
        out: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            key = field.alias or name
            v = msg.get(key)
            kind = _kind(field.annotation)
            if kind is list:
                if isinstance(v, list):
                    out[key] = [str(w)[:TEXT_MAX] for w in v[:WARNINGS_MAX]]
            elif v is None or isinstance(v, bool):
                continue
            elif kind is float and isinstance(v, (int, float)):
                out[key] = float(v)
            elif kind is int and isinstance(v, int) and v >= 0:
                out[key] = v
            elif kind is str and isinstance(v, str):
                out[key] = v[:TEXT_MAX]
        return out


def _kind(annotation: Any) -> type:
    """int, float, str or list: the wire type of a field's annotation (optional or a string literal)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    if typing.get_origin(annotation) is Literal:
        return str
    return typing.get_origin(annotation) or annotation
