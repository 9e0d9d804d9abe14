"""The converger: how the adapter registry makes the engine match a pushed state in the background.

A push only records the desired state (``apply``, no engine call); a planner task lists the engine's
adapters and queues every desired adapter the engine does not hold at the wanted version; at most
``load_parallelism`` loader tasks take served names from that FIFO queue, one loader per served name
at a time. Every engine call about one internal name (load, unload, self-heal re-load) holds that
name's lock, so an adapter is never loaded twice at once nor unloaded under a load. A push arriving
meanwhile replaces the desired state: queued names it no longer wants are dropped, a load that finishes
for a version no longer wanted is unloaded again, and a name whose version changed is queued again.
``converged()`` says the newest accepted generation is done (every wanted adapter loaded or refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from vlmpool.adminwire import INTERNAL_RE, AdapterEntry, DesiredState, internal_name
from vlmpool.names import served_name_refusal

from .engine import EngineClient, EngineHTTPError, EngineUnavailable
from .logs import REQUEST_ID, get_logger
from .metrics import ProxyMetrics

log = get_logger("state")

LOAD_ATTEMPTS = 3  # connection failures / timeouts are transient: retried with a short backoff
REASON_CHARS = 500


@dataclass(eq=False)
class LoadedVersion:
    """One adapter version the engine has loaded (serving, or draining before its unload)."""

    served: str
    version: str
    path: str
    inflight: int = 0
    retired: bool = False
    retire_seq: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    served_ok: bool = False  # a request through this version succeeded (it survived its first use)

    @property
    def internal(self) -> str:
        return internal_name(self.served, self.version)


class Converger:
    """The registry's background convergence (AdapterRegistry sets the attributes up)."""

    engine: EngineClient
    metrics: ProxyMetrics
    _base_model: Callable[[], str | None]
    _on_concurrency: Callable[[int], None]
    generation: int | None
    converged_generation: int | None
    load_parallelism: int
    _default_parallelism: int
    desired: dict[str, AdapterEntry]
    alias: dict[str, LoadedVersion]
    versions: dict[str, LoadedVersion]
    status: dict[str, dict]
    refused: dict[str, str]
    _request_id: str | None
    _queue: dict[str, None]
    _active: set[str]
    _again: set[str]
    _work: asyncio.Event
    _plan_wake: asyncio.Event
    _planning: bool
    _planner: asyncio.Task | None
    _workers: dict[int, asyncio.Task]
    _locks: dict[str, asyncio.Lock]
    _progress: asyncio.Event
    _transient: set[str]
    _retry_task: asyncio.Task | None
    leftovers_reconciled: bool
    first_use_failures: dict[str, str]
    accepted_at: float | None
    converge_seconds: float | None
    first_converged_at: float | None

    def _retire(self, v: LoadedVersion, request_id: str | None) -> None:
        raise NotImplementedError

    async def _load(self, served: str, internal: str, path: str, request_id: str | None) -> None:
        raise NotImplementedError

    # -- admin path: accept a push ----------------------------------------------------------------
    def apply(self, state: DesiredState, request_id: str | None, refused: dict[str, str] | None = None) -> bool:
        """Accept ``state`` as the desired state (no engine call; the converger does the work).
        ``refused``: served name -> why its entry is refused (it is failed with that reason, never
        loaded; a version it served before keeps serving). Returns False, changing nothing, for a
        generation older than the newest accepted one."""
        if self.generation is not None and state.generation < self.generation:
            log.warning("stale state ignored", extra={"generation": state.generation, "current": self.generation})
            return False
        base = self._base_model()
        if self.converged_generation is not None and self.converged_generation >= state.generation:
            self.converged_generation = None  # the same generation again: it converges anew (an engine restart)
        self.generation = state.generation
        self.accepted_at = time.monotonic()
        self._request_id = request_id
        self.metrics.generation.set(state.generation)
        self._on_concurrency(state.concurrency)
        self.set_load_parallelism(state.load_parallelism or self._default_parallelism)
        desired = {a.name: a for a in state.adapters}
        self.desired = desired
        self.refused = {n: why for n, why in (refused or {}).items() if n in desired}
        self.refused.update({n: why for n in desired if (why := served_name_refusal(n, base))})
        # names no longer wanted: stop routing now, unload after their requests finish; not loaded any more
        for served in [s for s in self.alias if s not in desired]:
            self._retire(self.alias.pop(served), request_id)
        for served in [s for s in self.status if s not in desired]:
            del self.status[served]
        for served in [s for s in self._queue if s not in desired]:
            del self._queue[served]
        self._transient &= set(desired)
        for served, spec in desired.items():
            if served in self._active:
                continue  # its loader looks at the desired state again when it is done
            st = self.status.get(served)
            cur = self.alias.get(served)
            if served in self.refused:
                self.status[served] = self._failed(spec, self.refused[served])
            elif spec.internal in self.first_use_failures:
                self.status[served] = self._failed(spec, self.first_use_failures[spec.internal])
            elif cur is None or cur.internal != spec.internal or st is None or st["state"] != "loaded":
                self.status[served] = {"name": served, "version": spec.version, "state": "pending"}
        self._plan_wake.set()
        self._start()
        self._notify()
        log.info("state accepted", extra={"generation": state.generation, "concurrency": state.concurrency,
                                          "adapters": len(desired), "load_parallelism": self.load_parallelism})
        return True

    def set_load_parallelism(self, n: int) -> None:
        self.load_parallelism = max(1, n)
        self._work.set()  # loaders above the new bound see it and stop
        if self._planner is not None:
            self._start()

    def _start(self) -> None:
        if self._planner is None:
            self._planner = asyncio.create_task(self._plan_loop())
        for i in range(self.load_parallelism):
            if i not in self._workers:
                self._workers[i] = asyncio.create_task(self._loader(i))

    # -- the converger ----------------------------------------------------------------------------
    def converged(self, generation: int | None = None) -> bool:
        """The desired state of `generation` (default: the newest accepted) is converged: every wanted
        adapter is loaded or refused, nothing is queued or loading. A readiness check can use it."""
        g = self.generation if generation is None else generation
        return g is not None and self.converged_generation is not None and self.converged_generation >= g

    async def wait_converged(self, generation: int | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.converged(generation):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)
        return True

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _check_converged(self) -> None:
        if (self.generation is None or self._planning or self._plan_wake.is_set() or self._queue or self._active
                or self._again or self._transient or self.converged_generation == self.generation):
            return
        self.converged_generation = self.generation
        if self.accepted_at is not None:
            self.converge_seconds = time.monotonic() - self.accepted_at
        if self.first_converged_at is None:
            self.first_converged_at = time.monotonic()
        self.metrics.adapters_loaded.set(len(self.alias))
        counts = self.counts()
        log.info("state converged", extra={"generation": self.generation, "seconds": self.converge_seconds,
                                           "loaded": counts["loaded"], "failed": counts["failed"]})
        self._notify()

    async def _plan_loop(self) -> None:
        while True:
            await self._plan_wake.wait()
            self._plan_wake.clear()
            self._planning = True
            try:
                await self._plan()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the planner die
                log.exception("convergence planning failed")
            finally:
                self._planning = False
                self._check_converged()

    async def _plan(self) -> None:
        """Queue every desired adapter the engine does not hold at the wanted version (one list call,
        not one load per adapter: a re-push of a converged state loads nothing)."""
        token = REQUEST_ID.set(self._request_id)
        try:
            try:
                models = await self.engine.list_models()
                held: set[str] | None = {m["id"] for m in models
                                         if isinstance(m, dict) and isinstance(m.get("id"), str)}
            except (EngineHTTPError, EngineUnavailable) as e:
                # An engine that does not answer may be a restarted one that forgot every adapter: nothing
                # counts as held, every desired adapter is loaded again (loads are idempotent; while it
                # stays down they fail as transient and the retry loop queues them again).
                log.warning("could not list the engine's adapters; loading every desired adapter",
                            extra={"error": str(e)[:REASON_CHARS]})
                models, held = [], None
            if not self.leftovers_reconciled and held is not None:
                await self._unload_leftovers(models, self._request_id)
            for served, spec in self.desired.items():
                if spec.internal in self.first_use_failures or served in self.refused:
                    continue
                cur = self.alias.get(served)
                if cur is not None and cur.internal == spec.internal and held is not None and spec.internal in held:
                    if self.status.get(served, {}).get("state") != "loaded":
                        self.status[served] = {"name": served, "version": spec.version, "state": "loaded"}
                    continue
                self._enqueue(served)
        finally:
            REQUEST_ID.reset(token)

    def _enqueue(self, served: str) -> None:
        if served in self._active:
            self._again.add(served)
        else:
            self._queue[served] = None
            self._work.set()

    async def _loader(self, index: int) -> None:
        try:
            while index < self.load_parallelism:
                if not self._queue:
                    self._work.clear()
                    await self._work.wait()
                    continue
                served = next(iter(self._queue))
                del self._queue[served]
                self._active.add(served)
                try:
                    await self._converge_one(served)
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let a loader die
                    log.exception("adapter convergence failed", extra={"adapter": served})
                finally:
                    self._active.discard(served)
                    if served in self._again:  # queued again meanwhile: still to do unless now satisfied
                        self._again.discard(served)
                        if not self._satisfied(served):
                            self._enqueue(served)
                    self._check_converged()
        finally:
            if self._workers.get(index) is asyncio.current_task():
                del self._workers[index]

    def _satisfied(self, served: str) -> bool:
        """The served name is loaded at its desired version (or no longer desired)."""
        spec, cur = self.desired.get(served), self.alias.get(served)
        return spec is None or (cur is not None and cur.internal == spec.internal
                                and self.status.get(served, {}).get("state") == "loaded")

    @contextlib.asynccontextmanager
    async def _engine_lock(self, internal: str) -> AsyncIterator[None]:
        """Serialises the engine calls about one internal name; the lock is dropped when unused."""
        lock = self._locks.setdefault(internal, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._locks.get(internal) is lock:
                del self._locks[internal]

    async def _converge_one(self, served: str) -> None:
        spec = self.desired.get(served)
        if spec is not None and served in self.refused:
            self.status[served] = self._failed(spec, self.refused[served])
            return
        if spec is None or spec.internal in self.first_use_failures:
            return
        internal, rid = spec.internal, self._request_id
        token = REQUEST_ID.set(rid)
        try:
            self.status[served] = {"name": served, "version": spec.version, "state": "loading"}
            async with self._engine_lock(internal):
                try:
                    await self._load(served, internal, spec.path, rid)
                except (EngineHTTPError, EngineUnavailable) as e:
                    if self.desired.get(served) == spec:
                        self._load_failed(spec, e)
                    elif served in self.desired:
                        self._enqueue(served)
                    return
                now = self.desired.get(served)
                if now is None or now.internal != internal:
                    # superseded while it loaded: not wanted at this version any more
                    if internal not in self.versions:
                        await self._unload(internal, served, rid)
                    if now is not None:
                        self._enqueue(served)
                    return
                self._loaded(spec, rid)
        finally:
            REQUEST_ID.reset(token)

    def _loaded(self, spec: AdapterEntry, request_id: str | None) -> None:
        self._transient.discard(spec.name)
        v = self.versions.get(spec.internal)
        if v is None:
            v = self.versions[spec.internal] = LoadedVersion(spec.name, spec.version, spec.path)
        else:
            v.path = spec.path  # same immutable version; only where it is mounted may differ
        if v.retired:  # re-desired while draining: cancel its unload
            v.retired = False
            v.retire_seq += 1
        old = self.alias.get(spec.name)
        self.alias[spec.name] = v  # the flip: new requests go to the new version from here on
        if old is not None and old is not v:
            log.info("adapter version swapped", extra={"adapter": spec.name, "old": old.version, "new": spec.version})
            self._retire(old, request_id)
        self.status[spec.name] = {"name": spec.name, "version": spec.version, "state": "loaded"}
        self.metrics.adapters_loaded.set(len(self.alias))

    def _load_failed(self, spec: AdapterEntry, e: Exception) -> None:
        st = self._failed(spec, reason(e))
        if isinstance(e, EngineUnavailable):
            self._transient.add(spec.name)  # the engine was unreachable: the retry loop tries again
            st["state"] = "pending"
        else:
            self._transient.discard(spec.name)  # the engine refused it: only a new push changes that
        self.status[spec.name] = st

    def _failed(self, spec: AdapterEntry, reason: str) -> dict:
        st = {"name": spec.name, "version": spec.version, "state": "failed", "reason": reason}
        current = self.alias.get(spec.name)
        if current is not None and current.internal != spec.internal:
            st["serving_version"] = current.version  # the previous version keeps serving
        return st

    async def _unload_leftovers(self, models: list, request_id: str | None) -> None:
        """First round after a (re)start: the engine may still hold adapters an earlier proxy process
        loaded. Unload those named `<served>@<version>` (vlmpool's form) that are not desired now; never
        touch another name. Done once, when the engine answered (else tried again at the next round)."""
        wanted = {a.internal for a in self.desired.values()} | set(self.versions)
        base = self._base_model()
        leftovers = sorted(
            m["id"] for m in models
            if isinstance(m, dict) and isinstance(m.get("id"), str) and m.get("parent") and m["id"] != base
            and INTERNAL_RE.fullmatch(m["id"]) and m["id"] not in wanted
        )
        for name in leftovers:
            async with self._engine_lock(name):
                if name in self.versions or any(a.internal == name for a in self.desired.values()):
                    continue  # wanted again meanwhile
                if await self._unload(name, name.split("@", 1)[0], request_id) is None:
                    return  # checked again at the next round
            log.info("unloaded an adapter an earlier proxy process left in the engine", extra={"adapter": name})
        self.leftovers_reconciled = True

    async def _unload(self, internal: str, served: str, request_id: str | None) -> bool | None:
        """One engine unload (its lock held by the caller): True/False whether the engine knew it,
        None when it failed."""
        delay = 0.2
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            try:
                known = await self.engine.unload_lora(internal, request_id)
            except EngineUnavailable as e:
                if attempt < LOAD_ATTEMPTS:
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                log.error("adapter unload failed; leaving it to the engine's LRU",
                          extra={"adapter": internal, "error": str(e)})
                return None
            except EngineHTTPError as e:
                log.error("adapter unload refused by the engine",
                          extra={"adapter": internal, "status": e.status, "body": e.body[:REASON_CHARS]})
                return None
            self.metrics.adapter_unloads.labels(served).inc()
            return known
        return None

    def start_retry_loop(self, interval: float) -> None:
        """Keep converging: adapters whose load met an unreachable engine (a pod whose vLLM was still
        starting when the operator pushed) are queued again every `interval` seconds until it answers."""
        if self._retry_task is None and interval > 0:
            self._retry_task = asyncio.create_task(self._retry_loop(interval))

    async def _retry_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            names = [n for n in sorted(self._transient)
                     if n in self.desired and n not in self._queue and n not in self._active]
            if names:
                log.info("retrying adapter loads that met an unreachable engine", extra={"adapters": names})
                self._request_id = f"vlmpool-proxy-retry-{self.generation}"
                for n in names:
                    self._enqueue(n)


    def counts(self) -> dict[str, int]:
        out = {"pending": 0, "loading": 0, "loaded": 0, "failed": 0}
        for served in self.desired:
            out[(self.status.get(served) or {}).get("state", "pending")] += 1
        return out



def reason(e: Exception) -> str:
    if isinstance(e, EngineHTTPError):
        return f"engine answered HTTP {e.status} to load_lora_adapter: {e.body[:REASON_CHARS]}"
    return str(e)[:REASON_CHARS]
