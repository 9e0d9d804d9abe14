"""Push: the pool's full desired state to all its running pods, one push per pool at a time; the
adapters' per-pod status from the results; prune Jobs for superseded versions.

The proxies accept a push at once and converge in the background. While some pod has not converged,
the pool's progress is followed by long polls (``GET /admin/v1/state?wait=S&generation=G``, at most
``push_parallelism`` pods at once, one round at a time): each round costs one list of the pool's pods
and adapters and at most one status write per adapter whose status changed (never one per adapter and
pod), and ends early when the proxies converge. Polling (not being told) keeps the proxy free of any
credential or route towards the operator and works through the same admin port and NetworkPolicy."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vlmpool.api.objects import Adapter, Pool
from vlmpool.api.pool import AdapterCounts, VLMPoolStatus
from vlmpool.controller import decisions as D
from vlmpool.controller import status as S
from vlmpool.controller.common import Events, OperatorConfig, RetryLater, pool_adapters, pool_token
from vlmpool.controller.health import PoolHealth
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.controller.push import PodResult, pod_fingerprint, pod_is_pushable, push_to_pods
from vlmpool.controller.statuswriter import OwnedStatus
from vlmpool.kube.client import DEPLOYMENTS, PODS, REPLICASETS, VLMADAPTERS, VLMPOOLS, ApiError, KubeClient, NotFound
from vlmpool.manifests import adapter as MA
from vlmpool.manifests.common import A_PRUNED, A_SUPERSEDED, deployment_name, server_label_selector
from vlmpool.names import POOL_KIND

log = logging.getLogger("vlmpool.operator")


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
    follow_task: asyncio.Task | None = None  # long polls of the pods' convergence
    # (pool uid, uids of the ReplicaSets its own Deployment controls, uids of the ReplicaSets pods named
    # then, monotonic time), as last read from the apiserver
    trusted_rs: tuple[str, frozenset[str], frozenset[str], float] | None = None
    untrusted_seen: set[str] = field(default_factory=set)  # uids of labelled pods not of that chain (warned)


class Pusher:
    """Pushes each pool's state to its pods, one push per pool at a time, and records the outcome: the
    adapters' Loaded and per-pod status, the pool's adapter counts and CPU cache condition, its health."""

    def __init__(self, kube: KubeClient, config: OperatorConfig, metrics: OperatorMetrics, events: Events,
                 status: OwnedStatus, health: PoolHealth):
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.events = events
        self.status = status
        self.health = health
        self._pushes: dict[tuple[str, str], _PoolPush] = {}
        self._pushed: dict[tuple[str, str], str] = {}  # (ns, pod) -> fingerprint last pushed OK
        self._pod_ok: dict[tuple[str, str], bool] = {}  # (ns, pod) -> last push succeeded (for events)
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        for st in self._pushes.values():
            for task in (st.retry_task, st.follow_task):
                if task is not None and not task.done():
                    task.cancel()
        if self._http is not None:
            await self._http.close()

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

    async def _token(self, ns: str, pool: str) -> str | None:
        obj = await self.kube.get_or_none(VLMPOOLS, pool, ns)
        return pool_token(self.config.token_key, obj) if obj is not None else None

    def _follow(self, ns: str, pool: str, st: _PoolPush) -> None:
        """Follow the pods' convergence until every pod converged (or the pool went)."""
        if st.follow_task is not None and not st.follow_task.done():
            return

        async def follow() -> None:
            while True:
                try:
                    async with st.lock:
                        summary = await self._push(ns, pool, st, poll=True)
                except Exception:
                    log.exception("following the convergence of %s/%s failed", ns, pool)
                    summary = None
                # done when all converged; a pod that failed is the push retry's (it follows again)
                if summary is None or all(r.converged or not r.ok for r in summary.results.values()):
                    return

        st.follow_task = asyncio.get_running_loop().create_task(follow())

    async def _push(self, ns: str, pool_name: str, st: _PoolPush, poll: bool = False) -> PushSummary | None:
        raw = await self.kube.get_or_none(VLMPOOLS, pool_name, ns)
        if raw is None:
            return None
        pool = Pool.parse(raw)
        spec = pool.spec
        adapters = await pool_adapters(self.kube, ns, pool_name)
        # a recorded version the proxies would refuse is left out for its adapter alone
        invalid = D.left_out_of_push(adapters, spec.served_name(), self.config.adapter_root)
        state, conflicts = MA.desired_state(spec.proxy.concurrency, [a for a in adapters if a.name not in invalid])
        state["load_parallelism"] = spec.engine.load_parallelism
        all_pods = await self._own_pods(pool, await self.kube.list(
            PODS, ns, label_selector=server_label_selector(pool_name)), st)
        pods = sorted((p for p in all_pods if pod_is_pushable(p)), key=lambda p: p["metadata"]["name"])
        # A pod that runs but takes no pushes (terminating) may still serve an older version.
        unconfirmed = [p for p in all_pods if (p.get("status") or {}).get("phase") == "Running"
                       and not pod_is_pushable(p)]
        digest = hashlib.sha256(repr(state).encode()).hexdigest()
        persisted = int(pool.status.get("desiredStateGeneration") or 0)
        generation = D.push_generation(st.digest, st.generation, digest, persisted)
        poll = poll and generation == st.generation  # a changed state is pushed, not polled
        st.generation, st.digest = generation, digest
        results: dict[str, PodResult] = {}
        t0 = time.monotonic()
        if pods:
            token = await self._token(ns, pool_name)
            if token is None:
                results = {p["metadata"]["name"]: PodResult(p["metadata"]["name"], False,
                                                            error="admin token Secret missing") for p in pods}
            else:
                results = await self._push_round(pods, spec.proxy.admin_port, token, state, st,
                                                 poll_wait=self.config.progress_wait if poll else None)
        self.metrics.push_seconds.observe(time.monotonic() - t0)
        if st.generation != persisted:
            await self.status.pool_fields(ns, pool_name, VLMPoolStatus(desired_state_generation=st.generation))
        for pod in pods:
            r = results[pod["metadata"]["name"]]
            key = (ns, pod["metadata"]["name"])
            self.metrics.pushes.labels("ok" if r.ok else "error").inc()
            self.metrics.pod_push_seconds.observe(r.seconds)
            if r.ok:
                self._pushed[key] = pod_fingerprint(pod)
                if self._pod_ok.get(key) is False:
                    self.events(pool.obj, "Normal", "PushRecovered", f"pod {r.pod} accepted generation {st.generation}")
            else:
                self._pushed.pop(key, None)
                if self._pod_ok.get(key) is not False:
                    self.events(pool.obj, "Warning", "PushFailed", f"pod {r.pod}: {r.error}")
                log.warning("push %s/%s to pod %s failed: %s", ns, pool_name, r.pod, r.error)
            self._pod_ok[key] = r.ok
        failed = [r for r in results.values() if not r.ok]
        if failed:
            self._schedule_retry(ns, pool_name, st)
            await self.health.push_failed(pool.obj, len(failed), len(pods),
                                          "; ".join(f"{r.pod}: {r.error}" for r in failed)[:4000])
        else:
            st.retry_delay = 1.0
            await self.health.push_succeeded(pool.obj, st.generation)
        pod_names = [p["metadata"]["name"] for p in pods]
        waiting = await self._record_loads(pool, adapters, state, conflicts, pod_names, results,
                                           can_prune=bool(pods) and not failed and not unconfirmed, invalid=invalid)
        if waiting:  # a prune waits for proxies to confirm unloads: ask again soon
            self._schedule_retry(ns, pool_name, st)
        if not poll and any(r.ok and not r.converged for r in results.values()):
            self._follow(ns, pool_name, st)
        return PushSummary(pool_name, st.generation, pod_names, results, state)

    async def _own_pods(self, pool: Pool, pods: list[dict[str, Any]], st: _PoolPush) -> list[dict[str, Any]]:
        """The pods of `pods` (listed by the pool's labels) that the pool's own ReplicaSet chain made: their
        controller is a ReplicaSet controlled by the pool's Deployment, itself controlled by the pool (uids
        all matching). Only those get the pool's admin token and state; a pod that merely carries the labels
        gets nothing, and the pool gets one Warning Event per such pod.

        The chain is read (one list of the pool's Deployment by name, one of the pool's ReplicaSets) only
        when a pod names a ReplicaSet not seen at the last read, or, while some pod names one found not to
        be the pool's (a forged or adopted pod), at most once per resync period: none in steady state, at
        most one per push round."""
        uid = pool.metadata.get("uid") or ""

        def rs_uid(p: dict[str, Any]) -> str | None:
            o = D.controller_owner(p, "ReplicaSet")
            return o.get("uid") if o else None

        named = frozenset(u for p in pods if (u := rs_uid(p)))
        last = st.trusted_rs
        now = time.monotonic()
        if (last is None or last[0] != uid or not named <= last[1] | last[2]
                or (not named <= last[1] and now - last[3] >= self.config.resync_seconds)):
            last = st.trusted_rs = (uid, await self._pool_replicasets(pool), named, now)
            log.debug("pool %s/%s: ReplicaSet chain read (%d of the %d named are its Deployment's)", pool.namespace,
                      pool.name, len(named & last[1]), len(named))
        trusted = last[1]
        own: list[dict[str, Any]] = []
        forged: list[dict[str, Any]] = []
        for p in pods:
            (own if rs_uid(p) in trusted else forged).append(p)
        seen = {p["metadata"].get("uid", "") for p in forged}
        for p in forged:
            if p["metadata"].get("uid", "") in st.untrusted_seen:
                continue
            owner = next((f"{o.get('kind')} {o.get('name')}" for o in p["metadata"].get("ownerReferences") or []
                          if o.get("controller")), "no controller")
            self.metrics.errors.labels("pool", "UntrustedPod").inc()
            log.warning("pool %s/%s: pod %s carries its labels but is not its Deployment's (%s): not pushed to",
                        pool.namespace, pool.name, p["metadata"]["name"], owner)
            self.events(pool.obj, "Warning", "UntrustedPod",
                       f"pod {p['metadata']['name']} carries the pool's labels but is not a pod of its Deployment "
                       f"({owner}): it gets neither the admin token nor the state")
        st.untrusted_seen = seen  # bounded by the pods listed now
        return own

    async def _pool_replicasets(self, pool: Pool) -> frozenset[str]:
        """Uids of the ReplicaSets controlled by the pool's Deployment, when that Deployment is controlled by
        the pool (same uid)."""
        ns, uid = pool.namespace, pool.metadata.get("uid")
        deps = await self.kube.list(DEPLOYMENTS, ns, field_selector=f"metadata.name={deployment_name(pool.name)}")
        dep_uids = {d["metadata"]["uid"] for d in deps
                    if (o := D.controller_owner(d, POOL_KIND)) is not None and o.get("uid") == uid}
        if not dep_uids:
            return frozenset()
        rss = await self.kube.list(REPLICASETS, ns, label_selector=server_label_selector(pool.name))
        return frozenset(r["metadata"]["uid"] for r in rss
                         if (o := D.controller_owner(r, "Deployment")) is not None and o.get("uid") in dep_uids)

    async def _push_round(self, pods: list[dict[str, Any]], admin_port: int, token: str, state: dict[str, Any],
                          st: _PoolPush, poll_wait: float | None = None) -> dict[str, PodResult]:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        for _attempt in range(2):
            body = {"generation": st.generation, **state}
            out = await push_to_pods(pods, admin_port, token, body, timeout=self.config.push_timeout,
                                     parallelism=self.config.push_parallelism, session=self._http,
                                     poll_wait=poll_wait)
            newer = [r.conflict_generation for r in out if r.conflict_generation is not None]
            if not newer:
                break
            # A proxy holds a newer generation (pushed before an operator restart): go past it.
            st.generation = max(newer) + 1
        return {r.pod: r for r in out}

    async def _prune_superseded(self, pool: Pool, adapter: Adapter) -> None:
        """Every running pod serves the adapter's version (so none serves an older one any more):
        remove the older versions' directories, once per version."""
        meta = adapter.metadata
        ann = meta.get("annotations") or {}
        version = adapter.status.get("version")
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
            self.events(adapter.obj, "Normal", "PruneJobCreated",
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

    async def _record_loads(self, pool: Pool, adapters: list[Adapter], state: dict[str, Any],
                            conflicts: list[str], pods: list[str], results: dict[str, PodResult],
                            can_prune: bool = False, invalid: dict[str, str] | None = None) -> bool:
        """Write each adapter's per-pod status; prune superseded versions whose unload every proxy has
        confirmed. Returns True when a prune waits for such a confirmation."""
        waiting = False
        ns = pool.namespace
        pushed = {e["name"]: e for e in state["adapters"]}
        ready = failed = total = 0
        for adapter in adapters:
            meta = adapter.metadata
            if meta.get("deletionTimestamp"):
                continue
            total += 1
            served = adapter.served_name
            fields, conds = D.adapter_loads(adapter, conflicts, pushed, pods, results, invalid)
            pushed_version = adapter.status.get("version")
            try:
                # Only if the version is still the one this push carried (else the next push tells).
                new = await self.status.adapter(adapter.obj, fields, conds, only_if=D.version_is(pushed_version))
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
                    await self._prune_superseded(pool, adapter.with_obj(new))
        tally = AdapterCounts(total=total, ready=ready, failed=failed)
        counts = VLMPoolStatus(adapters=tally, adapters_ready=f"{ready}/{total}")
        cur = pool.status
        eng = pool.spec.engine
        cache = D.cpu_cache_condition(ready, eng.max_cpu_loras, eng.max_loras)
        was = next((c for c in cur.get("conditions") or [] if c.get("type") == cache[0]), None)
        if was is None or was.get("status") != cache[1] or was.get("message") != cache[3]:
            # one status write with the counts; an Event on a transition only (not on every count change)
            try:
                await self.status.pool(pool.obj, counts, [cache])
            except (ApiError, RetryLater) as e:
                log.warning("status of pool %s/%s not written: %s", ns, pool.name, e)
            if cache[1] == "True" and (was or {}).get("status") != "True":
                self.events(pool.obj, "Warning", cache[2], cache[3])
            elif cache[1] == "False" and (was or {}).get("status") == "True":
                self.events(pool.obj, "Normal", cache[2], cache[3])
        elif cur.get("adapters") != tally.model_dump() or cur.get("adaptersReady") != counts.adapters_ready:
            try:
                await self.status.pool_fields(ns, pool.name, counts)
            except NotFound:
                pass
        return waiting


