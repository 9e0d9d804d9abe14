"""The bound on concurrent patch Jobs (``--max-patch-jobs``): at most N unfinished patch Jobs exist at
once in the namespaces this operator patches in; adapters over the bound wait in a FIFO queue ordered
by their creation (then namespace and name), and their Patched condition says so
(``PatchJobQueued``, with the place in the queue). A finished Job frees its slot at once: the Job
watch admits the next adapters in order; the adapters' resync is the backstop.

Counting is the apiserver's (one list of the patch Jobs per namespace, under one lock per operator), so
an operator restart, or Jobs created before it, are counted too."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vlmpool.api.objects import Adapter
from vlmpool.controller import decisions as D
from vlmpool.controller import status as S
from vlmpool.controller.common import ReconcilerBase
from vlmpool.kube.client import JOBS, VLMADAPTERS
from vlmpool.manifests.common import COMPONENT_PATCH, L_ADAPTER, L_COMPONENT, L_MANAGED_BY, MANAGED_BY

log = logging.getLogger("vlmpool.operator")

PATCH_JOB_SELECTOR = f"{L_MANAGED_BY}={MANAGED_BY},{L_COMPONENT}={COMPONENT_PATCH}"
QUEUED = "PatchJobQueued"
# Jobs whose pods have not succeeded (batch/v1 Jobs select on status.successful, their succeeded count)
UNSUCCEEDED_JOBS = "status.successful!=1"

QueueKey = tuple[str, str]  # (namespace, adapter name)


def job_unfinished(job: dict[str, Any]) -> bool:
    """The Job still holds a slot: its pod has not succeeded and it is neither Complete nor Failed."""
    state = D.job_state(job)
    return not (state.complete or state.failed or (job.get("status") or {}).get("succeeded"))


class PatchJobGate(ReconcilerBase):
    _gate_lock: asyncio.Lock
    _patch_queue: dict[QueueKey, tuple[str, str, str]]  # key -> (creationTimestamp, namespace, name)
    _patch_namespaces: set[str]
    _admit_task: asyncio.Task | None

    async def _alive_patch_jobs(self) -> tuple[int, set[QueueKey]]:
        """(unfinished patch Jobs, the adapters they belong to). The apiserver leaves out the Jobs that
        succeeded (a field selector): the finished Jobs stay until their TTL, and listing them all on every
        admission made a burst of N adapters cost N lists of up to N Jobs (at 500 adapters, 60 % of the
        operator's CPU, docs/performance.md). Failed Jobs still come and are dropped here."""
        owners: set[QueueKey] = set()
        n = 0
        for ns in sorted(self._patch_namespaces):
            for j in await self.kube.list(JOBS, ns, label_selector=PATCH_JOB_SELECTOR,
                                          field_selector=UNSUCCEEDED_JOBS):
                if job_unfinished(j):
                    n += 1
                    owners.add((ns, (j["metadata"].get("labels") or {}).get(L_ADAPTER, "")))
        return n, owners

    async def _older_waiting(self, ns: str, entry: tuple[str, str, str], running: set[QueueKey]) -> None:
        """Put into the queue the adapters of `ns` created before `entry` that wait for a patch Job
        but whose reconcile has not asked yet (a burst of creations is handled in any order)."""
        for a in await self.kube.list(VLMADAPTERS, ns):
            meta = a["metadata"]
            key = (ns, meta["name"])
            other = (meta.get("creationTimestamp") or "", ns, meta["name"])
            if other >= entry or key in self._patch_queue or key in running or meta.get("deletionTimestamp"):
                continue
            st = a.get("status") or {}
            patched = S.get_condition(st.get("conditions") or [], "Patched")
            stale = st.get("observedGeneration") != meta.get("generation")
            if patched is None or patched["status"] == "Unknown" or stale:
                self._patch_queue[key] = other

    async def admit_patch_job(self, adapter: dict[str, Any], job_name: str) -> tuple[bool, str]:
        """May the adapter's patch Job `job_name` be created now? (True, "") when it may (or exists
        already); (False, why) when it waits for a slot."""
        meta = adapter["metadata"]
        ns, name = meta["namespace"], meta["name"]
        key = (ns, name)
        async with self._gate_lock:
            self._patch_namespaces.add(ns)
            if await self.kube.get_or_none(JOBS, job_name, ns) is not None:
                self._patch_queue.pop(key, None)
                return True, ""  # created before (an operator restart): it holds its slot already
            entry = (meta.get("creationTimestamp") or "", ns, name)
            self._patch_queue[key] = entry
            alive, running = await self._alive_patch_jobs()
            free = self.config.max_patch_jobs - alive
            place = sorted(self._patch_queue.values()).index(entry)
            if place < free:  # first make sure no older adapter waits unseen
                await self._older_waiting(ns, entry, running)
                place = sorted(self._patch_queue.values()).index(entry)
            if place < free:
                del self._patch_queue[key]
                return True, ""
            if free > 0:  # older adapters are in line: let them take the free slots soon
                self._admit_soon()
            self.metrics.reconciles.labels("adapter", "queued").inc()
            return False, (f"waiting for a patch Job slot: {alive}/{self.config.max_patch_jobs} Jobs running, "
                           f"{place - max(free, 0) + 1} of {len(self._patch_queue)} queued adapters in line")

    def _admit_soon(self) -> None:
        if self._admit_task is not None and not self._admit_task.done():
            return

        async def later() -> None:
            await asyncio.sleep(1.0)
            await self.admit_queued()

        self._admit_task = asyncio.get_running_loop().create_task(later())

    def dequeue_patch(self, ns: str, name: str) -> None:
        """The adapter no longer waits (patched, refused, deleted)."""
        self._patch_queue.pop((ns, name), None)

    async def admit_queued(self) -> None:
        """A slot freed: reconcile the queued adapters that come first (each takes its slot through
        admit_patch_job); entries of adapters that went are dropped."""
        if not self._patch_queue:
            return
        async with self._gate_lock:
            free = self.config.max_patch_jobs - (await self._alive_patch_jobs())[0]
            head = sorted(self._patch_queue.values())[:max(free, 0)]
        for _, ns, name in head:
            adapter = await self.kube.get_or_none(VLMADAPTERS, name, ns)
            if adapter is None or adapter["metadata"].get("deletionTimestamp"):
                self.dequeue_patch(ns, name)
                continue
            try:
                await self.reconcile_adapter(Adapter.parse(adapter))
            except Exception:  # the adapter's resync retries it
                log.exception("queued adapter %s/%s not admitted yet", ns, name)
