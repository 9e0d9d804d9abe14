"""The desired state the operator pushes (``PUT /admin/v1/state``), validated before it reaches the
registry: names, versions, paths, an int64 generation, the concurrency and the load parallelism."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# an engine LoRA name vlmpool gave: `<served>@<version>` (served names have no '@')
INTERNAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}@[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_LOAD_PARALLELISM = 64


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    version: StrictStr
    path: Annotated[StrictStr, Field(min_length=1, max_length=4096)]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SERVED_NAME_RE.match(v):
            raise ValueError("must match [A-Za-z0-9][A-Za-z0-9._:/-]* (max 253 chars, no '@')")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not VERSION_RE.match(v):
            raise ValueError("must match [A-Za-z0-9][A-Za-z0-9._-]* (max 128 chars)")
        return v

    @property
    def internal(self) -> str:
        return internal_name(self.name, self.version)


class DesiredState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generation: Annotated[StrictInt, Field(ge=0, lt=2**63)]  # an int64, as metadata.generation
    concurrency: Annotated[StrictInt, Field(ge=1, le=100_000)]
    # adapter loads at once while converging (the pool's spec.engine.loadParallelism); None: the proxy's flag
    load_parallelism: Annotated[StrictInt, Field(ge=1, le=MAX_LOAD_PARALLELISM)] | None = None
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=10_000)

    @field_validator("adapters")
    @classmethod
    def _unique(cls, v: list[AdapterSpec]) -> list[AdapterSpec]:
        seen: set[str] = set()
        for a in v:
            if a.name in seen:
                raise ValueError(f"adapter name {a.name!r} appears more than once")
            seen.add(a.name)
        return v


def internal_name(served: str, version: str) -> str:
    return f"{served}@{version}"
