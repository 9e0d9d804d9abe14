"""The adapter registry: desired state, routing, swaps, drains, self-heal (the background convergence
is converge.py's; the pushed state's form and validation vlmpool/adminwire.py's).

Names:
- served name: what clients put in ``model`` (the VLMAdapter's name);
- internal name: ``<served>@<version>``, the LoRA name the engine knows. A version's internal name
  never changes meaning (the version is a content digest), so a swap is: load the new internal name,
  flip the served name's alias to it, and unload the old internal name once the requests that were
  routed to it have finished. Routing a request (alias lookup + in-flight count) happens in one
  synchronous step, so a request is answered by exactly one version and a version is never unloaded
  under a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from vlmpool.adminwire import AdapterEntry, AdapterProgress, DesiredState, StateSnapshot, VersionRef, internal_name
from vlmpool.vllm_contract import ENGINE_DEAD_TEXT

from .converge import LOAD_ATTEMPTS, REASON_CHARS, Converger, LoadedVersion, reason
from .engine import EngineClient, EngineHTTPError, EngineUnavailable
from .logs import REQUEST_ID, get_logger
from .metrics import ProxyMetrics

__all__ = ["AdapterEntry", "AdapterRegistry", "DesiredState", "LoadedVersion", "Unavailable", "internal_name"]

log = get_logger("state")


class Unavailable(Exception):
    """A desired adapter has no loaded version to serve (loading, or its load failed)."""


class AdapterRegistry(Converger):
    """Desired state, routing aliases, and the background converger.

    ``apply`` only records a push (it never waits for the engine); a planner task compares the desired
    state with the engine's adapter list and queues what is missing; ``load_parallelism`` loader tasks
    take served names from that FIFO queue, one loader per name at a time, and every engine call for one
    internal name (load, unload, self-heal re-load) holds that name's lock, so no adapter is ever loaded
    twice at once or unloaded under a load."""

    def __init__(
        self,
        engine: EngineClient,
        metrics: ProxyMetrics,
        *,
        base_model: Callable[[], str | None],
        on_concurrency: Callable[[int], None],
        concurrency: Callable[[], int],
        load_parallelism: int = 4,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self._base_model = base_model
        self._on_concurrency = on_concurrency
        self._concurrency = concurrency
        self.generation: int | None = None  # newest accepted (observed) generation
        self.converged_generation: int | None = None  # newest generation whose convergence finished
        self.load_parallelism = load_parallelism
        self._default_parallelism = load_parallelism
        self.desired: dict[str, AdapterEntry] = {}
        self.alias: dict[str, LoadedVersion] = {}
        self.versions: dict[str, LoadedVersion] = {}  # internal -> loaded version (serving or draining)
        self.status: dict[str, dict] = {}  # served -> state of the desired version (pending/loading/loaded/failed)
        self.refused: dict[str, str] = {}  # served -> why the pushed entry was refused (never loaded)
        self._request_id: str | None = None  # the accepted push's request id (its loads carry it)
        self._queue: dict[str, None] = {}  # served names waiting for a loader (FIFO, no duplicates)
        self._active: set[str] = set()  # served names a loader works on now
        self._again: set[str] = set()  # queued again while a loader worked on them
        self._work = asyncio.Event()
        self._plan_wake = asyncio.Event()
        self._planning = False
        self._planner: asyncio.Task | None = None
        self._workers: dict[int, asyncio.Task] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # internal name -> lock of its engine calls
        self._progress = asyncio.Event()  # replaced after each convergence change (long-poll waiters)
        self._heals: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task] = set()
        self._transient: set[str] = set()  # desired adapters whose last load met an unreachable engine
        self._retry_task: asyncio.Task | None = None
        self.leftovers_reconciled = False  # the engine's adapters from an earlier proxy process were checked
        # internal name -> why the engine died at its first use: never loaded again by this proxy
        self.first_use_failures: dict[str, str] = {}
        self.accepted_at: float | None = None
        self.converge_seconds: float | None = None  # accept -> converged of the last converged generation
        # when this proxy first converged (every adapter of a pushed state loaded or refused): the pod is Ready
        # only from then on, so a rolling pod never answers 404 for an adapter the pool serves
        self.first_converged_at: float | None = None
    # -- request path (synchronous: no await between lookup and count) -------------------------
    def is_desired(self, served: str) -> bool:
        return served in self.desired

    def acquire(self, served: str) -> LoadedVersion:
        """Route one request: the version the alias points at now, counted as in flight."""
        v = self.alias.get(served)
        if v is None:
            st = self.status.get(served)
            reason = (st or {}).get("reason") or "adapter is being loaded"
            raise Unavailable(f"adapter {served!r} has no loaded version: {reason}")
        v.inflight += 1
        return v

    def release(self, v: LoadedVersion) -> None:
        v.inflight -= 1
        if v.inflight <= 0 and v.retired:
            v.drained.set()

    def served_names(self) -> list[str]:
        return sorted(self.alias)

    # -- self-heal ----------------------------------------------------------------------------
    async def heal(self, served: str, failed: LoadedVersion) -> LoadedVersion | None:
        """The engine forgot ``failed``. Re-load the version the served name points at now (the same
        one unless a swap happened meanwhile) and return it counted as in flight, or None when the
        adapter is no longer desired or the re-load failed. ``failed`` stays counted (the caller
        releases it)."""
        target = self.alias.get(served)
        if target is None:
            return None
        task = self._heals.get(target.internal)
        if task is None:
            task = asyncio.create_task(self._reload(target, REQUEST_ID.get()))
            self._heals[target.internal] = task
            key = target.internal
            task.add_done_callback(lambda _t: self._heals.pop(key, None))
        try:
            await asyncio.shield(task)
        except (EngineHTTPError, EngineUnavailable) as e:
            self.metrics.self_heals.labels(served, "failure").inc()
            log.warning("self-heal failed", extra={"adapter": target.internal, "error": str(e)[:REASON_CHARS]})
            return None
        self.metrics.self_heals.labels(served, "success").inc()
        if self.alias.get(served) is not target:  # swapped while we re-loaded: route to the current one
            target = self.alias.get(served)
            if target is None:
                return None
        target.inflight += 1
        return target

    async def _reload(self, v: LoadedVersion, request_id: str | None) -> None:
        log.warning("engine forgot a desired adapter; re-loading it", extra={"adapter": v.internal})
        try:
            async with self._engine_lock(v.internal):
                await self._load(v.served, v.internal, v.path, request_id)
        except (EngineHTTPError, EngineUnavailable) as e:
            if self.alias.get(v.served) is v:
                self.status[v.served] = {
                    "name": v.served, "version": v.version, "state": "failed",
                    "reason": f"re-load after the engine forgot it failed: {reason(e)}",
                }
            raise

    async def _load(self, served: str, internal: str, path: str, request_id: str | None) -> None:
        delay = 0.2
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            try:
                await self.engine.load_lora(internal, path, request_id)
            except EngineUnavailable as e:
                if attempt == LOAD_ATTEMPTS:
                    self.metrics.adapter_load_failures.labels(served).inc()
                    raise
                log.warning("adapter load: engine unavailable, retrying",
                            extra={"adapter": internal, "error": str(e), "attempt": attempt})
                await asyncio.sleep(delay)
                delay *= 2
                continue
            except EngineHTTPError as e:
                self.metrics.adapter_load_failures.labels(served).inc()
                log.error("adapter load refused by the engine",
                          extra={"adapter": internal, "status": e.status, "body": e.body[:REASON_CHARS]})
                raise
            self.metrics.adapter_loads.labels(served).inc()
            log.info("adapter loaded", extra={"adapter": internal, "path": path})
            return

    def _retire(self, v: LoadedVersion, request_id: str | None) -> None:
        v.retired = True
        v.retire_seq += 1
        v.drained = asyncio.Event()
        if v.inflight <= 0:
            v.drained.set()
        task = asyncio.create_task(self._unload_when_drained(v, v.retire_seq, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _unload_when_drained(self, v: LoadedVersion, seq: int, request_id: str | None) -> None:
        token = REQUEST_ID.set(request_id)
        try:
            await v.drained.wait()
            async with self._engine_lock(v.internal):
                if not v.retired or v.retire_seq != seq or v.inflight > 0:
                    return  # re-desired meanwhile, or superseded by a newer retirement
                known = await self._unload(v.internal, v.served, request_id)
                if self.versions.get(v.internal) is v:
                    del self.versions[v.internal]
                if known is not None:
                    log.info("adapter unloaded after draining", extra={"adapter": v.internal, "engine_knew_it": known})
        finally:
            REQUEST_ID.reset(token)

    async def drain_background(self) -> None:
        """Wait for pending unloads (tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def cancel_background(self) -> None:
        tasks = [self._retry_task, self._planner, *self._workers.values(), *self._background, *self._heals.values()]
        for t in tasks:
            if t is not None:
                t.cancel()

    def pending_unloads(self) -> list[str]:
        return sorted(v.internal for v in self.versions.values() if v.retired)

    # -- first-use failure ----------------------------------------------------------------------
    def first_use_failed(self, served: str, v: LoadedVersion, status: int, body: str) -> str | None:
        """The engine dies at the first request through a freshly loaded version (an exception in the model
        step that ran it; every request then gets EngineDeadError's 500). vLLM 0.32 refuses tensors that do
        not fit the model at load (500, engine healthy), so a bad shape no longer gets here; the guard stays
        for other step failures. When a version that never served a request meets that, it is taken out of
        routing, its status says why (the operator copies it into the adapter's per-pod status) and it is
        not loaded again until another version is pushed. Returns the reason, or None when the answer is not
        that failure."""
        if v.served_ok or not is_engine_dead(status, body) or self.alias.get(served) is not v:
            return None
        reason = (f"the engine died at the first request that used version {v.version} (the model step that "
                  f"ran this adapter failed): {body[:REASON_CHARS]}")
        self.first_use_failures[v.internal] = reason
        self.status[served] = {"name": served, "version": v.version, "state": "failed", "reason": reason}
        self._retire(self.alias.pop(served), REQUEST_ID.get())
        self.metrics.adapters_loaded.set(len(self.alias))
        log.error("adapter failed at its first use; not routed or loaded again", extra={"adapter": v.internal})
        return reason

    # -- views --------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The answer about this proxy's state (adminwire.StateSnapshot, as the operator reads it)."""
        # the proxy's own records (not validated again: a push of 10,000 adapters answers many polls)
        adapters = [AdapterProgress.model_construct(**(self.status.get(served) or {
            "name": served, "version": spec.version, "state": "pending"})) for served, spec in self.desired.items()]
        return StateSnapshot(
            generation=self.generation, applied=self.generation is not None,
            converged_generation=self.converged_generation, converged=self.converged(),
            concurrency=self._concurrency(), load_parallelism=self.load_parallelism, counts=self.counts(),
            adapters=adapters,
            unloading=sorted((VersionRef(name=v.served, version=v.version) for v in self.versions.values()
                              if v.retired), key=lambda r: (r.name, r.version)),
        ).wire()


def is_engine_dead(status: int, body: str) -> bool:
    return status == 500 and ENGINE_DEAD_TEXT in body
