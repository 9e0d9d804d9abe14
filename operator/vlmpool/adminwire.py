"""The admin API's wire format: the desired state the operator pushes to every pod's proxy
(``PUT /admin/v1/state``): ONE set of typed models, the only place that format is declared.

The operator builds its pushes from these models (manifests/adapter.py ``desired_entry`` and
``desired_state``; controller/pushing.py adds the generation and the load parallelism) and the proxy
validates what arrives with them (proxy/admin.py), then converges to it (proxy/converge.py). The proxy's
answer about its progress is ``StateSnapshot``: the proxy writes it (proxy/state.py), the operator reads it
(controller/push.py).

A push's body, as the operator writes it (json.dumps of a dict: the keys in this order)::

    {"generation": 7, "concurrency": 16,
     "adapters": [{"name": "invoices", "version": "<hex digest>", "path": "<adapter root>/.../versions/<digest>"}],
     "load_parallelism": 4}

The module is neutral on purpose, like families.py: it imports nothing from vlmpool, so the operator
(manifests, controller), the patcher (the version's form) and the proxy all import it without one
importing another.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

SERVED_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}")  # fullmatch: no '@', no newline
# The one definition of an adapter version's form: what patcher/publish.py publishes (a content digest in
# hex), what the operator records from a patch Job and pushes, what the proxy loads. fullmatch, never `$`
# (a newline passes).
VERSION_RE = re.compile(r"[0-9a-f]{8,64}")
# an engine LoRA name vlmpool gave: `<served>@<version>` (served names have no '@')
INTERNAL_RE = re.compile(f"{SERVED_NAME_RE.pattern}@{VERSION_RE.pattern}")
MAX_CONCURRENCY = 100_000
MAX_LOAD_PARALLELISM = 64  # also the bound of a pool's spec.engine.loadParallelism (api/pool.py)
# where the adapter volume is mounted in every pod (patch Jobs read-write, the engine read-only): the
# paths pushed in a state lie under it, and the proxy refuses any other (its --adapter-root default)
ADAPTER_ROOT = "/var/lib/vlmpool/adapters"
# the one bound on a pushed state's size: every limit on the push (the entries, the JSON containers,
# the body's bytes) is derived from it, so a state of MAX_ADAPTERS entries of the largest form fits
MAX_ADAPTERS = 10_000
MAX_NAME_CHARS = 253
MAX_VERSION_CHARS = 128  # kept to bound memory; a version not of VERSION_RE is refused per adapter
MAX_PATH_CHARS = 1024  # printable ASCII without quote or backslash (the proxy's guard.confine_path)


class AdapterEntry(BaseModel):
    """One adapter of the state: its served name, the version to serve, that version's directory."""

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

    @classmethod
    def of(cls, name: str, version: str, path: str) -> AdapterEntry:
        """An entry as the operator builds it: not validated here (the proxy validates what it gets,
        and refuses a bad entry alone or the whole state, and says why)."""
        return cls.model_construct(name=name, version=version, path=path)

    def wire(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "path": self.path}

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
    """The whole state, as the proxy validates it."""

    model_config = ConfigDict(extra="forbid")

    generation: Annotated[StrictInt, Field(ge=0, lt=2**63)]  # an int64, as metadata.generation
    concurrency: Annotated[StrictInt, Field(ge=1, le=MAX_CONCURRENCY)]
    # adapter loads at once while converging (the pool's spec.engine.loadParallelism); None: the proxy's flag
    load_parallelism: Annotated[StrictInt, Field(ge=1, le=MAX_LOAD_PARALLELISM)] | None = None
    adapters: list[AdapterEntry] = Field(default_factory=list, max_length=MAX_ADAPTERS)

    @field_validator("adapters")
    @classmethod
    def _unique(cls, v: list[AdapterEntry]) -> list[AdapterEntry]:
        seen: set[str] = set()
        for a in v:
            if a.name in seen:
                raise ValueError(f"adapter name {a.name!r} appears more than once")
            seen.add(a.name)
        return v


class AdapterProgress(BaseModel):
    """One adapter in the proxy's answer: the version it converges to and where that stands
    (pending, loading, loaded, failed with a reason)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: StrictStr
    version: StrictStr
    state: StrictStr
    reason: StrictStr | None = None
    serving_version: StrictStr | None = None  # a failed version's predecessor that keeps serving

    def wire(self) -> dict[str, str]:
        out = {"name": self.name, "version": self.version, "state": self.state}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.serving_version is not None:
            out["serving_version"] = self.serving_version
        return out


class VersionRef(BaseModel):
    """A served name's version (the proxy's `unloading` list: retired, engine unload not yet confirmed)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: StrictStr
    version: StrictStr


class StateSnapshot(BaseModel):
    """The proxy's answer about its state: ``GET /admin/v1/state`` (200), a ``PUT``'s answer (200 converged,
    202 converging) and a refused ``PUT``'s (409: the newer generation it holds). The proxy writes it
    (proxy/state.py ``snapshot``), the operator reads it (controller/push.py). Fields a reader does not know
    are ignored and every field has a default, so an operator and the proxies of an older or newer release
    still understand each other during an upgrade; a field of the wrong type fails the whole answer."""

    model_config = ConfigDict(extra="ignore")

    generation: StrictInt | None = None
    applied: bool = False
    converged_generation: StrictInt | None = None
    # absent from a proxy that answers a PUT only once converged: the answer's status says it
    converged: bool | None = None
    concurrency: StrictInt | None = None
    load_parallelism: StrictInt | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    adapters: list[AdapterProgress] = Field(default_factory=list, max_length=MAX_ADAPTERS)
    # versions no longer routed whose engine unload is not yet confirmed (draining, or the unload call is
    # pending): the operator must not delete their directories yet (vLLM re-reads an evicted adapter's
    # directory while it is registered); None: a proxy that does not report it
    unloading: list[VersionRef] | None = Field(default=None, max_length=MAX_ADAPTERS * 4)

    def wire(self) -> dict[str, Any]:
        return {
            "generation": self.generation, "applied": self.applied, "converged_generation": self.converged_generation,
            "converged": self.converged, "concurrency": self.concurrency, "load_parallelism": self.load_parallelism,
            "counts": dict(self.counts), "adapters": [a.wire() for a in self.adapters],
            "unloading": None if self.unloading is None else [{"name": u.name, "version": u.version}
                                                               for u in self.unloading],
        }


def state_wire(concurrency: int, adapters: Iterable[AdapterEntry]) -> dict[str, Any]:
    """The state as the operator builds it before the push: ``{"concurrency", "adapters"}`` (the push
    puts ``generation`` first and adds ``load_parallelism``, the pool's, last)."""
    return {"concurrency": concurrency, "adapters": [a.wire() for a in adapters]}


def internal_name(served: str, version: str) -> str:
    return f"{served}@{version}"


def max_state_bytes(adapters: int = MAX_ADAPTERS) -> int:
    """The largest body of a state of `adapters` entries as json.dumps writes it (the operator's push):
    names and paths at their longest (their characters are plain: one byte each), versions at their
    longest with every character escaped (``\\uXXXX``: a refused version still fits)."""
    entry = len('{"name": "", "version": "", "path": ""}, ') + MAX_NAME_CHARS + 6 * MAX_VERSION_CHARS + MAX_PATH_CHARS
    head = len('{"generation": , "concurrency": , "load_parallelism": , "adapters": []}') + 3 * 20
    return head + adapters * entry
