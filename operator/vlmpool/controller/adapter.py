"""Adapters: one patch Job per spec digest (deterministic name, create-if-absent), its termination
message into status, then a push of the pool's state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vlmpool.controller import status as S
from vlmpool.controller.common import SOURCE_NOT_ALLOWED, ReconcilerBase, RetryLater, _duration
from vlmpool.kube.client import PODS, VLMADAPTERS, VLMPOOLS
from vlmpool.manifests import adapter as MA
from vlmpool.manifests.common import A_SPEC_DIGEST, A_SUPERSEDED, patch_job_name
from vlmpool.patcher.publish import check_version_path

log = logging.getLogger("vlmpool.operator")


class AdapterReconciler(ReconcilerBase):
    async def reconcile_adapter(self, adapter: dict[str, Any], pool: dict[str, Any] | None = None) -> None:
        meta = adapter["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if meta.get("deletionTimestamp"):
            return
        spec = MA.parse_spec(adapter)
        pool = pool or await self.kube.get_or_none(VLMPOOLS, spec.pool_ref.name, ns)
        st = adapter.get("status") or {}
        gen = meta.get("generation")
        base = {"observedGeneration": gen, "servedName": MA.served_name(adapter)}
        if pool is None:
            await self._write_adapter_status(adapter, base, [(
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
            await self._write_adapter_status(adapter, {**base, "specDigest": digest},
                                             [found, ("Patched", "False", SOURCE_NOT_ALLOWED, refusal)])
            self.metrics.reconciles.labels("adapter", "refused").inc()
            return
        if patched is not None and patched.get("reason") == SOURCE_NOT_ALLOWED:
            # Allowed since (an admin widened --allow-host-path): patch it now.
            adapter = await self._write_adapter_status(adapter, {}, [(
                "Patched", "Unknown", "SourceAllowed", "the source is allowed now")])
            st, patched = adapter.get("status") or {}, None
        if st.get("specDigest") == digest and patched is not None and patched["status"] in ("True", "False"):
            # This spec was patched (or refused) already: never run it twice.
            await self._write_adapter_status(adapter, base, [found])
            self.metrics.reconciles.labels("adapter", "ok").inc()
            if st.get("version") and st.get("servedName") != base["servedName"]:
                await self.push_pool(ns, spec.pool_ref.name)  # renamed: serve it under the new name
            return
        job, created = await self.kube.create_if_absent(
            MA.patch_job(adapter, pool, image=MA.patch_image_for(spec, self.config.patch_image,
                                                                 self.config.patch_dora_image),
                         adapter_root=self.config.adapter_root,
                         source_allow=self.config.source_allow), ns)
        if created:
            self.metrics.jobs_created.labels("patch").inc()
            self.event(adapter, "Normal", "PatchJobCreated", f"Job {job_name} patches spec {digest[:8]}")
            log.info("adapter %s/%s: created Job %s", ns, name, job_name)
        await self._write_adapter_status(
            adapter, {**base, "specDigest": digest, "lastJob": job_name},
            [found, ("Patched", "Unknown", "PatchJobRunning", f"Job {job_name} is running")],
            # A result recorded for this digest meanwhile (the Job finished fast) must stay.
            only_if=lambda cur: not (cur.get("specDigest") == digest and (S.get_condition(
                cur.get("conditions") or [], "Patched") or {}).get("status") in ("True", "False")))
        self.metrics.reconciles.labels("adapter", "ok").inc()
        # The Job may have finished already (operator restart): read its result now.
        await self.job_changed(job)

    async def job_changed(self, job: dict[str, Any]) -> None:
        """A patch Job changed: copy a finished result into its adapter's status, then push."""
        meta = job["metadata"]
        ns = meta["namespace"]
        digest = (meta.get("annotations") or {}).get(A_SPEC_DIGEST)
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == "VLMAdapter"), None)
        if not digest or owner is None:
            return
        adapter = await self.kube.get_or_none(VLMADAPTERS, owner["name"], ns)
        if adapter is None or adapter["metadata"]["uid"] != owner.get("uid"):
            return
        st = adapter.get("status") or {}
        if st.get("specDigest") != digest or adapter["metadata"].get("deletionTimestamp"):
            return  # an older spec's Job: its result is not wanted any more
        patched = S.get_condition(st.get("conditions") or [], "Patched")
        if patched is not None and patched["status"] != "Unknown":
            return  # already recorded
        jst = job.get("status") or {}
        jconds = {c["type"]: c for c in jst.get("conditions") or [] if c.get("status") == "True"}
        complete = "Complete" in jconds or "SuccessCriteriaMet" in jconds
        failed = "Failed" in jconds or "FailureTarget" in jconds
        if not complete and not failed and not jst.get("failed"):
            return
        messages = await self._job_messages(ns, meta["name"])
        name = adapter["metadata"]["name"]
        duration = _duration(jst.get("startTime"), jst.get("completionTime"))

        def still_running(cur: dict[str, Any]) -> bool:
            c = S.get_condition(cur.get("conditions") or [], "Patched")
            return cur.get("specDigest") == digest and (c is None or c["status"] == "Unknown")

        if complete:
            ok = next((m for phase, m in messages if phase == "Succeeded" and m and m.get("ok")), None)
            if ok is None:
                await self._patch_failed(adapter, still_running, "InvalidTerminationMessage",
                                         f"Job {meta['name']} succeeded without a valid JSON summary in its "
                                         "termination message")
                return
            version, path = str(ok.get("version") or ""), str(ok.get("path") or "")
            problem = check_version_path(self.config.adapter_root, name, version, path)
            if problem:
                await self._patch_failed(adapter, still_running, "InvalidTerminationMessage", problem)
                return
            if duration is not None:
                self.metrics.job_seconds.labels("succeeded").observe(duration)
            old_version = st.get("version")
            if old_version and old_version != version:
                # The older version stays on the volume until every pod serves the new one.
                await self.kube.patch(VLMADAPTERS, name, {"metadata": {"annotations": {A_SUPERSEDED: old_version}}}, ns)
            await self._write_adapter_status(
                adapter, {"version": version, "path": path, "report": S.report_summary(ok)},
                [("Patched", "True", "Patched", f"version {version} by Job {meta['name']}"),
                 ("Loaded", "Unknown", "Registering", "pushing the version to the pool's pods")],
                only_if=still_running)
            log.info("adapter %s/%s: patched version %s", ns, name, version)
            await self.push_pool(ns, adapter["spec"]["poolRef"]["name"])
            return
        refusal = next((m for phase, m in messages if m and m.get("ok") is False), None)
        if refusal is not None and (failed or refusal.get("reason") not in S.RETRYABLE_PATCH_REASONS):
            reason = str(refusal.get("reason") or "PatchRefused")
            await self._patch_failed(adapter, still_running, reason, str(refusal.get("message") or "")[:4000],
                                     duration)
            return
        if failed:
            jc = jconds.get("Failed") or jconds.get("FailureTarget") or {}
            tail = next((raw for raw in await self._job_raw_messages(ns, meta["name"]) if raw), "")
            msg = f"Job {meta['name']} failed: {jc.get('reason', '')}: {jc.get('message', '')}"
            if tail:
                msg += f"; last output: {tail[-1500:]}"
            await self._patch_failed(adapter, still_running, "PatchJobFailed", msg, duration)

    async def _patch_failed(self, adapter: dict[str, Any], only_if: Callable[[dict[str, Any]], bool],
                            reason: str, message: str, duration: float | None = None) -> None:
        if duration is not None:
            self.metrics.job_seconds.labels("failed").observe(duration)
        self.metrics.errors.labels("adapter", reason).inc()
        await self._write_adapter_status(adapter, {}, [("Patched", "False", reason, message)], only_if=only_if)

    async def _job_pods(self, ns: str, job: str) -> list[dict[str, Any]]:
        return await self.kube.list(PODS, ns, label_selector=f"batch.kubernetes.io/job-name={job}")

    async def _job_raw_messages(self, ns: str, job: str) -> list[str]:
        out = []
        for pod in await self._job_pods(ns, job):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated") or {}
                if term.get("message"):
                    out.append(term["message"])
        return out

    async def _job_messages(self, ns: str, job: str) -> list[tuple[str, dict[str, Any] | None]]:
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

