"""The bound on concurrent patch Jobs (``--max-patch-jobs``): at most N unfinished patch Jobs exist at
once in the namespaces this operator patches in; adapters over the bound wait in a queue, and their
Patched condition says so (``PatchJobQueued``). A finished Job frees its slot at once: the Job watch
admits the next adapters in order; the adapters' resync is the backstop.

The order shares the slots fairly among namespaces (tenants): within a namespace, adapters start in the
order they were created; across namespaces, the next slot goes to the namespace with the fewest patch
Jobs alive plus adapters ahead of it in its own queue (ties: the older adapter). So one tenant's
burst or slow adapters cannot hold back another tenant's adapter for more than one Job's run, and a
namespace alone still uses every slot (``fair_order``).

Counting is the apiserver's (one list of the patch Jobs per namespace, under one lock per operator), so
an operator restart, or Jobs created before it, are counted too."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vlmpool.controller import decisions as D
from vlmpool.controller import status as S
from vlmpool.controller.common import OperatorConfig
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.kube.client import JOBS, VLMADAPTERS, KubeClient
from vlmpool.manifests.common import COMPONENT_PATCH, L_ADAPTER, L_COMPONENT, L_MANAGED_BY, MANAGED_BY

log = logging.getLogger("vlmpool.operator")

PATCH_JOB_SELECTOR = f"{L_MANAGED_BY}={MANAGED_BY},{L_COMPONENT}={COMPONENT_PATCH}"
QUEUED = "PatchJobQueued"
# Jobs whose pods have not succeeded (batch/v1 Jobs select on status.successful, their succeeded count)
UNSUCCEEDED_JOBS = "status.successful!=1"

QueueKey = tuple[str, str]  # (namespace, adapter name)
QueueEntry = tuple[str, str, str]  # (creationTimestamp, namespace, adapter name)


def fair_order(queued: Iterable[QueueEntry], running: Iterable[QueueKey]) -> list[QueueEntry]:
    """The queued adapters in the order they get slots: namespaces take turns (round-robin, counting
    the patch Jobs each namespace has alive: a namespace with two Jobs running waits behind one with
    none), creation order within a namespace. An entry's turn is its namespace's alive Jobs plus the
    entries of the namespace ahead of it; equal turns go to the older adapter (then namespace, name)."""
    alive = Counter(ns for ns, _ in running)
    per_ns: dict[str, list[QueueEntry]] = defaultdict(list)
    for entry in sorted(queued):
        per_ns[entry[1]].append(entry)
    turns = [(alive[ns] + i, entry) for ns, entries in per_ns.items() for i, entry in enumerate(entries)]
    return [entry for _, entry in sorted(turns)]


def job_unfinished(job: dict[str, Any]) -> bool:
    """The Job still holds a slot: its pod has not succeeded and it is neither Complete nor Failed."""
    state = D.job_state(job)
    return not (state.complete or state.failed or (job.get("status") or {}).get("succeeded"))


@dataclass(frozen=True)
class Admission:
    admitted: bool
    why: str = ""  # why it waits (the Patched condition's message)
    others_first: bool = False  # slots are free but older adapters are in line: admit them soon


class PatchJobGate:
    """Counts the patch Jobs alive and keeps the adapters that wait for a slot in line."""

    def __init__(self, kube: KubeClient, config: OperatorConfig, metrics: OperatorMetrics):
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self.queue: dict[QueueKey, QueueEntry] = {}
        self._namespaces: set[str] = set()
        self._scanned: dict[str, str] = {}  # namespace -> newest creationTimestamp its last adapter list saw
        self._reserved: dict[tuple[str, str], str] = {}  # (namespace, Job) admitted, not created yet -> adapter

    async def _alive_patch_jobs(self) -> tuple[int, set[QueueKey]]:
        """(unfinished patch Jobs, the adapters they belong to). The apiserver leaves out the Jobs that
        succeeded (a field selector): the finished Jobs stay until their TTL, and listing them all on every
        admission made a burst of N adapters cost N lists of up to N Jobs (at 500 adapters, 60 % of the
        operator's CPU, docs/performance.md). Failed Jobs still come and are dropped here.

        Jobs admitted but not created yet (the creation runs after the gate's lock is released) count
        too: without them two adapters admitted back to back could both see a free slot."""
        owners: set[QueueKey] = set()
        n = 0
        listed: set[tuple[str, str]] = set()
        # Taken before the lists: a creation that ends while a list is on its way drops its reservation
        # and may be missing from that list, so it must still count as reserved.
        reserved = dict(self._reserved)
        for ns in sorted(self._namespaces):
            for j in await self.kube.list(JOBS, ns, label_selector=PATCH_JOB_SELECTOR,
                                          field_selector=UNSUCCEEDED_JOBS):
                listed.add((ns, j["metadata"]["name"]))
                if job_unfinished(j):
                    n += 1
                    owners.add((ns, (j["metadata"].get("labels") or {}).get(L_ADAPTER, "")))
        for (ns, job), adapter in reserved.items():
            if (ns, job) not in listed:
                n += 1
                owners.add((ns, adapter))
        return n, owners

    async def _older_waiting(self, ns: str, entry: QueueEntry, running: set[QueueKey]) -> None:
        """Put into the queue the adapters of `ns` that wait for a patch Job but whose reconcile has not
        asked yet, so that `entry` does not overtake older ones (a burst of creations is handled in any
        order).

        One list of the namespace's adapters queues every waiting adapter created up to its newest one;
        later adapters ask for themselves (their create events). So the list is read again only for an
        entry at least as new as the newest adapter the last list saw: a burst of N adapters costs a
        few lists, not N lists of N adapters."""
        seen = self._scanned.get(ns)
        if seen is not None and entry[0] < seen:
            return
        items = await self.kube.list(VLMADAPTERS, ns)
        self._scanned[ns] = max((a["metadata"].get("creationTimestamp") or "" for a in items), default="")
        for a in items:
            meta = a["metadata"]
            key = (ns, meta["name"])
            other = (meta.get("creationTimestamp") or "", ns, meta["name"])
            if key in self.queue or key in running or meta.get("deletionTimestamp"):
                continue
            st = a.get("status") or {}
            patched = S.get_condition(st.get("conditions") or [], "Patched")
            stale = st.get("observedGeneration") != meta.get("generation")
            if patched is None or patched["status"] == "Unknown" or stale:
                self.queue[key] = other

    async def admit_patch_job(self, adapter: dict[str, Any], job_name: str) -> Admission:
        """May the adapter's patch Job `job_name` be created now? Admitted when it may (or exists
        already); else why it waits for a slot."""
        meta = adapter["metadata"]
        ns, name = meta["namespace"], meta["name"]
        key = (ns, name)
        async with self._lock:
            self._namespaces.add(ns)
            if await self.kube.get_or_none(JOBS, job_name, ns) is not None:
                self.dequeue_patch(ns, name)
                return Admission(True)  # created before (an operator restart): it holds its slot already
            entry = (meta.get("creationTimestamp") or "", ns, name)
            self.queue[key] = entry
            alive, running = await self._alive_patch_jobs()
            free = self.config.max_patch_jobs - alive
            place = fair_order(self.queue.values(), running).index(entry)
            if place < free:  # first make sure no older adapter of its namespace waits unseen
                await self._older_waiting(ns, entry, running)
                place = fair_order(self.queue.values(), running).index(entry)
            log.debug("patch gate: %s/%s alive %d (%d admitted, not created yet) place %d -> %s", ns, name, alive,
                      len(self._reserved), place, "admitted" if place < free else "queued")
            if place < free:
                self.dequeue_patch(ns, name)
                self._reserved[(ns, job_name)] = name  # until created (patch_job_created)
                return Admission(True)
            self.metrics.reconciles.labels("adapter", "queued").inc()
            self.metrics.patch_queue.set(len(self.queue))
            # A stable message: a place in line would change with every admission and make each queued
            # adapter's resync a status write (N queued adapters x every resync). The queue's length is
            # the vlmpool_operator_patch_jobs_queued gauge.
            return Admission(False, f"waiting for one of the {self.config.max_patch_jobs} patch Job slots "
                             "(--max-patch-jobs); namespaces take turns, and a namespace's adapters start in "
                             "the order they were created",
                             others_first=free > 0)  # older adapters are in line: they take the free slots

    def patch_job_created(self, ns: str, job_name: str) -> None:
        """The admitted Job was created (or its creation failed): the apiserver counts it from now on."""
        self._reserved.pop((ns, job_name), None)

    def dequeue_patch(self, ns: str, name: str) -> None:
        """The adapter no longer waits (patched, refused, deleted)."""
        self.queue.pop((ns, name), None)
        self.metrics.patch_queue.set(len(self.queue))

    async def next_in_line(self) -> list[QueueEntry]:
        """The queued adapters that would get the free slots now, in fair_order (the adapter controller
        reconciles them; each takes its slot through admit_patch_job)."""
        async with self._lock:
            alive, running = await self._alive_patch_jobs()
            return fair_order(self.queue.values(), running)[:max(self.config.max_patch_jobs - alive, 0)]
