"""Types shared by the VLMPool and VLMAdapter models.

Every field carries a description: the CRD generator copies it into the OpenAPI schema, so
`kubectl explain vlmpool.spec...` documents the resource from the same text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# A model id as OpenAI-compatible clients send it in `model`: letters, digits and . _ - / only,
# starting with a letter or digit, at most 128 characters. '@' is excluded on purpose: the proxy
# names the engine's LoRA `<servedName>@<version>`, so '@' in a served name would be ambiguous.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
# A Kubernetes object name (RFC 1123 subdomain).
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A resource quantity such as 10Gi, 500m or 2.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"

Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]


class Model(BaseModel):
    """Base for every API model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class LocalObjectReference(Model):
    name: str = Field(
        description="Name of the object in the same namespace.",
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
    )


class ResourceRequirements(Model):
    """Container resources, as in core/v1 ResourceRequirements."""

    requests: dict[str, Quantity] | None = Field(
        default=None, description="Minimum resources, e.g. {cpu: 500m, memory: 1Gi}."
    )
    limits: dict[str, Quantity] | None = Field(
        default=None, description="Maximum resources, e.g. {memory: 2Gi}."
    )


class EnvVar(Model):
    name: str = Field(description="Environment variable name.", min_length=1, max_length=256,
                      pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str = Field(default="", description="Its value.")


class Toleration(Model):
    """A core/v1 Toleration."""

    key: str | None = Field(default=None, description="Taint key the toleration applies to; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(description="Condition type, e.g. Ready.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="Machine-readable CamelCase reason for the last transition.",
                        max_length=1024)
    message: str = Field(default="", description="Human-readable details.", max_length=32768)
    last_transition_time: str | None = Field(default=None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from.", ge=0
    )
