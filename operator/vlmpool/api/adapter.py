"""VLMAdapter: one LoRA/DoRA fine-tune served on one VLMPool.

A patch Job turns the adapter's files into a vLLM-ready version on the pool's adapter volume; the
operator then pushes it to every pod of the pool, where it is served as `servedName`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.config import JsonValue

from vlmpool.api.common import MODEL_ID_PATTERN, Condition, LocalObjectReference, Model
from vlmpool.patcher.options import BaseCheck, DoraPolicy
from vlmpool.patcher.sources import registry as sources
from vlmpool.patcher.summary import PatchSummary

Phase = Literal["Pending", "Patching", "Registering", "Ready", "Failed", "Deleting"]
# CEL rules on the source: each scheme's own shape (vlmpool.patcher.sources declares them).
SOURCE_RULES: list[JsonValue] = sources.cel_rules()

DORA_RULES: list[JsonValue] = [
    {
        "rule": "self.policy != 'svd' || has(self.rank)",
        "message": "dora.rank is required when dora.policy is svd",
        "fieldPath": ".rank",
        "reason": "FieldValueRequired",
    },
    {
        "rule": "self.policy == 'svd' || !has(self.rank)",
        "message": "dora.rank is only allowed when dora.policy is svd",
        "fieldPath": ".rank",
        "reason": "FieldValueForbidden",
    },
]

SPEC_RULES: list[JsonValue] = [
    {
        "rule": "self.poolRef.name == oldSelf.poolRef.name",
        "message": "poolRef is immutable: delete the adapter and create it on the other pool",
        "fieldPath": ".poolRef.name",
        "reason": "FieldValueInvalid",
    },
]


class AdapterSource(Model):
    """Where the adapter's files are. Only adapter files are fetched, never base weights."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": SOURCE_RULES})

    uri: str = Field(
        description=sources.uri_forms() + ".",
        min_length=8, max_length=2048,
        pattern=sources.uri_pattern(),
    )
    sha256: str | None = Field(
        default=None,
        description="Pin: lower-case hex SHA-256 of the fetched archive (or, for a directory source, of "
        "adapter_model.safetensors). A mismatch fails the adapter.",
        pattern=r"^[a-f0-9]{64}$",
    )
    credentials_secret: LocalObjectReference | None = Field(
        default=None,
        description="Secret with credentials for the source: HF_TOKEN, AWS_ACCESS_KEY_ID/"
        "AWS_SECRET_ACCESS_KEY/AWS_ENDPOINT_URL, or AUTHORIZATION (an HTTP Authorization header).",
    )


class DoraSpec(Model):
    """What to do with a DoRA adapter (use_dora: true), which vLLM cannot serve as such."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": DORA_RULES})

    policy: DoraPolicy = Field(
        default="reject",
        description="reject: fail the adapter. strip: drop the magnitude vectors (an approximation; the "
        "report gives its measured error when base weights are at hand). svd: merge exactly with the base "
        "weights and re-factor the delta to `rank` by truncated SVD (needs spec.model.weights on the pool).",
    )
    rank: int | None = Field(default=None, ge=1, le=512,
                             description="Rank of the LoRA made by the svd policy (at most the pool's maxLoraRank).")
    max_error: float | None = Field(
        default=None, ge=0, le=1000,
        description="Admission bound of strip/svd: the worst module's measured relative error (Frobenius norm of "
        "the served delta's difference over the trained delta's, the report's dora.error) above it is refused "
        "(DoraErrorTooHigh, nothing published); an unmeasured one (no base weights) is refused too "
        "(DoraErrorNotMeasured). Unset: no bound.")


class VLMAdapterSpec(Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": SPEC_RULES})

    pool_ref: LocalObjectReference = Field(description="The VLMPool (same namespace) that serves this adapter.")
    served_name: str | None = Field(
        default=None,
        description="The name clients send as `model` to use this adapter. Defaults to metadata.name. "
        "Letters, digits and . _ - / only; no '@'.",
        pattern=MODEL_ID_PATTERN,
    )
    source: AdapterSource = Field(description="Where the adapter files are.")
    dora: DoraSpec = Field(default_factory=DoraSpec, description="DoRA handling.")
    base_model_check: BaseCheck = Field(
        default="strict",
        description="How to treat an adapter whose adapter_config.json declares another base model than "
        "the pool's: strict fails it, warn records a warning and serves it.",
    )
    declared_base: str | None = Field(
        default=None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$",
        description="Advisory: what a model registry says the adapter's base is (e.g. qwen2-vl-2b-instruct-peft; "
        "a trailing -peft is ignored). Recorded in status.report.declaredVariantCheck as match or mismatch "
        "against adapter_config.json (the authority), never a refusal.",
    )


class PodLoad(Model):
    """Push result of one pod."""

    pod: str = Field(description="Pod name.")
    state: Literal["loaded", "failed", "pending", "loading"] = Field(
        description="Whether the pod serves the wanted version: loaded, failed, loading (the engine call runs) or "
        "pending (queued on the proxy, or not pushed yet).")
    version: str | None = Field(default=None, description="Version the pod serves.")
    message: str | None = Field(default=None, description="Failure reason.", max_length=2048)


class VLMAdapterStatus(Model):
    observed_generation: int | None = Field(default=None, ge=0, description="Last metadata.generation acted on.")
    phase: Phase | None = Field(default=None, description="Pending, Patching, Registering, Ready, Failed, Deleting.")
    reason: str | None = Field(default=None,
                               description="CamelCase reason of the phase (see the README's troubleshooting).")
    message: str | None = Field(default=None, description="Why the adapter is in its phase.", max_length=32768)
    served_name: str | None = Field(default=None, description="Name clients use.")
    spec_digest: str | None = Field(default=None, description="Digest of the patch inputs of the current Job.")
    version: str | None = Field(default=None, description="Content digest of the version served.")
    path: str | None = Field(default=None, description="Directory of that version on the adapter volume.")
    loaded: str | None = Field(default=None, description="n/m: pods serving the version / pods of the pool.")
    loaded_pods: int | None = Field(default=None, ge=0, description="Pods serving the version.")
    desired_pods: int | None = Field(default=None, ge=0, description="Running pods of the pool.")
    pods: list[PodLoad] = Field(default_factory=list, description="Per-pod push results.")
    last_job: str | None = Field(default=None, description="Name of the last patch Job.")
    report: PatchSummary | None = Field(default=None, description="Summary of the patch report.")
    conditions: list[Condition] = Field(default_factory=list, description="Patched, Loaded and Ready conditions.")
