"""Typed views of the operator's custom objects: a VLMPool or VLMAdapter as read from the API, with
its spec parsed once.

The operator validates a spec in one place only, ``Pool.parse`` / ``Adapter.parse``, where an object
enters (a kopf handler's body, a get or list of the apiserver); manifest builders and the reconciler
take the views and read ``.spec`` (typed) and ``.obj`` (the raw object: metadata, status,
ownerReferences, and what status writes patch). A spec that fails validation raises pydantic's
ValidationError from ``parse``, which the handlers report as before (docs/architecture.md).

``with_obj`` re-wraps a newer copy of the same object (the answer of a status write) and parses again
only when its spec changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmpool.api.adapter import VLMAdapterSpec
from vlmpool.api.pool import VLMPoolSpec


@dataclass(frozen=True)
class _View:
    obj: dict[str, Any]  # the object as read from the API (apiVersion, kind, metadata, spec, status)

    @property
    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.obj["metadata"]
        return meta

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        return str(self.metadata["namespace"])

    @property
    def uid(self) -> str:
        return str(self.metadata["uid"])

    @property
    def generation(self) -> int | None:
        gen: int | None = self.metadata.get("generation")
        return gen

    @property
    def status(self) -> dict[str, Any]:
        """The object's status ({} when it has none)."""
        st: dict[str, Any] = self.obj.get("status") or {}
        return st

    def _same_spec(self, obj: dict[str, Any]) -> bool:
        return bool((obj.get("spec") or {}) == (self.obj.get("spec") or {}))


@dataclass(frozen=True)
class Pool(_View):
    """A VLMPool and its parsed spec."""

    spec: VLMPoolSpec

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Pool:
        """Validate the pool's spec (raises pydantic.ValidationError)."""
        return cls(obj, VLMPoolSpec.model_validate(obj.get("spec") or {}))

    def with_obj(self, obj: dict[str, Any]) -> Pool:
        """A newer copy of this pool: the parsed spec is reused when the spec is unchanged."""
        return Pool(obj, self.spec) if self._same_spec(obj) else Pool.parse(obj)

    @property
    def served_name(self) -> str:
        """The base model's name as the pool serves it."""
        return self.spec.served_name()


@dataclass(frozen=True)
class Adapter(_View):
    """A VLMAdapter and its parsed spec."""

    spec: VLMAdapterSpec

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Adapter:
        """Validate the adapter's spec (raises pydantic.ValidationError)."""
        return cls(obj, VLMAdapterSpec.model_validate(obj.get("spec") or {}))

    def with_obj(self, obj: dict[str, Any]) -> Adapter:
        """A newer copy of this adapter: the parsed spec is reused when the spec is unchanged."""
        return Adapter(obj, self.spec) if self._same_spec(obj) else Adapter.parse(obj)

    @property
    def served_name(self) -> str:
        """The name the adapter is served under: spec.servedName, else the object's name."""
        return self.spec.served_name or self.name
