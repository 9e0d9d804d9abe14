"""What the operator does, independent of kopf's wiring (see operator.py for the handlers).

Pools: server-side apply of the children, status from the Deployment.
Adapters: one patch Job per spec digest (deterministic name, create-if-absent), its termination
message into status, then a push of the pool's state; on delete: push without the adapter, verify
every pod dropped it, run the cleanup Job, then let the finalizer go.
"""

from __future__ import annotations

import asyncio

import aiohttp

from vlmpool.controller.adapter import AdapterReconciler
from vlmpool.controller.common import (
    SOURCE_NOT_ALLOWED,
    EventFn,
    OperatorConfig,
    RetryLater,
    pool_token,
)
from vlmpool.controller.deletion import DeletionReconciler
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.controller.pool import PoolReconciler
from vlmpool.controller.pushing import PushReconciler, PushSummary, _PoolPush
from vlmpool.kube.client import KubeClient

__all__ = ["SOURCE_NOT_ALLOWED", "EventFn", "OperatorConfig", "PushSummary", "Reconciler", "RetryLater",
           "pool_token"]


class Reconciler(PoolReconciler, AdapterReconciler, DeletionReconciler, PushReconciler):
    """The operator's reconciler: pool.py, adapter.py, deletion.py and pushing.py in one object."""

    def __init__(self, kube: KubeClient, config: OperatorConfig | None = None,
                 metrics: OperatorMetrics | None = None, event: EventFn | None = None):
        self.kube = kube
        self.config = config or OperatorConfig()
        self.metrics = metrics or OperatorMetrics()
        self._event = event or (lambda body, type_, reason, message: None)
        self._pushes: dict[tuple[str, str], _PoolPush] = {}
        self._pushed: dict[tuple[str, str], str] = {}  # (ns, pod) -> fingerprint last pushed OK
        self._pod_ok: dict[tuple[str, str], bool] = {}  # (ns, pod) -> last push succeeded (for events)
        self._stalled: set[tuple[str, str]] = set()  # (ns, pool) whose Stalled condition is True
        self._http: aiohttp.ClientSession | None = None
        self._gate_lock = asyncio.Lock()  # patch Job admissions (jobgate.py)
        self._patch_queue: dict[tuple[str, str], tuple[str, str, str]] = {}
        self._patch_namespaces: set[str] = set()
        self._admit_task: asyncio.Task | None = None
        self._admitting = False
        self._admit_again = False
        self._scanned: dict[str, str] = {}
        self._reserved: dict[tuple[str, str], str] = {}

    async def close(self) -> None:
        for st in self._pushes.values():
            for task in (st.retry_task, st.follow_task):
                if task is not None and not task.done():
                    task.cancel()
        if self._admit_task is not None and not self._admit_task.done():
            self._admit_task.cancel()
        if self._http is not None:
            await self._http.close()

