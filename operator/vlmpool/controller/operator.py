"""kopf wiring of the operator: settings, handlers, login, health and metrics endpoints.

Handlers are registered on a fresh ``kopf.OperatorRegistry`` per operator instance (no global state),
so several instances can run in one process (tests restart the operator mid-way).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vlmpool.api.objects import Adapter, Pool
from vlmpool.controller.leader import LeaderElector
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.controller.reconciler import Controller, OperatorConfig, RetryLater
from vlmpool.kube.client import KubeClient
from vlmpool.kube.config import KubeConfig
from vlmpool.manifests.common import (
    COMPONENT_CLEANUP,
    COMPONENT_PATCH,
    COMPONENT_SERVER,
    L_COMPONENT,
    L_MANAGED_BY,
    MANAGED_BY,
)
from vlmpool.names import ADAPTER_PLURAL, GROUP, POOL_PLURAL, VERSION

log = logging.getLogger("vlmpool.operator")

FINALIZER = "vlmpool.io/finalizer"
PREFIX = GROUP
REPORTING_COMPONENT = "vlmpool-operator"  # the Events' source, as `kubectl describe` shows it


def make_settings() -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    # Our own finalizer and annotation-only storages: the CRDs' status schema is strict (no
    # status.kopf), and the names say whose they are.
    s.persistence.finalizer = FINALIZER
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX,
                                                                     key="last-handled-configuration")
    # Watch streams can hang silently; reconnect periodically (resumes from the resourceVersion).
    s.watching.server_timeout = 300
    s.watching.client_timeout = 330
    s.watching.connect_timeout = 30
    s.watching.reconnect_backoff = 1.0
    s.networking.request_timeout = 60
    s.networking.connect_timeout = 30
    # Only explicit events (kopf.event/warn) are posted, never every log line.
    s.posting.enabled = True
    s.posting.loggers = False
    s.posting.reporting_component = REPORTING_COMPONENT
    s.posting.reporting_instance = (os.environ.get("POD_NAME") or socket.gethostname())[:128]
    s.posting.event_name_prefix = "vlmpool-"
    # No dynamic discovery of namespaces/CRDs: the operator serves the namespaces it is given and
    # needs no RBAC on namespaces or CRDs.
    s.scanning.disabled = True
    s.execution.max_workers = 4
    return s


@dataclass
class Operator:
    """One operator instance: kube client, controller, kopf registry and the HTTP endpoints."""

    kube_config: KubeConfig
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    config: OperatorConfig = field(default_factory=OperatorConfig)
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 8080

    def __post_init__(self) -> None:
        self.metrics = OperatorMetrics()
        self.registry = kopf.OperatorRegistry()
        self.ready = asyncio.Event()
        self.bound_port: int | None = None
        self.leader: LeaderElector | None = None
        self._register()

    # ---- handlers ----------------------------------------------------------------------------------
    def _register(self) -> None:  # noqa: C901 - the handler table
        reg = self.registry
        op = self
        resync = self.config.resync_seconds

        @kopf.on.login(registry=reg)
        async def login(**_: Any) -> kopf.ConnectionInfo:
            # kopf logs in at start, when the expiration handed to it passes, and after a 401 (then
            # the credentials it held were refused: renew them unless they are brand new).
            return await op.kube_config.kopf_connection_info(renew_older_than=5.0)

        @kopf.on.startup(registry=reg)
        async def startup(**_: Any) -> None:
            log.info("vlmpool operator starting (%s)", ", ".join(op.namespaces) or "all namespaces")

        async def guarded(kind: str, run: Callable[[], Awaitable[object]]) -> None:
            # `run` is called inside the try: a spec that fails to parse is reported like any error.
            try:
                await run()
            except RetryLater as e:
                raise kopf.TemporaryError(str(e), delay=e.delay) from None
            except Exception as e:
                op.metrics.errors.labels(kind, type(e).__name__).inc()
                op.metrics.reconciles.labels(kind, "error").inc()
                raise kopf.TemporaryError(f"{type(e).__name__}: {e}", delay=5) from e

        # Pools
        @kopf.on.resume(GROUP, VERSION, POOL_PLURAL, registry=reg)
        @kopf.on.create(GROUP, VERSION, POOL_PLURAL, registry=reg)
        @kopf.on.update(GROUP, VERSION, POOL_PLURAL, registry=reg, field="spec")
        async def pool_reconcile(body: kopf.Body, **_: Any) -> None:
            pool = dict(body)
            try:
                await op.controller.pools.reconcile(Pool.parse(pool))  # the pool's spec is validated here
            except RetryLater as e:
                raise kopf.TemporaryError(str(e), delay=e.delay) from None
            except Exception as e:
                await op.controller.pools.failed(pool, e)
                op.metrics.reconciles.labels("pool", "error").inc()
                raise kopf.TemporaryError(f"{type(e).__name__}: {e}", delay=10) from e

        @kopf.timer(GROUP, VERSION, POOL_PLURAL, registry=reg, interval=resync, initial_delay=resync, idle=None)
        async def pool_resync(body: kopf.Body, **_: Any) -> None:
            ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
            await guarded("pool", lambda: op.controller.pools.refresh_status(ns, name))
            await guarded("pool", lambda: op.controller.pusher.push_pool(ns, name))

        @kopf.on.event("apps", "v1", "deployments", registry=reg,
                       labels={L_MANAGED_BY: MANAGED_BY, L_COMPONENT: COMPONENT_SERVER})
        async def deployment_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            if type != "DELETED":
                await op.controller.pools.deployment_changed(dict(body))

        @kopf.on.event("", "v1", "pods", registry=reg,
                       labels={L_MANAGED_BY: MANAGED_BY, L_COMPONENT: COMPONENT_SERVER})
        async def pod_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            try:
                if type != "DELETED":
                    await op.controller.pools.pod_scheduling_changed(dict(body))
            except Exception:
                log.exception("the pool's Stalled condition after a pod change failed (the resync will retry)")
            try:
                await op.controller.pusher.pod_changed(dict(body), deleted=type == "DELETED")
            except Exception:
                log.exception("push after a pod change failed (the resync will retry)")

        # Adapters
        @kopf.on.resume(GROUP, VERSION, ADAPTER_PLURAL, registry=reg)
        @kopf.on.create(GROUP, VERSION, ADAPTER_PLURAL, registry=reg)
        @kopf.on.update(GROUP, VERSION, ADAPTER_PLURAL, registry=reg, field="spec")
        async def adapter_reconcile(body: kopf.Body, **_: Any) -> None:
            await guarded("adapter", lambda: op.controller.adapters.reconcile(Adapter.parse(dict(body))))

        @kopf.timer(GROUP, VERSION, ADAPTER_PLURAL, registry=reg, interval=resync, initial_delay=resync, idle=None)
        async def adapter_resync(body: kopf.Body, **_: Any) -> None:
            if not body["metadata"].get("deletionTimestamp"):
                await guarded("adapter", lambda: op.controller.adapters.reconcile(Adapter.parse(dict(body))))

        @kopf.on.delete(GROUP, VERSION, ADAPTER_PLURAL, registry=reg, id="adapter-delete")
        async def adapter_delete(body: kopf.Body, **_: Any) -> None:
            await guarded("adapter", lambda: op.controller.deleter.delete(Adapter.parse(dict(body))))

        @kopf.on.event("batch", "v1", "jobs", registry=reg,
                       labels={L_MANAGED_BY: MANAGED_BY, L_COMPONENT: COMPONENT_PATCH})
        async def job_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            # type None: kopf's listing at start (or after a lost watch), not a change. Each adapter's own
            # resume reads its Job's result then, so reading every listed Job's adapter again would
            # double an operator restart's reads (at 500 adapters: 500 GETs); a listed Job that is
            # finished still frees its slot.
            try:
                if type is None:
                    await op.controller.adapters.free_job_slot(dict(body))
                elif type != "DELETED":
                    await op.controller.adapters.job_changed(dict(body))
            except Exception:
                log.exception("reading a patch Job's result failed (the adapter resync will retry)")

        @kopf.on.event("", "v1", "pods", registry=reg,
                       labels={L_MANAGED_BY: MANAGED_BY, L_COMPONENT: COMPONENT_PATCH})
        async def patch_pod_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            # Listed pods (type None) are left to their Jobs' events and the adapters' resume.
            if type is not None and type != "DELETED":
                try:
                    await op.controller.adapters.patch_pod_changed(dict(body))
                except Exception:
                    log.exception("reading a patch pod's result failed (its Job's completion will retry)")

        _ = (COMPONENT_CLEANUP, startup, pool_reconcile, pool_resync, deployment_event, pod_event,
             adapter_reconcile, adapter_resync, adapter_delete, job_event, patch_pod_event, login)

    # ---- endpoints ---------------------------------------------------------------------------------
    async def _serve_http(self) -> web.AppRunner | None:
        if self.metrics_port is None:
            return None

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            if self.leader is not None:
                # With leader election a follower is ready too (it serves its endpoints and stands
                # by), so a rolling update of the replicas can proceed.
                role = "leader" if self.leader.is_leader else "follower"
                status = "ready" if self.ready.is_set() else ("starting" if role == "leader" else "standby")
                return web.json_response({"status": status, "role": role, "identity": self.leader.identity})
            if self.ready.is_set():
                return web.json_response({"status": "ready"})
            return web.json_response({"status": "starting"}, status=503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.metrics_host, self.metrics_port)
        await site.start()
        self.bound_port = runner.addresses[0][1] if runner.addresses else self.metrics_port
        return runner

    async def run(self, stop_flag: asyncio.Event | threading.Event | None = None,
                  leader: LeaderElector | None = None) -> bool:
        """Run until stop_flag is set. With a leader elector: serve the endpoints at once, wait to
        acquire the Lease, run kopf while leading; returns False when leadership was lost (the caller
        exits non-zero and is restarted as a follower), True otherwise."""
        # The client and controller live exactly as long as kopf (whose timers may still fire
        # during its own shutdown), so they are closed after kopf.operator returns.
        self.kube = KubeClient(self.kube_config)
        self.controller = Controller(self.kube, self.config, self.metrics, event=_post_event)
        self.leader = leader
        self.metrics.leader.set(0 if leader is not None else 1)
        runner = await self._serve_http()
        try:
            if leader is None:
                await self._run_kopf(stop_flag)
                return True
            return await self._run_leading(leader, stop_flag)
        finally:
            if runner is not None:
                await runner.cleanup()
            await self.controller.close()
            await self.kube.close()

    async def _run_kopf(self, stop_flag: asyncio.Event | threading.Event | None) -> None:
        ready_flag = asyncio.Event()

        async def mark_ready() -> None:
            await ready_flag.wait()
            self.ready.set()
            self.metrics.ready.set(1)
            log.info("vlmpool operator ready")

        marker = asyncio.create_task(mark_ready())
        try:
            await kopf.operator(
                registry=self.registry,
                settings=make_settings(),
                standalone=True,
                clusterwide=not self.namespaces,
                namespaces=self.namespaces,
                ready_flag=ready_flag,
                stop_flag=stop_flag,
            )
        finally:
            marker.cancel()
            self.ready.clear()
            self.metrics.ready.set(0)

    async def _run_leading(self, leader: LeaderElector,
                           stop_flag: asyncio.Event | threading.Event | None) -> bool:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_mirror(stop_flag, stop))
        try:
            log.info("vlmpool operator %s: waiting to lead (lease %s/%s)", leader.identity, leader.namespace,
                     leader.name)
            if not await leader.acquire(stop):
                return True
            self.metrics.leader.set(1)
            kopf_stop = asyncio.Event()
            kopf_task = asyncio.create_task(self._run_kopf(kopf_stop))
            renew_task = asyncio.create_task(leader.keep_leading())
            stop_task = asyncio.create_task(stop.wait())
            await asyncio.wait({kopf_task, renew_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            lost = renew_task.done()
            stop_task.cancel()
            kopf_stop.set()
            if lost:
                log.error("vlmpool operator %s: lost the leader lease; stopping", leader.identity)
                self.metrics.leader.set(0)
            try:
                if lost:
                    # Another replica may lead already: give kopf only a short while to stop.
                    try:
                        await asyncio.wait_for(asyncio.shield(kopf_task), leader.renew_deadline)
                    except TimeoutError:
                        kopf_task.cancel()
                        await asyncio.gather(kopf_task, return_exceptions=True)
                else:
                    await kopf_task  # still renewing while kopf shuts down
            finally:
                if not renew_task.done():
                    renew_task.cancel()
                    await asyncio.gather(renew_task, return_exceptions=True)
                self.metrics.leader.set(0)
                if not lost:
                    await leader.release()
            return not lost
        finally:
            watcher.cancel()


async def _mirror(flag: asyncio.Event | threading.Event | None, into: asyncio.Event) -> None:
    """Set `into` once `flag` (an asyncio or a threading event) is set."""
    if flag is None:
        return
    if isinstance(flag, asyncio.Event):
        await flag.wait()
    else:
        # A threading.Event cannot be awaited; a thread blocked in wait() would outlive a cancellation.
        while not flag.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    into.set()


def _post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message)  # kopf reads it as a mapping
