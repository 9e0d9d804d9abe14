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
from typing import Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel

from vlmpool.api.adapter import VLMAdapterSpec
from vlmpool.api.pool import VLMPoolSpec

SpecT = TypeVar("SpecT", bound=BaseModel)


@dataclass(frozen=True)
class _View(Generic[SpecT]):
    obj: dict[str, Any]  # the object as read from the API (apiVersion, kind, metadata, spec, status)
    spec: SpecT
    spec_type: ClassVar[type[BaseModel]]

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> Self:
        """Validate the object's spec (raises pydantic.ValidationError)."""
        return cls(obj, cls.spec_type.model_validate(obj.get("spec") or {}))  # type: ignore[arg-type]

    def with_obj(self, obj: dict[str, Any]) -> Self:
        """A newer copy of this object: the parsed spec is reused when the spec is unchanged."""
        if (obj.get("spec") or {}) == (self.obj.get("spec") or {}):
            return type(self)(obj, self.spec)
        return self.parse(obj)

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


@dataclass(frozen=True)
class Pool(_View[VLMPoolSpec]):
    """A VLMPool and its parsed spec."""

    spec_type = VLMPoolSpec

    @property
    def served_name(self) -> str:
        """The base model's name as the pool serves it."""
        return self.spec.served_name()


@dataclass(frozen=True)
class Adapter(_View[VLMAdapterSpec]):
    """A VLMAdapter and its parsed spec."""

    spec_type = VLMAdapterSpec

    @property
    def served_name(self) -> str:
        """The name the adapter is served under: spec.servedName, else the object's name."""
        return self.spec.served_name or self.name
