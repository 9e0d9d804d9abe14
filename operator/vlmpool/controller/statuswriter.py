"""The one writer of the pools' and adapters' status.

A change is typed: its fields are the status model itself (api/adapter.py VLMAdapterStatus,
api/pool.py VLMPoolStatus) with only the changed fields set, so a misspelled or mistyped field is a
pydantic error (and a mypy error) where the change is made, never a key the apiserver silently
prunes; its conditions are ``(type, status, reason, message)`` tuples, each type written by exactly
one part (CONDITION_OWNERS). Every part gets its own handle (``StatusWriter.owned_by``): the handle
refuses a condition its part does not own, and the fields the writer derives.

What the writer derives itself, the same way for every writer:
- the adapter's phase, reason and message, and its ``Ready`` condition, from its conditions;
- a recorded version is not loaded anywhere yet: a change that records ``version`` sets ``Loaded``
  Unknown (Registering) in the same write; the load results after a push are the pusher's.

Conditions (a whole list) and the derived phase are a read-modify-write: such writes carry the
object's resourceVersion and are redone on a conflict, so concurrent writers never undo each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from vlmpool.api.adapter import VLMAdapterStatus
from vlmpool.api.pool import VLMPoolStatus
from vlmpool.controller import status as S
from vlmpool.controller.common import Events, RetryLater
from vlmpool.controller.decisions import CPU_CACHE_CONDITION, Cond
from vlmpool.kube.client import VLMADAPTERS, VLMPOOLS, Conflict, KubeClient, NotFound, Resource

log = logging.getLogger("vlmpool.operator")

# The parts that write status (controller/reconciler.py builds them, each with its own handle).
POOLS = "pool controller"  # controller/pool.py
ADAPTERS = "adapter controller"  # controller/adapter.py
PUSHER = "pusher"  # controller/pushing.py
HEALTH = "pool health"  # controller/health.py
DELETER = "deleter"  # controller/deletion.py (writes no condition: the phase Deleting is derived)
WRITER = "status writer"  # derived by the writer itself, never written by a part
PARTS = (POOLS, ADAPTERS, PUSHER, HEALTH, DELETER)

# Which part writes each condition type, by kind. A type not listed is refused (a misspelling too).
CONDITION_OWNERS: dict[str, dict[str, str]] = {
    "VLMAdapter": {
        "PoolFound": ADAPTERS,
        "Patched": ADAPTERS,
        "Loaded": PUSHER,  # reset to Unknown by the writer when a version is recorded
        "Ready": WRITER,
    },
    "VLMPool": {
        "Ready": POOLS,
        "Progressing": POOLS,
        "Stalled": POOLS,
        "Degraded": HEALTH,
        CPU_CACHE_CONDITION: PUSHER,
    },
}

MODELS: dict[str, type[VLMAdapterStatus] | type[VLMPoolStatus]] = {"VLMAdapter": VLMAdapterStatus,
                                                                   "VLMPool": VLMPoolStatus}
# Fields the writer derives (an adapter's phase from its conditions); conditions go as conditions.
DERIVED_FIELDS = {"VLMAdapter": {"phase", "reason", "message", "conditions"}, "VLMPool": {"conditions"}}
CONDITION_STATUSES = ("True", "False", "Unknown")
REGISTERING: Cond = ("Loaded", "Unknown", "Registering", "pushing the version to the pool's pods")


class StatusRefused(ValueError):
    """A change the writer does not make: a condition of another part, an unknown condition type, a
    derived field. A programming error, raised where the change is made."""


def _wire(kind: str, fields: VLMAdapterStatus | VLMPoolStatus | None) -> dict[str, Any]:
    """The fields the change sets, as the apiserver stores them (camelCase; what was not set is left out).
    Validated again here: a change is the kind's status model, and one altered after it was made
    (pydantic does not validate an assignment) is refused like one made wrong."""
    if fields is None:
        return {}
    model = MODELS[kind]
    if not isinstance(fields, model):
        raise StatusRefused(f"a {kind} status change is a {model.__name__}, not {type(fields).__name__}")
    derived = DERIVED_FIELDS[kind] & fields.model_fields_set
    if derived:
        raise StatusRefused(f"{kind} status fields {sorted(derived)} are not written directly")
    wire = fields.model_dump(by_alias=True, exclude_unset=True, mode="json")
    model.model_validate(wire)
    return wire


def _check_conditions(kind: str, owner: str, conds: Sequence[Cond]) -> None:
    owners = CONDITION_OWNERS[kind]
    for ctype, cstat, _reason, _message in conds:
        if ctype not in owners:
            raise StatusRefused(f"{kind} has no condition {ctype!r} (known: {', '.join(owners)})")
        if owners[ctype] != owner:
            raise StatusRefused(f"the {kind} condition {ctype} is the {owners[ctype]}'s, not the {owner}'s")
        if cstat not in CONDITION_STATUSES:
            raise StatusRefused(f"condition {ctype}: status {cstat!r} is not one of {CONDITION_STATUSES}")


class StatusWriter:
    """Writes the status of pools and adapters (through the handles of owned_by)."""

    def __init__(self, kube: KubeClient, events: Events):
        self.kube = kube
        self.events = events

    def owned_by(self, owner: str) -> OwnedStatus:
        """The handle of one part: it writes the conditions CONDITION_OWNERS gives that part."""
        return OwnedStatus(self, owner)

    async def write_pool(self, pool: dict[str, Any], fields: dict[str, Any], conds: Sequence[Cond]) -> dict[str, Any]:
        """Set fields and conditions on the pool's current status with an optimistic lock."""
        return await self._write(VLMPOOLS, pool, fields, conds)

    async def write_adapter(self, adapter: dict[str, Any], fields: dict[str, Any], conds: Sequence[Cond],
                            only_if: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Set `fields` and the conditions on the adapter's current status, recompute the phase, and
        patch with an optimistic lock (re-read and redo on a conflict). Posts an Event when the phase
        changes. `only_if(status)` may veto the write after a re-read."""
        return await self._write(VLMADAPTERS, adapter, fields, conds, only_if, phase=True)

    async def _write(self, res: Resource, obj: dict[str, Any], fields: dict[str, Any], conds: Sequence[Cond],
                     only_if: Callable[[dict[str, Any]], bool] | None = None, phase: bool = False) -> dict[str, Any]:
        """The one write loop: apply `fields` and `conds` to the object's current status (and, with
        `phase`, recompute the phase and post an Event when it changes), patch only what differs under the
        object's resourceVersion, re-read and redo on a conflict (8 tries), then RetryLater."""
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        for attempt in range(8):
            if attempt:
                fresh = await self.kube.get_or_none(res, name, ns)
                if fresh is None:
                    return obj
                obj, meta = fresh, fresh["metadata"]
            cur = obj.get("status") or {}
            if only_if is not None and not only_if(cur):
                return obj
            gen = meta.get("generation")
            new = dict(cur)
            new.update(fields)
            for ctype, cstat, reason, message in conds:
                new["conditions"] = S.set_condition(new.get("conditions"), ctype, cstat, reason, message, gen)
            if phase:
                new = S.with_phase(new, gen, bool(meta.get("deletionTimestamp")))
            diff = {k: v for k, v in new.items() if cur.get(k) != v}
            if not diff:
                return obj
            try:
                out = await self.kube.patch(res, name, {"metadata": {"resourceVersion": meta["resourceVersion"]},
                                                        "status": diff}, ns, subresource="status")
            except NotFound:
                return obj
            except Conflict:
                continue
            if phase and cur.get("phase") != new["phase"]:
                type_ = "Warning" if new["phase"] == "Failed" else "Normal"
                self.events(out, type_, new["phase"] if new["phase"] != "Failed" else new["reason"], new["message"])
            return out
        raise RetryLater(f"status of {ns}/{name} kept changing under the operator", delay=1)


class OwnedStatus:
    """One part's handle on the status writer: typed changes, only the conditions the part owns."""

    def __init__(self, writer: StatusWriter, owner: str):
        if owner not in PARTS:
            raise StatusRefused(f"{owner!r} is no part that writes status")
        self.writer = writer
        self.owner = owner

    async def adapter(self, adapter: dict[str, Any], fields: VLMAdapterStatus | None = None,
                      conds: Sequence[Cond] = (),
                      only_if: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Write the change (`fields`, `conds`) on the adapter's status; the phase follows. Returns the
        adapter as written (or as last read, when nothing changed or `only_if` vetoed)."""
        wire = _wire("VLMAdapter", fields)
        _check_conditions("VLMAdapter", self.owner, conds)
        if "version" in wire:
            conds = [*conds, REGISTERING]
        return await self.writer.write_adapter(adapter, wire, conds, only_if)

    async def pool(self, pool: dict[str, Any], fields: VLMPoolStatus | None = None,
                   conds: Sequence[Cond] = ()) -> dict[str, Any]:
        """Write the change on the pool's status (read-modify-write with an optimistic lock)."""
        wire = _wire("VLMPool", fields)
        _check_conditions("VLMPool", self.owner, conds)
        return await self.writer.write_pool(pool, wire, conds)

    async def pool_fields(self, ns: str, name: str, fields: VLMPoolStatus) -> None:
        """Merge fields into the pool's status without reading it first (no condition, nothing derived:
        a merge patch of fields one part owns needs no lock). Raises NotFound when the pool is gone."""
        await self.writer.kube.patch_status(VLMPOOLS, name, _wire("VLMPool", fields), ns)
