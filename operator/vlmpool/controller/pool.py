"""Pools: the children (created when absent, applied when the pool's own: controller/children.py),
status from the Deployment.

reconcile_pool takes the parsed pool (api/objects.Pool). The status paths (deployment_changed,
refresh_pool_status, pool_failed) read only metadata and status: they keep the raw object and never
parse the spec, so a pool whose spec fails validation still gets its status written."""

from __future__ import annotations

import hashlib
from typing import Any

from vlmpool.api.objects import Pool
from vlmpool.controller import children as C
from vlmpool.controller import decisions as D
from vlmpool.controller import status as S
from vlmpool.controller.common import ReconcilerBase, RetryLater, pool_token
from vlmpool.controller.routing import apply_routing
from vlmpool.kube.client import DEPLOYMENTS, PODS, VLMPOOLS, ApiError
from vlmpool.manifests import pool as MP
from vlmpool.manifests import routing as MR
from vlmpool.manifests.common import deployment_name, server_label_selector


class PoolReconciler(ReconcilerBase):
    _stalled: set[tuple[str, str]]  # (ns, pool) whose Stalled condition is True

    async def reconcile_pool(self, pool: Pool) -> None:
        ns, name, gen = pool.namespace, pool.name, pool.generation
        # The admin token is derived (pool_token): the operator never reads a Secret back.
        token = pool_token(self.config.token_key, pool.obj)
        token_hash = hashlib.sha256(token.encode()).hexdigest()[:16]
        pvc = MP.adapter_pvc(pool)
        own = ([pvc] if pvc is not None else []) + [
            MP.admin_secret(pool, token), MP.deployment(pool, token_hash, self.config.adapter_root), MP.service(pool)]
        if self.config.network_policy is not None:
            own.append(MP.network_policy(pool, self.config.network_policy))
        routing = MR.routing_objects(pool)
        try:
            claimed = await C.claim(self.kube, pool.obj, own + routing)  # every one checked before any write
            for child in claimed[:len(own)]:
                await C.put(self.kube, pool.obj, child)
            problem = await apply_routing(lambda c: C.put(self.kube, pool.obj, c), claimed[len(own):])
        except C.ChildConflict as e:
            await self._child_conflict(pool, e)
            raise RetryLater(str(e), delay=self.config.resync_seconds) from None
        if problem:
            self.event(pool.obj, "Warning", "RoutingUnavailable", problem)
        # Replica counts are the Deployment watcher's (deployment_changed): the object returned by
        # this apply may be older than what it already wrote.
        await self._write_pool_status(pool.obj, {"observedGeneration": gen, "endpoint": MP.endpoint(pool),
                                                 "concurrency": pool.spec.proxy.concurrency},
                                      [("Degraded", "False", "Reconciled", "children applied")])
        self.metrics.reconciles.labels("pool", "ok").inc()
        # The pool's inputs to patch Jobs (base model, family, max rank) may have changed.
        for adapter in await self._pool_adapters(ns, name):
            if not adapter.metadata.get("deletionTimestamp"):
                try:
                    await self.reconcile_adapter(adapter, pool=pool)
                except RetryLater:
                    pass
        await self.push_pool(ns, name)

    async def pool_failed(self, pool: dict[str, Any], err: Exception) -> None:
        """Report a failed reconcile on the pool (the raw object: its spec may be what failed)."""
        reason = D.failure_reason(err)
        self.metrics.errors.labels("pool", reason).inc()
        try:
            await self._write_pool_status(pool, {}, [("Degraded", "True", reason, str(err))])
        except (ApiError, RetryLater):
            pass
        self.event(pool, "Warning", "ReconcileFailed", str(err))

    async def _child_conflict(self, pool: Pool, err: C.ChildConflict) -> None:
        """Degraded True, reason ChildConflict, naming the objects; a Warning Event when that is news
        (the reconcile is retried every resync until the objects are gone or the pool renamed)."""
        before = S.get_condition((pool.obj.get("status") or {}).get("conditions") or [], "Degraded") or {}
        self.metrics.errors.labels("pool", C.REASON).inc()
        await self._write_pool_status(pool.obj, {}, [("Degraded", "True", C.REASON, str(err))])
        if before.get("reason") != C.REASON or before.get("message") != str(err):
            self.event(pool.obj, "Warning", C.REASON, str(err))

    async def deployment_changed(self, dep: dict[str, Any]) -> None:
        """Copy the Deployment's replica counts into its pool's status."""
        owner = D.controller_owner(dep, "VLMPool")
        if owner is None:
            return
        ns = dep["metadata"]["namespace"]
        pool = await self.kube.get_or_none(VLMPOOLS, owner["name"], ns)
        if pool is None or pool["metadata"]["uid"] != owner.get("uid"):
            return
        await self._write_dep_status(pool, dep)

    async def refresh_pool_status(self, ns: str, pool: str) -> None:
        """Re-read the pool's Deployment (heals a missed watch event; runs on the resync)."""
        obj = await self.kube.get_or_none(VLMPOOLS, pool, ns)
        if obj is None:
            return
        uid = obj["metadata"]["uid"]
        deps = [d for d in await self.kube.list(DEPLOYMENTS, ns, label_selector=server_label_selector(pool))
                if d["metadata"]["name"] == deployment_name(pool)
                and (D.controller_owner(d, "VLMPool") or {}).get("uid") == uid]  # never another's
        await self._write_dep_status(obj, deps[0] if deps else None)

    async def pod_scheduling_changed(self, pod: dict[str, Any]) -> None:
        """A pool pod that no node can take (or one of the pool's while it is Stalled): re-derive the
        Stalled condition (the Deployment's own status does not change while its new pod waits)."""
        pool = (pod["metadata"].get("labels") or {}).get("vlmpool.io/pool")
        if not pool:
            return
        if S.unschedulable(pod) is None:
            key = (pod["metadata"]["namespace"], pool)
            if key not in self._stalled:
                return
        await self.refresh_pool_status(pod["metadata"]["namespace"], pool)

    async def _write_dep_status(self, pool: dict[str, Any], dep: dict[str, Any] | None) -> None:
        ns, name = pool["metadata"]["namespace"], pool["metadata"]["name"]
        pods = await self.kube.list(PODS, ns, label_selector=server_label_selector(name)) if dep else []
        fields, conds = S.deployment_status(pool, dep, pods)
        stalled = next(c for c in conds if c[0] == "Stalled") if dep else None
        before = S.get_condition((pool.get("status") or {}).get("conditions") or [], "Stalled")
        await self._write_pool_status(pool, fields, conds)
        if stalled is not None and stalled[1] == "True":
            self._stalled.add((ns, name))
            if not before or before.get("status") != "True" or before.get("reason") != stalled[2]:
                self.event(pool, "Warning", "RolloutStalled", stalled[3])
        else:
            self._stalled.discard((ns, name))
            if before and before.get("status") == "True":
                self.event(pool, "Normal", "RolloutResumed", "every pod of the pool found a node")
