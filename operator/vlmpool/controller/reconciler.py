"""What the operator does, independent of kopf's wiring (see operator.py for the handlers).

Pools: server-side apply of the children, status from the Deployment.
Adapters: one patch Job per spec digest (deterministic name, create-if-absent), its termination
message into status, then a push of the pool's state; on delete: push without the adapter, verify
every pod dropped it, run the cleanup Job, then let the finalizer go.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from vlmpool.controller import status as S
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.controller.push import PodResult, pod_fingerprint, pod_is_pushable, push_to_pods
from vlmpool.kube.client import (
    DEPLOYMENTS,
    JOBS,
    PODS,
    VLMADAPTERS,
    VLMPOOLS,
    ApiError,
    Conflict,
    KubeClient,
    NotFound,
)
from vlmpool.manifests import adapter as MA
from vlmpool.manifests import pool as MP
from vlmpool.manifests.common import (
    A_PRUNED,
    A_SPEC_DIGEST,
    A_SUPERSEDED,
    ADAPTER_ROOT,
    L_ADAPTER,
    deployment_name,
    patch_job_name,
    server_label_selector,
)
from vlmpool.patcher.publish import check_version_path

log = logging.getLogger("vlmpool.operator")

SOURCE_NOT_ALLOWED = "SourceNotAllowed"  # a file:// source outside the node directories an admin allowed

# (body, type, reason, message) -> None. kopf.event in the operator; a list append in unit tests.
EventFn = Callable[[dict[str, Any], str, str, str], None]


class RetryLater(Exception):
    """Not an error: the thing waited for is not there yet. The handler maps it to kopf.TemporaryError."""

    def __init__(self, message: str, delay: float = 5.0):
        super().__init__(message)
        self.delay = delay


@dataclass
class PushSummary:
    pool: str
    generation: int
    pods: list[str]
    results: dict[str, PodResult]
    state: dict[str, Any]

    def confirmed_without(self, served: str) -> list[str]:
        """Pods that did NOT confirm serving nothing under `served` (empty list: all confirmed)."""
        return [p for p in self.pods if not self.results[p].ok or served in self.results[p].adapters]


@dataclass
class _PoolPush:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: asyncio.Future | None = None
    digest: str | None = None
    generation: int = 0
    retry_task: asyncio.Task | None = None
    retry_delay: float = 1.0


@dataclass
class OperatorConfig:
    resync_seconds: float = 60.0
    push_timeout: float = 10.0
    push_parallelism: int = 16
    patch_image: str | None = None  # default: the pool's proxy image (one distribution, three entry points)
    patch_dora_image: str | None = None  # patch Jobs of svd/strip adapters (torch); default: patch_image
    adapter_root: str = ADAPTER_ROOT  # mount path of the adapter volume in Jobs and engines
    source_allow: tuple[str, ...] = ()  # internal hosts/CIDRs patch Jobs may fetch from (--source-allow)
    host_paths: tuple[str, ...] = ()  # node directories file:// sources may name (--allow-host-path)
    # The key the pools' admin tokens are derived from (--token-key-file); the default suits a
    # single process only (tests): the chart mounts a key that outlives operator restarts.
    token_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))


class Reconciler:
    def __init__(self, kube: KubeClient, config: OperatorConfig | None = None,
                 metrics: OperatorMetrics | None = None, event: EventFn | None = None):
        self.kube = kube
        self.config = config or OperatorConfig()
        self.metrics = metrics or OperatorMetrics()
        self._event = event or (lambda body, type_, reason, message: None)
        self._pushes: dict[tuple[str, str], _PoolPush] = {}
        self._pushed: dict[tuple[str, str], str] = {}  # (ns, pod) -> fingerprint last pushed OK
        self._pod_ok: dict[tuple[str, str], bool] = {}  # (ns, pod) -> last push succeeded (for events)
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        for st in self._pushes.values():
            if st.retry_task and not st.retry_task.done():
                st.retry_task.cancel()
        if self._http is not None:
            await self._http.close()

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            self._event(body, type_, reason, message[:1000])
        except Exception:  # events are best effort
            log.debug("event not posted", exc_info=True)

    # ================================================================================================
    # Pools
    # ================================================================================================
    async def reconcile_pool(self, pool: dict[str, Any]) -> None:
        ns, name = pool["metadata"]["namespace"], pool["metadata"]["name"]
        gen = pool["metadata"].get("generation")
        pvc = MP.adapter_pvc(pool)
        if pvc is not None:
            await self.kube.apply(pvc)
        token = await self._ensure_token(pool)
        token_hash = hashlib.sha256(token.encode()).hexdigest()[:16]
        await self.kube.apply(MP.deployment(pool, token_hash, self.config.adapter_root))
        await self.kube.apply(MP.service(pool))
        spec = MP.parse_spec(pool)
        # Replica counts are the Deployment watcher's (deployment_changed): the object returned by
        # this apply may be older than what it already wrote.
        await self._write_pool_status(pool, {"observedGeneration": gen, "endpoint": MP.endpoint(pool),
                                             "concurrency": spec.proxy.concurrency},
                                      [("Degraded", "False", "Reconciled", "children applied")])
        self.metrics.reconciles.labels("pool", "ok").inc()
        # The pool's inputs to patch Jobs (base model, family, max rank) may have changed.
        for adapter in await self._pool_adapters(ns, name):
            if not adapter["metadata"].get("deletionTimestamp"):
                try:
                    await self.reconcile_adapter(adapter, pool=pool)
                except RetryLater:
                    pass
        await self.push_pool(ns, name)

    async def pool_failed(self, pool: dict[str, Any], err: Exception) -> None:
        reason = type(err).__name__ if not isinstance(err, ApiError) else (err.reason or f"HTTP{err.status}")
        self.metrics.errors.labels("pool", reason).inc()
        try:
            await self._write_pool_status(pool, {}, [("Degraded", "True", reason, str(err))])
        except (ApiError, RetryLater):
            pass
        self.event(pool, "Warning", "ReconcileFailed", str(err))

    async def _ensure_token(self, pool: dict[str, Any]) -> str:
        """Apply the pool's admin-token Secret. The token is derived (pool_token), so the operator
        never reads a Secret back: it only creates/patches the pools' token Secrets."""
        token = pool_token(self.config.token_key, pool)
        await self.kube.apply(MP.admin_secret(pool, token))
        return token

    async def _token(self, ns: str, pool: str) -> str | None:
        obj = await self.kube.get_or_none(VLMPOOLS, pool, ns)
        return pool_token(self.config.token_key, obj) if obj is not None else None

    async def deployment_changed(self, dep: dict[str, Any]) -> None:
        """Copy the Deployment's replica counts into its pool's status."""
        owner = next((o for o in dep["metadata"].get("ownerReferences") or []
                      if o.get("kind") == "VLMPool" and o.get("controller")), None)
        if owner is None:
            return
        ns = dep["metadata"]["namespace"]
        pool = await self.kube.get_or_none(VLMPOOLS, owner["name"], ns)
        if pool is None or pool["metadata"]["uid"] != owner.get("uid"):
            return
        await self._write_pool_status(pool, *S.deployment_status(pool, dep))

    async def refresh_pool_status(self, ns: str, pool: str) -> None:
        """Re-read the pool's Deployment (heals a missed watch event; runs on the resync)."""
        obj = await self.kube.get_or_none(VLMPOOLS, pool, ns)
        if obj is None:
            return
        deps = [d for d in await self.kube.list(DEPLOYMENTS, ns, label_selector=server_label_selector(pool))
                if d["metadata"]["name"] == deployment_name(pool)]
        await self._write_pool_status(obj, *S.deployment_status(obj, deps[0] if deps else None))

    async def _write_pool_status(self, pool: dict[str, Any], fields: dict[str, Any],
                                 conds: list[tuple[str, str, str, str]] = ()) -> dict[str, Any]:
        """Set fields and conditions on the pool's current status with an optimistic lock."""
        meta = pool["metadata"]
        ns, name = meta["namespace"], meta["name"]
        for attempt in range(8):
            if attempt:
                fresh = await self.kube.get_or_none(VLMPOOLS, name, ns)
                if fresh is None:
                    return pool
                pool, meta = fresh, fresh["metadata"]
            cur = pool.get("status") or {}
            new = dict(cur)
            new.update(fields)
            for ctype, cstat, reason, message in conds:
                new["conditions"] = S.set_condition(new.get("conditions"), ctype, cstat, reason, message,
                                                    meta.get("generation"))
            diff = {k: v for k, v in new.items() if cur.get(k) != v}
            if not diff:
                return pool
            try:
                return await self.kube.patch(VLMPOOLS, name, {"metadata": {"resourceVersion": meta["resourceVersion"]},
                                                              "status": diff}, ns, subresource="status")
            except NotFound:
                return pool
            except Conflict:
                pass
        raise RetryLater(f"status of {ns}/{name} kept changing under the operator", delay=1)

    # ================================================================================================
    # Adapters: patch Jobs
    # ================================================================================================
    async def _pool_adapters(self, ns: str, pool: str) -> list[dict[str, Any]]:
        items = await self.kube.list(VLMADAPTERS, ns)
        return [a for a in items if ((a.get("spec") or {}).get("poolRef") or {}).get("name") == pool]

    async def _write_adapter_status(self, adapter: dict[str, Any], fields: dict[str, Any],
                                    conds: list[tuple[str, str, str, str]] = (),
                                    only_if: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Set `fields` and the conditions `(type, status, reason, message)` on the adapter's current
        status, recompute the phase, and patch with an optimistic lock (re-read and redo on a conflict),
        so concurrent writers (handlers, pushes) never undo each other. Posts an Event when the phase
        changes. `only_if(status)` may veto the write after a re-read."""
        meta = adapter["metadata"]
        ns, name = meta["namespace"], meta["name"]
        for attempt in range(8):
            if attempt:
                fresh = await self.kube.get_or_none(VLMADAPTERS, name, ns)
                if fresh is None:
                    return adapter
                adapter = fresh
                meta = adapter["metadata"]
            cur = adapter.get("status") or {}
            if only_if is not None and not only_if(cur):
                return adapter
            gen = meta.get("generation")
            new = dict(cur)
            new.update(fields)
            for ctype, cstat, reason, message in conds:
                new["conditions"] = S.set_condition(new.get("conditions"), ctype, cstat, reason, message, gen)
            new = S.with_phase(new, gen, bool(meta.get("deletionTimestamp")))
            diff = {k: v for k, v in new.items() if cur.get(k) != v}
            if not diff:
                return adapter
            try:
                out = await self.kube.patch(VLMADAPTERS, name, {
                    "metadata": {"resourceVersion": meta["resourceVersion"]}, "status": diff}, ns,
                    subresource="status")
            except NotFound:
                return adapter
            except Conflict:
                continue
            if cur.get("phase") != new["phase"]:
                type_ = "Warning" if new["phase"] == "Failed" else "Normal"
                self.event(out, type_, new["phase"] if new["phase"] != "Failed" else new["reason"], new["message"])
            return out
        raise RetryLater(f"status of {ns}/{name} kept changing under the operator", delay=1)

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

    # ================================================================================================
    # Adapters: deletion
    # ================================================================================================
    async def delete_adapter(self, adapter: dict[str, Any]) -> None:
        """Unload from every pod, remove the files, then return (kopf drops the finalizer).
        Raises RetryLater while something is still pending."""
        meta = adapter["metadata"]
        ns, name = meta["namespace"], meta["name"]
        await self._write_adapter_status(adapter, {})  # phase Deleting
        spec = MA.parse_spec(adapter)
        pool = await self.kube.get_or_none(VLMPOOLS, spec.pool_ref.name, ns)
        if pool is None or pool["metadata"].get("deletionTimestamp"):
            # The pool (and with it the pods and, for a created claim, the files) is gone.
            return
        summary = await self.push_pool(ns, pool["metadata"]["name"])
        served = MA.served_name(adapter)
        pending = summary.confirmed_without(served) if summary else []
        if pending:
            raise RetryLater(f"pods not yet confirmed the unload of {served}: {', '.join(pending)}", delay=3)
        if not (adapter.get("status") or {}).get("lastJob"):
            return  # nothing was ever written for it
        await self._stop_patch_jobs(adapter)
        job, created = await self.kube.create_if_absent(MA.cleanup_job(adapter, pool, image=self.config.patch_image,
                                                                 adapter_root=self.config.adapter_root), ns)
        if created:
            self.metrics.jobs_created.labels("cleanup").inc()
            self.event(adapter, "Normal", "CleanupJobCreated",
                       f"every pod unloaded {served}; Job {job['metadata']['name']} removes {name}/ from the volume")
        jst = job.get("status") or {}
        jconds = {c["type"] for c in jst.get("conditions") or [] if c.get("status") == "True"}
        if "Complete" in jconds or "SuccessCriteriaMet" in jconds:
            return
        if "Failed" in jconds or "FailureTarget" in jconds:
            self.event(adapter, "Warning", "CleanupFailed",
                       f"Job {job['metadata']['name']} failed; {name}/ may remain on the volume")
            return
        raise RetryLater(f"waiting for cleanup Job {job['metadata']['name']}", delay=2)

    async def _stop_patch_jobs(self, adapter: dict[str, Any]) -> None:
        """Delete the adapter's unfinished patch Jobs and wait until their pods stopped, so no patch
        publishes into the directory after the cleanup Job removed it."""
        meta = adapter["metadata"]
        ns = meta["namespace"]
        selector = f"{L_ADAPTER}={_label_value(meta['name'])},app.kubernetes.io/component=patch"
        for job in await self.kube.list(JOBS, ns, label_selector=selector):
            owners = {o.get("uid") for o in job["metadata"].get("ownerReferences") or []}
            jconds = {c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
            if meta["uid"] in owners and not jconds & {"Complete", "Failed"} and not job["metadata"].get("deletionTimestamp"):
                await self.kube.delete(JOBS, job["metadata"]["name"], ns, propagation="Background")
                self.event(adapter, "Normal", "PatchJobStopped", f"deleted the unfinished Job {job['metadata']['name']}")
        running = [p["metadata"]["name"] for p in await self.kube.list(PODS, ns, label_selector=selector)
                   if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        if running:
            raise RetryLater(f"waiting for patch pods to stop: {', '.join(running)}", delay=3)

    # ================================================================================================
    # Push
    # ================================================================================================
    async def pod_changed(self, pod: dict[str, Any], deleted: bool = False) -> None:
        """A pool pod changed: push when it (re)started since the last successful push to it."""
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        pool = (pod["metadata"].get("labels") or {}).get("vlmpool.io/pool")
        if not pool:
            return
        key = (ns, name)
        if deleted:
            self._pushed.pop(key, None)
            self._pod_ok.pop(key, None)
            await self.push_pool(ns, pool)  # refresh LOADED n/m
            return
        if pod_is_pushable(pod) and self._pushed.get(key) != pod_fingerprint(pod):
            await self.push_pool(ns, pool)

    async def push_pool(self, ns: str, pool: str) -> PushSummary | None:
        """Push the pool's full state to all its running pods. Concurrent callers share one push that
        starts after their call (so it reads their changes); pushes of one pool never overlap."""
        st = self._pushes.setdefault((ns, pool), _PoolPush())
        if st.pending is not None:
            return await asyncio.shield(st.pending)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        st.pending = fut
        try:
            async with st.lock:
                if st.pending is fut:
                    st.pending = None
                res = await self._push(ns, pool, st)
        except BaseException as e:
            # Also when cancelled while waiting: callers sharing this push must not wait forever.
            if st.pending is fut:
                st.pending = None
            if not fut.done():
                if isinstance(e, asyncio.CancelledError):
                    fut.cancel()
                else:
                    fut.set_exception(e)
            raise
        fut.set_result(res)
        return res

    async def _push(self, ns: str, pool_name: str, st: _PoolPush) -> PushSummary | None:
        pool = await self.kube.get_or_none(VLMPOOLS, pool_name, ns)
        if pool is None:
            return None
        spec = MP.parse_spec(pool)
        adapters = await self._pool_adapters(ns, pool_name)
        state, conflicts = MA.desired_state(spec.proxy.concurrency, adapters)
        all_pods = await self.kube.list(PODS, ns, label_selector=server_label_selector(pool_name))
        pods = sorted((p for p in all_pods if pod_is_pushable(p)), key=lambda p: p["metadata"]["name"])
        # A pod that runs but takes no pushes (terminating) may still serve an older version.
        unconfirmed = [p for p in all_pods if (p.get("status") or {}).get("phase") == "Running"
                       and not pod_is_pushable(p)]
        digest = hashlib.sha256(repr(state).encode()).hexdigest()
        persisted = int((pool.get("status") or {}).get("desiredStateGeneration") or 0)
        if st.digest != digest or st.generation < persisted:
            st.generation = max(st.generation, persisted) + (1 if st.digest != digest else 0)
            st.digest = digest
        results: dict[str, PodResult] = {}
        t0 = time.monotonic()
        if pods:
            token = await self._token(ns, pool_name)
            if token is None:
                results = {p["metadata"]["name"]: PodResult(p["metadata"]["name"], False,
                                                            error="admin token Secret missing") for p in pods}
            else:
                results = await self._push_round(pods, spec.proxy.admin_port, token, state, st)
        self.metrics.push_seconds.observe(time.monotonic() - t0)
        if st.generation != persisted:
            await self.kube.patch_status(VLMPOOLS, pool_name, {"desiredStateGeneration": st.generation}, ns)
        for pod in pods:
            r = results[pod["metadata"]["name"]]
            key = (ns, pod["metadata"]["name"])
            self.metrics.pushes.labels("ok" if r.ok else "error").inc()
            self.metrics.pod_push_seconds.observe(r.seconds)
            if r.ok:
                self._pushed[key] = pod_fingerprint(pod)
                if self._pod_ok.get(key) is False:
                    self.event(pool, "Normal", "PushRecovered", f"pod {r.pod} accepted generation {st.generation}")
            else:
                self._pushed.pop(key, None)
                if self._pod_ok.get(key) is not False:
                    self.event(pool, "Warning", "PushFailed", f"pod {r.pod}: {r.error}")
                log.warning("push %s/%s to pod %s failed: %s", ns, pool_name, r.pod, r.error)
            self._pod_ok[key] = r.ok
        failed = [r for r in results.values() if not r.ok]
        degraded = S.get_condition((pool.get("status") or {}).get("conditions") or [], "Degraded")
        if failed:
            self._schedule_retry(ns, pool_name, st)
            msg = "; ".join(f"{r.pod}: {r.error}" for r in failed)[:4000]
            await self._write_pool_status(pool, {}, [("Degraded", "True", "PushFailed",
                                                      f"{len(failed)}/{len(pods)} pods did not take the state: {msg}")])
        else:
            st.retry_delay = 1.0
            if degraded and degraded.get("reason") == "PushFailed":
                await self._write_pool_status(pool, {}, [("Degraded", "False", "PushSucceeded",
                                                          f"every running pod took generation {st.generation}")])
        pod_names = [p["metadata"]["name"] for p in pods]
        waiting = await self._record_loads(pool, adapters, state, conflicts, pod_names, results,
                                           can_prune=bool(pods) and not failed and not unconfirmed)
        if waiting:  # a prune waits for proxies to confirm unloads: ask again soon
            self._schedule_retry(ns, pool_name, st)
        return PushSummary(pool_name, st.generation, pod_names, results, state)

    async def _push_round(self, pods: list[dict[str, Any]], admin_port: int, token: str, state: dict[str, Any],
                          st: _PoolPush) -> dict[str, PodResult]:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        for _attempt in range(2):
            body = {"generation": st.generation, **state}
            out = await push_to_pods(pods, admin_port, token, body, timeout=self.config.push_timeout,
                                     parallelism=self.config.push_parallelism, session=self._http)
            newer = [r.conflict_generation for r in out if r.conflict_generation is not None]
            if not newer:
                break
            # A proxy holds a newer generation (pushed before an operator restart): go past it.
            st.generation = max(newer) + 1
        return {r.pod: r for r in out}

    async def _prune_superseded(self, pool: dict[str, Any], adapter: dict[str, Any]) -> None:
        """Every running pod serves the adapter's version (so none serves an older one any more):
        remove the older versions' directories, once per version."""
        meta = adapter["metadata"]
        ann = meta.get("annotations") or {}
        version = (adapter.get("status") or {}).get("version")
        if not version or not ann.get(A_SUPERSEDED) or ann.get(A_PRUNED) == version:
            return
        try:
            job, created = await self.kube.create_if_absent(MA.prune_job(
                adapter, pool, version, image=self.config.patch_image, adapter_root=self.config.adapter_root),
                meta["namespace"])
            await self.kube.patch(VLMADAPTERS, meta["name"], {"metadata": {"annotations": {
                A_PRUNED: version, A_SUPERSEDED: None}}}, meta["namespace"])
        except ApiError as e:
            log.warning("prune of %s/%s not started: %s", meta["namespace"], meta["name"], e)
            return
        if created:
            self.metrics.jobs_created.labels("prune").inc()
            self.event(adapter, "Normal", "PruneJobCreated",
                       f"every pod serves {version}; Job {job['metadata']['name']} removes the older versions")

    def _schedule_retry(self, ns: str, pool: str, st: _PoolPush) -> None:
        if st.retry_task is not None and not st.retry_task.done():
            return
        delay = st.retry_delay
        st.retry_delay = min(st.retry_delay * 2, max(2.0, self.config.resync_seconds))

        async def later() -> None:
            await asyncio.sleep(delay)
            try:
                await self.push_pool(ns, pool)
            except Exception:
                log.exception("retried push of %s/%s failed", ns, pool)

        st.retry_task = asyncio.get_running_loop().create_task(later())

    async def _record_loads(self, pool: dict[str, Any], adapters: list[dict[str, Any]], state: dict[str, Any],
                            conflicts: list[str], pods: list[str], results: dict[str, PodResult],
                            can_prune: bool = False) -> bool:
        """Write each adapter's per-pod status; prune superseded versions whose unload every proxy has
        confirmed. Returns True when a prune waits for such a confirmation."""
        waiting = False
        ns = pool["metadata"]["namespace"]
        pushed = {e["name"]: e for e in state["adapters"]}
        ready = failed = total = 0
        for adapter in adapters:
            meta = adapter["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            total += 1
            st = adapter.get("status") or {}
            served = MA.served_name(adapter)
            conds: list[tuple[str, str, str, str]] = []
            if meta["name"] in conflicts:
                owner = pushed.get(served)
                conds.append(("Loaded", "False", "ServedNameConflict",
                              f"another adapter of the pool already serves {served!r}"
                              + (f" (version {owner['version']})" if owner else "")))
                fields: dict[str, Any] = {"pods": [], "loadedPods": 0, "desiredPods": len(pods),
                                          "loaded": f"0/{len(pods)}"}
            elif st.get("version") and st.get("path"):
                entries, n, failures = S.pod_loads(served, st["version"], pods, results)
                conds.append(("Loaded", *S.loaded_condition(n, len(pods), failures)))
                fields = {"pods": entries, "loadedPods": n, "desiredPods": len(pods), "loaded": f"{n}/{len(pods)}"}
            else:
                fields = {"loadedPods": 0, "desiredPods": len(pods), "loaded": f"0/{len(pods)}"}
            pushed_version = st.get("version")
            try:
                # Only if the version is still the one this push carried (else the next push tells).
                new = await self._write_adapter_status(
                    adapter, fields, conds, only_if=lambda cur, v=pushed_version: cur.get("version") == v)
            except (ApiError, RetryLater) as e:
                log.warning("status of adapter %s/%s not written: %s", ns, meta["name"], e)
                continue
            phase = (new.get("status") or {}).get("phase")
            ready += phase == "Ready"
            failed += phase == "Failed"
            if phase == "Ready" and can_prune:
                pending = S.unloads_unconfirmed(served, pushed_version, pods, results)
                if pending:
                    waiting = waiting or bool((new.get("metadata", {}).get("annotations") or {}).get(A_SUPERSEDED))
                    log.info("prune of %s/%s waits for the unload on %s", ns, meta["name"], ", ".join(pending))
                else:
                    await self._prune_superseded(pool, new)
        counts = {"adapters": {"total": total, "ready": ready, "failed": failed}, "adaptersReady": f"{ready}/{total}"}
        cur = pool.get("status") or {}
        if cur.get("adapters") != counts["adapters"] or cur.get("adaptersReady") != counts["adaptersReady"]:
            try:
                await self.kube.patch_status(VLMPOOLS, pool["metadata"]["name"], counts, ns)
            except NotFound:
                pass
        return waiting


def pool_token(key: bytes, pool: dict[str, Any]) -> str:
    """The admin token of a pool: HMAC-SHA256 of its identity (namespace, name, uid) under the
    operator's key. A re-created pool (new uid) gets a new token; nobody without the key can derive
    another pool's token from one they can read."""
    meta = pool["metadata"]
    ident = f"vlmpool-admin-token/v1\n{meta['namespace']}\n{meta['name']}\n{meta['uid']}".encode()
    return hmac.new(key, ident, hashlib.sha256).hexdigest()


def _label_value(name: str) -> str:
    return name[:63].rstrip("-.")


def _parse_time(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    try:
        return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def _duration(start: str | None, end: str | None) -> float | None:
    a, b = _parse_time(start), _parse_time(end)
    return (b - a).total_seconds() if a and b else None
