"""The adapter controller: one patch Job per spec digest (deterministic name, create-if-absent) when
the job gate admits it, its termination message into status, then a push of the pool's state; the
admission rounds of the adapters waiting in the gate's line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from vlmpool.api.adapter import PatchSummary, VLMAdapterStatus
from vlmpool.api.objects import Adapter, Pool
from vlmpool.controller import decisions as D
from vlmpool.controller import status as S
from vlmpool.controller.common import SOURCE_NOT_ALLOWED, Events, OperatorConfig, RetryLater, _duration
from vlmpool.controller.jobgate import QUEUED, PatchJobGate, job_unfinished
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.controller.pushing import Pusher
from vlmpool.controller.statuswriter import OwnedStatus
from vlmpool.kube.client import EVENTS, JOBS, PODS, VLMADAPTERS, VLMPOOLS, KubeClient
from vlmpool.manifests import adapter as MA
from vlmpool.manifests.common import A_SUPERSEDED, patch_job_name

log = logging.getLogger("vlmpool.operator")

POD_REFUSED = "PatchPodRefused"  # Patched Unknown: admission refuses the patch Job's pod


class AdapterController:
    def __init__(self, kube: KubeClient, config: OperatorConfig, metrics: OperatorMetrics, events: Events,
                 status: OwnedStatus, gate: PatchJobGate, pusher: Pusher):
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.events = events
        self.status = status
        self.gate = gate
        self.pusher = pusher
        self._admit_task: asyncio.Task | None = None
        self._admitting = False  # an admission round runs
        self._admit_again = False  # a slot freed since that round began

    async def reconcile(self, adapter: Adapter, pool: Pool | None = None) -> None:
        ns, name = adapter.namespace, adapter.name
        if adapter.metadata.get("deletionTimestamp"):
            return
        spec = adapter.spec
        if pool is None:
            raw = await self.kube.get_or_none(VLMPOOLS, spec.pool_ref.name, ns)
            pool = Pool.parse(raw) if raw is not None else None
        st = adapter.status
        served = adapter.served_name
        if pool is None:
            self.gate.dequeue_patch(ns, name)  # no Job without its pool: it must not hold a place in line
            await self.status.adapter(adapter.obj, VLMAdapterStatus(
                observed_generation=adapter.generation, served_name=served), [(
                "PoolFound", "False", "PoolNotFound", f"VLMPool {spec.pool_ref.name!r} does not exist in {ns}")])
            self.metrics.reconciles.labels("adapter", "pool-missing").inc()
            raise RetryLater(f"VLMPool {spec.pool_ref.name!r} not found", delay=10)
        found = ("PoolFound", "True", "PoolFound", f"served by VLMPool {spec.pool_ref.name}")
        digest = MA.spec_digest(adapter, pool)
        job_name = patch_job_name(name, digest)
        patched = S.get_condition(st.get("conditions") or [], "Patched")
        refusal = MA.file_source_refusal(spec.source.uri, self.config.host_paths)
        if refusal:
            # Before any Job (or hostPath) exists.
            self.gate.dequeue_patch(ns, name)
            await self.status.adapter(adapter.obj, VLMAdapterStatus(
                observed_generation=adapter.generation, served_name=served, spec_digest=digest),
                [found, ("Patched", "False", SOURCE_NOT_ALLOWED, refusal)])
            self.metrics.reconciles.labels("adapter", "refused").inc()
            return
        if patched is not None and patched.get("reason") == SOURCE_NOT_ALLOWED:
            # Allowed since (an admin widened --allow-host-path): patch it now.
            adapter = adapter.with_obj(await self.status.adapter(adapter.obj, None, [(
                "Patched", "Unknown", "SourceAllowed", "the source is allowed now")]))
            st, patched = adapter.status, None
        if patched is not None and D.patch_decided(st, digest):
            # This spec was patched (or refused) already: never run it twice.
            self.gate.dequeue_patch(ns, name)
            await self.status.adapter(adapter.obj, VLMAdapterStatus(
                observed_generation=adapter.generation, served_name=served), [found])
            self.metrics.reconciles.labels("adapter", "ok").inc()
            if st.get("version") and st.get("servedName") != served:
                await self.pusher.push_pool(ns, spec.pool_ref.name)  # renamed: serve it under the new name
            return
        admission = await self.gate.admit_patch_job(adapter.obj, job_name)
        if admission.others_first:
            self._admit_soon()
        if not admission.admitted:  # over --max-patch-jobs: a finished Job admits the next in line
            await self.status.adapter(
                adapter.obj, VLMAdapterStatus(observed_generation=adapter.generation, served_name=served,
                                              spec_digest=digest),
                [found, ("Patched", "Unknown", QUEUED, admission.why)],
                only_if=lambda cur: not D.patch_decided(cur, digest))
            return
        try:
            job, created = await self.kube.create_if_absent(
                MA.patch_job(adapter, pool, image=MA.patch_image_for(spec, self.config.patch_image,
                                                                     self.config.patch_dora_image),
                             adapter_root=self.config.adapter_root,
                             source_allow=self.config.source_allow), ns)
        finally:
            self.gate.patch_job_created(ns, job_name)
        if created:
            self.metrics.jobs_created.labels("patch").inc()
            self.events(adapter.obj, "Normal", "PatchJobCreated", f"Job {job_name} patches spec {digest[:8]}")
            log.info("adapter %s/%s: created Job %s", ns, name, job_name)
        running = ("Patched", "Unknown", "PatchJobRunning", f"Job {job_name} is running")
        refused = None if created else await self._pod_refusal(ns, job)
        if refused is not None:
            # Admission refuses the Job's pod (Pod Security, a quota, a webhook): the Job controller keeps
            # retrying and the Job fails only at its deadline; say why meanwhile (kubectl describe shows it).
            running = ("Patched", "Unknown", POD_REFUSED, f"Job {job_name} cannot create its pod: {refused}")
            self.metrics.errors.labels("adapter", POD_REFUSED).inc()
        await self.status.adapter(
            adapter.obj, VLMAdapterStatus(observed_generation=adapter.generation, served_name=served,
                                          spec_digest=digest, last_job=job_name),
            [found, running],
            # A result recorded for this digest meanwhile (the Job finished fast) must stay.
            only_if=lambda cur: not D.patch_decided(cur, digest))
        self.metrics.reconciles.labels("adapter", "ok").inc()
        # The Job may have finished already (operator restart): read its result now.
        await self.job_changed(job)

    async def patch_pod_changed(self, pod: dict[str, Any]) -> None:
        """A patch pod changed. One that Succeeded decides its single-completion Job: its result is
        recorded and pushed now, not when the Job controller marks the Job Complete (it batches pod
        updates for up to a second). Failures still wait for the Job, which knows about retries."""
        job_name = D.succeeded_pod_job(pod)
        if job_name is None:
            return
        job = await self.kube.get_or_none(JOBS, job_name, pod["metadata"]["namespace"])
        if job is None:
            return
        if not D.pod_of_job(pod, job):
            # Names the Job but is not its pod (another uid, no controller-uid label, not the template's
            # labels): its success says nothing about the Job, and its message is never read.
            log.warning("pod %s/%s names Job %s but is not its pod: ignored", pod["metadata"]["namespace"],
                        pod["metadata"]["name"], job_name)
            self.metrics.errors.labels("adapter", "UntrustedPatchPod").inc()
            return
        await self.job_changed(job, pod_succeeded=True)

    async def free_job_slot(self, job: dict[str, Any]) -> None:
        """A finished patch Job frees its slot of --max-patch-jobs, whether its result was wanted,
        recorded already (from its pod) or not. The one place that says so: after a Job's change, and
        for a Job seen in a listing (operator start, or a lost watch), whose result is its adapter's own
        resume's (or resync's) to read. A Job completed only in its pod's eyes still holds its slot."""
        if D.job_adapter_ref(job) is not None and not job_unfinished(job):
            await self.admit_queued()

    async def admit_queued(self) -> None:
        """A slot freed: reconcile the queued adapters that come first (each takes its slot through
        the gate's admit_patch_job); entries of adapters that went are dropped. Calls that arrive while
        one runs (every finished Job's event calls) are folded into one more round of it, so a queued
        adapter is not reconciled by several rounds at once."""
        if not self.gate.queue:
            return
        self._admit_again = True
        if self._admitting:
            return
        self._admitting = True
        try:
            while self._admit_again and self.gate.queue:
                self._admit_again = False
                await self._admit_round()
        finally:
            self._admitting = False

    async def _admit_round(self) -> None:
        for _, ns, name in await self.gate.next_in_line():
            adapter = await self.kube.get_or_none(VLMADAPTERS, name, ns)
            if adapter is None or adapter["metadata"].get("deletionTimestamp"):
                self.gate.dequeue_patch(ns, name)
                continue
            try:
                await self.reconcile(Adapter.parse(adapter))
            except Exception:  # the adapter's resync retries it
                log.exception("queued adapter %s/%s not admitted yet", ns, name)

    def _admit_soon(self) -> None:
        if self._admit_task is not None and not self._admit_task.done():
            return

        async def later() -> None:
            await asyncio.sleep(1.0)
            await self.admit_queued()

        self._admit_task = asyncio.get_running_loop().create_task(later())

    def close(self) -> None:
        if self._admit_task is not None and not self._admit_task.done():
            self._admit_task.cancel()

    async def job_changed(self, job: dict[str, Any], pod_succeeded: bool = False) -> None:
        """A patch Job changed (or one of its pods Succeeded): record its result, then free its slot."""
        await self._record_job_result(job, pod_succeeded)
        await self.free_job_slot(job)

    async def _record_job_result(self, job: dict[str, Any], pod_succeeded: bool) -> None:
        """Copy a finished result into the adapter's status, then push. Reads the adapter's metadata
        and status only (its spec is not parsed here)."""
        meta = job["metadata"]
        ns = meta["namespace"]
        ref = D.job_adapter_ref(job)
        if ref is None:
            return
        digest, owner = ref
        adapter = await self.kube.get_or_none(VLMADAPTERS, owner["name"], ns)
        if adapter is None or not D.job_result_wanted(adapter, owner, digest) or not D.operator_patch_job(job, adapter):
            return
        state = D.job_state(job, pod_succeeded=pod_succeeded)
        if not state.finished:
            return
        messages = await self._job_messages(ns, job)
        name = adapter["metadata"]["name"]
        jst = job.get("status") or {}
        duration = _duration(jst.get("startTime"), jst.get("completionTime"))

        def still_running(cur: dict[str, Any]) -> bool:
            return D.patch_pending(cur, digest)

        result = D.job_result(meta["name"], state, messages, adapter_root=self.config.adapter_root, adapter=name,
                              old_version=(adapter.get("status") or {}).get("version"))
        if isinstance(result, D.PatchSucceeded):
            version = result.version
            if duration is not None:
                self.metrics.job_seconds.labels("succeeded").observe(duration)
            if result.supersedes:
                # The older version stays on the volume until every pod serves the new one.
                await self.kube.patch(VLMADAPTERS, name, {"metadata": {"annotations": {
                    A_SUPERSEDED: result.supersedes}}}, ns)
            # Recording the version sets Loaded Unknown (Registering) in the same write (statuswriter.py).
            await self.status.adapter(
                adapter, VLMAdapterStatus(version=version, path=result.path,
                                          report=PatchSummary.model_validate(S.report_summary(result.summary))),
                [("Patched", "True", "Patched", f"version {version} by Job {meta['name']}")],
                only_if=still_running)
            log.info("adapter %s/%s: patched version %s", ns, name, version)
            await self.pusher.push_pool(ns, adapter["spec"]["poolRef"]["name"])
        elif isinstance(result, D.PatchFailed):
            await self._patch_failed(adapter, still_running, result.reason, result.message,
                                     duration if result.timed else None)
        elif isinstance(result, D.PatchJobFailed):
            msg = D.failed_job_message(meta["name"], result.condition, await self._job_raw_messages(ns, job))
            await self._patch_failed(adapter, still_running, "PatchJobFailed", msg, duration)

    async def _patch_failed(self, adapter: dict[str, Any], only_if: Callable[[dict[str, Any]], bool],
                            reason: str, message: str, duration: float | None = None) -> None:
        if duration is not None:
            self.metrics.job_seconds.labels("failed").observe(duration)
        self.metrics.errors.labels("adapter", reason).inc()
        await self.status.adapter(adapter, None, [("Patched", "False", reason, message)], only_if=only_if)

    async def _pod_refusal(self, ns: str, job: dict[str, Any]) -> str | None:
        """Why the Job controller cannot create the Job's pod: the message of its latest FailedCreate
        Event about this Job (by uid), while the Job has no pod at all. A message for status only (an Event
        is not trusted to decide anything): the Job still fails at its deadline if the refusal stays."""
        jst = job.get("status") or {}
        if any(jst.get(k) for k in ("active", "ready", "succeeded", "failed", "terminating")):
            return None
        uid = job["metadata"].get("uid")
        if not uid:
            return None
        events = await self.kube.list(EVENTS, ns, field_selector=f"involvedObject.uid={uid},reason=FailedCreate")
        if not events:
            return None
        latest = max(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime")
                     or e["metadata"].get("creationTimestamp") or "")
        return str(latest.get("message") or "FailedCreate")[:2000]

    async def _job_pods(self, ns: str, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The Job's own pods: listed by its job-name label, kept only when the Job controller made them
        for this Job (D.pod_of_job), so a pod that merely carries the label is never read."""
        pods = await self.kube.list(PODS, ns, label_selector=f"batch.kubernetes.io/job-name={job['metadata']['name']}")
        own = [p for p in pods if D.pod_of_job(p, job)]
        if len(own) != len(pods):
            log.warning("Job %s/%s: %d pod(s) with its job-name label are not its pods: ignored", ns,
                        job["metadata"]["name"], len(pods) - len(own))
        return own

    async def _job_raw_messages(self, ns: str, job: dict[str, Any]) -> list[str]:
        out = []
        for pod in await self._job_pods(ns, job):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated") or {}
                if term.get("message"):
                    out.append(term["message"])
        return out

    async def _job_messages(self, ns: str, job: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
        """(pod phase, parsed termination message) of the Job's pods, newest first."""
        pods = await self._job_pods(ns, job)
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)
        out = []
        for pod in pods:
            phase = (pod.get("status") or {}).get("phase", "")
            msg = None
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                if cs.get("name") == MA.PATCH_CONTAINER:
                    term = (cs.get("state") or {}).get("terminated") or {}
                    msg = S.parse_termination_message(term.get("message"))
            out.append((phase, msg))
        return out

