"""What the operator does, independent of kopf's wiring (see operator.py for the handlers): the
controller's named parts, each built here with the parts it depends on.

    StatusWriter      the one writer of status; each part below gets its own handle (statuswriter.py)
    PoolHealth        the pool's Degraded condition (health.py)
    PatchJobGate      the bound on patch Jobs alive, and the adapters in line (jobgate.py)
    Pusher            the pools' state to their pods; Loaded, load counts (pushing.py)
    AdapterController patch Jobs and their results; admission of the adapters in line (adapter.py)
    PoolController    the pool's children, its status from the Deployment (pool.py)
    AdapterDeleter    unload, stop the patch Jobs, clean up, then let the finalizer go (deletion.py)

Pools: server-side apply of the children, status from the Deployment. Adapters: one patch Job per
spec digest (deterministic name, create-if-absent), its termination message into status, then a push
of the pool's state; on delete: push without the adapter, verify every pod dropped it, run the cleanup
Job, then let the finalizer go.
"""

from __future__ import annotations

from vlmpool.controller import statuswriter as W
from vlmpool.controller.adapter import AdapterController
from vlmpool.controller.common import (
    SOURCE_NOT_ALLOWED,
    EventFn,
    Events,
    OperatorConfig,
    RetryLater,
    pool_token,
)
from vlmpool.controller.deletion import AdapterDeleter
from vlmpool.controller.health import PoolHealth
from vlmpool.controller.jobgate import PatchJobGate
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.controller.pool import PoolController
from vlmpool.controller.pushing import Pusher, PushSummary
from vlmpool.kube.client import KubeClient

__all__ = ["SOURCE_NOT_ALLOWED", "Controller", "EventFn", "OperatorConfig", "PushSummary", "RetryLater",
           "pool_token"]


class Controller:
    """The operator's parts, assembled: the kopf handlers call their methods by name."""

    def __init__(self, kube: KubeClient, config: OperatorConfig | None = None,
                 metrics: OperatorMetrics | None = None, event: EventFn | None = None):
        config = config or OperatorConfig()
        metrics = metrics or OperatorMetrics()
        events = Events(event)
        status = W.StatusWriter(kube, events)
        self.health = PoolHealth(status.owned_by(W.HEALTH), events, metrics)
        self.gate = PatchJobGate(kube, config, metrics)
        self.pusher = Pusher(kube, config, metrics, events, status.owned_by(W.PUSHER), self.health)
        self.adapters = AdapterController(kube, config, metrics, events, status.owned_by(W.ADAPTERS), self.gate,
                                          self.pusher)
        self.pools = PoolController(kube, config, metrics, events, status.owned_by(W.POOLS), self.health,
                                    self.adapters, self.pusher)
        self.deleter = AdapterDeleter(kube, config, metrics, events, status.owned_by(W.DELETER), self.gate,
                                      self.pusher)

    async def close(self) -> None:
        self.adapters.close()
        await self.pusher.close()
