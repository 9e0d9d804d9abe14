"""The pool's health: the one writer of its ``Degraded`` condition, from the outcomes of the pool's
reconcile (the children applied, a child held by another owner, a failed reconcile) and of the pushes
of its state to the pods (some pod did not take it, every pod took it again)."""

from __future__ import annotations

from typing import Any

from vlmpool.api.pool import VLMPoolStatus
from vlmpool.controller import children as C
from vlmpool.controller import decisions as D
from vlmpool.controller import status as S
from vlmpool.controller.common import Events, RetryLater
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.controller.statuswriter import OwnedStatus
from vlmpool.kube.client import ApiError

PUSH_FAILED = "PushFailed"


class PoolHealth:
    def __init__(self, status: OwnedStatus, events: Events, metrics: OperatorMetrics):
        self.status = status
        self.events = events
        self.metrics = metrics

    async def reconciled(self, pool: dict[str, Any], fields: VLMPoolStatus) -> dict[str, Any]:
        """The children are applied: Degraded False, in one write with the reconcile's `fields`."""
        return await self.status.pool(pool, fields, [("Degraded", "False", "Reconciled", "children applied")])

    async def child_conflict(self, pool: dict[str, Any], err: C.ChildConflict) -> None:
        """Degraded True, reason ChildConflict, naming the objects; a Warning Event when that is news
        (the reconcile is retried every resync until the objects are gone or the pool renamed)."""
        before = S.get_condition((pool.get("status") or {}).get("conditions") or [], "Degraded") or {}
        self.metrics.errors.labels("pool", C.REASON).inc()
        await self.status.pool(pool, None, [("Degraded", "True", C.REASON, str(err))])
        if before.get("reason") != C.REASON or before.get("message") != str(err):
            self.events(pool, "Warning", C.REASON, str(err))

    async def reconcile_failed(self, pool: dict[str, Any], err: Exception) -> None:
        """Report a failed reconcile on the pool (the raw object: its spec may be what failed)."""
        reason = D.failure_reason(err)
        self.metrics.errors.labels("pool", reason).inc()
        try:
            await self.status.pool(pool, None, [("Degraded", "True", reason, str(err))])
        except (ApiError, RetryLater):
            pass
        self.events(pool, "Warning", "ReconcileFailed", str(err))

    async def push_failed(self, pool: dict[str, Any], failed: int, pods: int, message: str) -> None:
        await self.status.pool(pool, None, [(
            "Degraded", "True", PUSH_FAILED, f"{failed}/{pods} pods did not take the state: {message}")])

    async def push_succeeded(self, pool: dict[str, Any], generation: int) -> None:
        """Every running pod took the state: a Degraded of a failed push is over (another stays)."""
        degraded = S.get_condition((pool.get("status") or {}).get("conditions") or [], "Degraded")
        if degraded and degraded.get("reason") == PUSH_FAILED:
            await self.status.pool(pool, None, [("Degraded", "False", "PushSucceeded",
                                                 f"every running pod took generation {generation}")])
