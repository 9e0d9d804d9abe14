"""The deleter: adapters on delete: push without the adapter, verify every pod dropped it, stop its patch Jobs, run
the cleanup Job, then let the finalizer go."""

from __future__ import annotations

from vlmpool.api.objects import Adapter, Pool
from vlmpool.controller import decisions as D
from vlmpool.controller.common import Events, OperatorConfig, RetryLater, _label_value
from vlmpool.controller.jobgate import PatchJobGate
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.controller.pushing import Pusher
from vlmpool.controller.statuswriter import OwnedStatus
from vlmpool.kube.client import JOBS, PODS, VLMPOOLS, KubeClient
from vlmpool.manifests import adapter as MA
from vlmpool.manifests.common import L_ADAPTER


class AdapterDeleter:
    def __init__(self, kube: KubeClient, config: OperatorConfig, metrics: OperatorMetrics, events: Events,
                 status: OwnedStatus, gate: PatchJobGate, pusher: Pusher):
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.events = events
        self.status = status
        self.gate = gate
        self.pusher = pusher

    async def delete(self, adapter: Adapter) -> None:
        """Unload from every pod, remove the files, then return (kopf drops the finalizer).
        Raises RetryLater while something is still pending."""
        ns, name = adapter.namespace, adapter.name
        await self.status.adapter(adapter.obj)  # phase Deleting
        self.gate.dequeue_patch(ns, name)  # no patch Job for it any more
        raw = await self.kube.get_or_none(VLMPOOLS, adapter.spec.pool_ref.name, ns)
        if raw is None or raw["metadata"].get("deletionTimestamp"):
            # The pool (and with it the pods and, for a created claim, the files) is gone.
            return
        summary = await self.pusher.push_pool(ns, raw["metadata"]["name"])
        pool = Pool.parse(raw)
        served = adapter.served_name
        pending = summary.confirmed_without(served) if summary else []
        if pending:
            raise RetryLater(f"pods not yet confirmed the unload of {served}: {', '.join(pending)}", delay=3)
        if not adapter.status.get("lastJob"):
            return  # nothing was ever written for it
        await self._stop_patch_jobs(adapter)
        job, created = await self.kube.create_if_absent(MA.cleanup_job(adapter, pool, image=self.config.patch_image,
                                                                 adapter_root=self.config.adapter_root), ns)
        if created:
            self.metrics.jobs_created.labels("cleanup").inc()
            self.events(adapter.obj, "Normal", "CleanupJobCreated",
                       f"every pod unloaded {served}; Job {job['metadata']['name']} removes {name}/ from the volume")
        state = D.job_state(job)
        if state.complete:
            return
        if state.failed:
            self.events(adapter.obj, "Warning", "CleanupFailed",
                       f"Job {job['metadata']['name']} failed; {name}/ may remain on the volume")
            return
        raise RetryLater(f"waiting for cleanup Job {job['metadata']['name']}", delay=2)

    async def _stop_patch_jobs(self, adapter: Adapter) -> None:
        """Delete the adapter's unfinished patch Jobs and wait until their pods stopped, so no patch
        publishes into the directory after the cleanup Job removed it."""
        meta = adapter.metadata
        ns = meta["namespace"]
        selector = f"{L_ADAPTER}={_label_value(meta['name'])},app.kubernetes.io/component=patch"
        for job in await self.kube.list(JOBS, ns, label_selector=selector):
            if D.patch_job_unfinished(job, meta["uid"]):
                await self.kube.delete(JOBS, job["metadata"]["name"], ns, propagation="Background")
                self.events(adapter.obj, "Normal", "PatchJobStopped",
                           f"deleted the unfinished Job {job['metadata']['name']}")
        running = [p["metadata"]["name"] for p in await self.kube.list(PODS, ns, label_selector=selector)
                   if not D.pod_stopped(p)]
        if running:
            raise RetryLater(f"waiting for patch pods to stop: {', '.join(running)}", delay=3)

