"""The desired state the operator pushes (``PUT /admin/v1/state``), validated before it reaches the
registry: names, versions, paths, an int64 generation, the concurrency and the load parallelism."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

SERVED_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}")  # fullmatch: no '@', no newline
# The one definition of an adapter version's form: what patcher/publish.py publishes (a content digest in
# hex), what the operator records from a patch Job and pushes, what the proxy loads. fullmatch, never `$`
# (a newline passes).
VERSION_RE = re.compile(r"[0-9a-f]{8,64}")
# an engine LoRA name vlmpool gave: `<served>@<version>` (served names have no '@')
INTERNAL_RE = re.compile(f"{SERVED_NAME_RE.pattern}@{VERSION_RE.pattern}")
MAX_LOAD_PARALLELISM = 64
# the one bound on a pushed state's size: every limit on the push (the entries, the JSON containers,
# the body's bytes) is derived from it, so a state of MAX_ADAPTERS entries of the largest form fits
MAX_ADAPTERS = 10_000
MAX_NAME_CHARS = 253
MAX_VERSION_CHARS = 128  # kept to bound memory; a version not of VERSION_RE is refused per adapter
MAX_PATH_CHARS = 1024  # printable ASCII without quote or backslash (guard.confine_path)


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    version: Annotated[StrictStr, Field(max_length=MAX_VERSION_CHARS)]
    path: Annotated[StrictStr, Field(min_length=1, max_length=MAX_PATH_CHARS)]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SERVED_NAME_RE.fullmatch(v):
            raise ValueError("must match [A-Za-z0-9][A-Za-z0-9._:/-]* (max 253 chars, no '@')")
        return v

    def version_problem(self) -> str | None:
        """Why this entry's version is refused (the adapter alone is refused, the others converge)."""
        if VERSION_RE.fullmatch(self.version):
            return None
        return (f"invalid_version: version {self.version[:80]!r} is not of the form the patcher publishes "
                f"({VERSION_RE.pattern})")

    @property
    def internal(self) -> str:
        return internal_name(self.name, self.version)


class DesiredState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generation: Annotated[StrictInt, Field(ge=0, lt=2**63)]  # an int64, as metadata.generation
    concurrency: Annotated[StrictInt, Field(ge=1, le=100_000)]
    # adapter loads at once while converging (the pool's spec.engine.loadParallelism); None: the proxy's flag
    load_parallelism: Annotated[StrictInt, Field(ge=1, le=MAX_LOAD_PARALLELISM)] | None = None
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=MAX_ADAPTERS)

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


def max_state_bytes(adapters: int = MAX_ADAPTERS) -> int:
    """The largest body of a state of `adapters` entries as json.dumps writes it (the operator's push):
    names and paths at their longest (their characters are plain: one byte each), versions at their
    longest with every character escaped (``\\uXXXX``: a refused version still fits)."""
    entry = len('{"name": "", "version": "", "path": ""}, ') + MAX_NAME_CHARS + 6 * MAX_VERSION_CHARS + MAX_PATH_CHARS
    head = len('{"generation": , "concurrency": , "load_parallelism": , "adapters": []}') + 3 * 20
    return head + adapters * entry
