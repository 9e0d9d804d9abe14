"""Desired state pushed by the operator, and the adapter registry that makes the engine match it.

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
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from .engine import EngineClient, EngineHTTPError, EngineUnavailable
from .logs import REQUEST_ID, get_logger
from .metrics import ProxyMetrics

log = get_logger("state")

SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# an engine LoRA name vlmpool gave: `<served>@<version>` (served names have no '@')
INTERNAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,252}@[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LOAD_ATTEMPTS = 3  # connection failures / timeouts are transient: retried with a short backoff
REASON_CHARS = 500


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    version: StrictStr
    path: Annotated[StrictStr, Field(min_length=1, max_length=4096)]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SERVED_NAME_RE.match(v):
            raise ValueError("must match [A-Za-z0-9][A-Za-z0-9._:/-]* (max 253 chars, no '@')")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not VERSION_RE.match(v):
            raise ValueError("must match [A-Za-z0-9][A-Za-z0-9._-]* (max 128 chars)")
        return v

    @property
    def internal(self) -> str:
        return internal_name(self.name, self.version)


class DesiredState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generation: Annotated[StrictInt, Field(ge=0, lt=2**63)]  # an int64, as metadata.generation
    concurrency: Annotated[StrictInt, Field(ge=1, le=100_000)]
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=10_000)

    @field_validator("adapters")
    @classmethod
    def _unique(cls, v: list[AdapterSpec]) -> list[AdapterSpec]:
        seen: set[str] = set()
        for a in v:
            if a.name in seen:
                raise ValueError(f"adapter name {a.name!r} appears more than once")
            seen.add(a.name)
        return v


def internal_name(served: str, version: str) -> str:
    return f"{served}@{version}"


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


class Unavailable(Exception):
    """A desired adapter has no loaded version to serve (loading, or its load failed)."""


class AdapterRegistry:
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
        self.generation: int | None = None
        self.desired: dict[str, AdapterSpec] = {}
        self.alias: dict[str, LoadedVersion] = {}
        self.versions: dict[str, LoadedVersion] = {}  # internal -> loaded version (serving or draining)
        self.status: dict[str, dict] = {}  # served -> last outcome for the desired version
        self._apply_lock = asyncio.Lock()
        self._load_sem = asyncio.Semaphore(load_parallelism)
        self._heals: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task] = set()
        self._transient: set[str] = set()  # desired adapters whose last load met an unreachable engine
        self._retry_task: asyncio.Task | None = None
        self.leftovers_reconciled = False  # the engine's adapters from an earlier proxy process were checked
        # internal name -> why the engine died at its first use: never loaded again by this proxy
        self.first_use_failures: dict[str, str] = {}

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
            await self._load(v.served, v.internal, v.path, request_id)
        except (EngineHTTPError, EngineUnavailable) as e:
            if self.alias.get(v.served) is v:
                self.status[v.served] = {
                    "name": v.served, "version": v.version, "state": "failed",
                    "reason": f"re-load after the engine forgot it failed: {_reason(e)}",
                }
            raise

    # -- admin path ---------------------------------------------------------------------------
    async def apply(self, state: DesiredState, request_id: str | None) -> tuple[bool, dict]:
        """Make the engine match ``state``. Returns (applied, snapshot); a generation older than the
        newest applied one changes nothing."""
        async with self._apply_lock:
            if self.generation is not None and state.generation < self.generation:
                log.warning("stale state ignored", extra={"generation": state.generation, "current": self.generation})
                return False, self.snapshot()
            base = self._base_model()
            self.generation = state.generation
            self.metrics.generation.set(state.generation)
            self._on_concurrency(state.concurrency)
            desired = {a.name: a for a in state.adapters if a.name != base}
            self.desired = desired
            # names no longer wanted: stop routing now, unload after their requests finish
            for served in [s for s in self.alias if s not in desired]:
                self._retire(self.alias.pop(served), request_id)
            for served in [s for s in self.status if s not in desired]:
                del self.status[served]
            self._transient &= set(desired)
            if not self.leftovers_reconciled:
                await self._unload_leftovers(desired, request_id)
            await asyncio.gather(*(self._converge(a, request_id) for a in desired.values()))
            self.metrics.adapters_loaded.set(len(self.alias))
            log.info(
                "state applied",
                extra={
                    "generation": state.generation,
                    "concurrency": state.concurrency,
                    "loaded": sum(1 for s in self.status.values() if s["state"] == "loaded"),
                    "failed": sum(1 for s in self.status.values() if s["state"] == "failed"),
                },
            )
            return True, self.snapshot()

    async def _converge(self, spec: AdapterSpec, request_id: str | None) -> None:
        internal = spec.internal
        if internal in self.first_use_failures:  # loading it again would kill the engine again
            self.status[spec.name] = {"name": spec.name, "version": spec.version, "state": "failed",
                                      "reason": self.first_use_failures[internal]}
            return
        try:
            # always re-issue the (idempotent) load: it also restores what an engine restart forgot
            async with self._load_sem:
                await self._load(spec.name, internal, spec.path, request_id)
        except (EngineHTTPError, EngineUnavailable) as e:
            if isinstance(e, EngineUnavailable):
                self._transient.add(spec.name)  # the engine was unreachable: the retry loop tries again
            else:
                self._transient.discard(spec.name)  # the engine refused it: only a new push changes that
            st = {"name": spec.name, "version": spec.version, "state": "failed", "reason": _reason(e)}
            current = self.alias.get(spec.name)
            if current is not None and current.internal != internal:
                st["serving_version"] = current.version  # the previous version keeps serving
            self.status[spec.name] = st
            return
        self._transient.discard(spec.name)
        v = self.versions.get(internal)
        if v is None:
            v = self.versions[internal] = LoadedVersion(spec.name, spec.version, spec.path)
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

    async def _unload_leftovers(self, desired: dict[str, AdapterSpec], request_id: str | None) -> None:
        """First push after a (re)start: the engine may still hold adapters an earlier proxy process
        loaded. Unload those named `<served>@<version>` (vlmpool's form) that are not desired now; never
        touch another name. Done once, when the engine answered (else tried again at the next push)."""
        try:
            models = await self.engine.list_models()
        except (EngineHTTPError, EngineUnavailable) as e:
            log.warning("could not list the engine's adapters; leftovers are checked at the next push",
                        extra={"error": str(e)[:REASON_CHARS]})
            return
        wanted = {a.internal for a in desired.values()} | set(self.versions)
        base = self._base_model()
        leftovers = sorted(
            m["id"] for m in models
            if isinstance(m, dict) and isinstance(m.get("id"), str) and m.get("parent") and m["id"] != base
            and INTERNAL_RE.match(m["id"]) and m["id"] not in wanted
        )
        for name in leftovers:
            try:
                await self.engine.unload_lora(name, request_id)
            except (EngineHTTPError, EngineUnavailable) as e:
                log.error("leftover adapter unload failed", extra={"adapter": name, "error": str(e)[:REASON_CHARS]})
                return  # checked again at the next push
            self.metrics.adapter_unloads.labels(name.split("@", 1)[0]).inc()
            log.info("unloaded an adapter an earlier proxy process left in the engine", extra={"adapter": name})
        self.leftovers_reconciled = True

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
            async with self._apply_lock:
                if not v.retired or v.retire_seq != seq or v.inflight > 0:
                    return  # re-desired meanwhile, or superseded by a newer retirement
                delay = 0.2
                for attempt in range(1, LOAD_ATTEMPTS + 1):
                    try:
                        known = await self.engine.unload_lora(v.internal, request_id)
                        break
                    except EngineUnavailable as e:
                        if attempt == LOAD_ATTEMPTS:
                            log.error("adapter unload failed; leaving it to the engine's LRU",
                                      extra={"adapter": v.internal, "error": str(e)})
                            known = None
                            break
                        await asyncio.sleep(delay)
                        delay *= 2
                    except EngineHTTPError as e:
                        log.error("adapter unload refused by the engine",
                                  extra={"adapter": v.internal, "status": e.status, "body": e.body[:REASON_CHARS]})
                        known = None
                        break
                if self.versions.get(v.internal) is v:
                    del self.versions[v.internal]
                if known is not None:
                    self.metrics.adapter_unloads.labels(v.served).inc()
                    log.info("adapter unloaded after draining", extra={"adapter": v.internal, "engine_knew_it": known})
        finally:
            REQUEST_ID.reset(token)

    def start_retry_loop(self, interval: float) -> None:
        """Keep converging: adapters whose load met an unreachable engine (a pod whose vLLM was still
        starting when the operator pushed) are loaded again every `interval` seconds until it answers."""
        if self._retry_task is None and interval > 0:
            self._retry_task = asyncio.create_task(self._retry_loop(interval))

    async def _retry_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not self._transient:
                continue
            try:
                async with self._apply_lock:
                    specs = [self.desired[n] for n in sorted(self._transient) if n in self.desired]
                    if not specs:
                        continue
                    rid = f"vlmpool-proxy-retry-{self.generation}"
                    token = REQUEST_ID.set(rid)
                    try:
                        log.info("retrying adapter loads that met an unreachable engine",
                                 extra={"adapters": [a.name for a in specs]})
                        await asyncio.gather(*(self._converge(a, rid) for a in specs))
                        self.metrics.adapters_loaded.set(len(self.alias))
                    finally:
                        REQUEST_ID.reset(token)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die
                log.exception("adapter retry loop error")

    async def drain_background(self) -> None:
        """Wait for pending unloads (tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def cancel_background(self) -> None:
        if self._retry_task is not None:
            self._retry_task.cancel()
        for t in list(self._background) + list(self._heals.values()):
            t.cancel()

    def pending_unloads(self) -> list[str]:
        return sorted(v.internal for v in self.versions.values() if v.retired)

    # -- first-use failure ----------------------------------------------------------------------
    def first_use_failed(self, served: str, v: LoadedVersion, status: int, body: str) -> str | None:
        """vLLM loads an adapter whose tensors do not fit the model (200) and dies at the first request
        that uses it (set_lora in the model step; every request then gets EngineDeadError's 500). When a
        version that never served a request meets that, it is taken out of routing, its status says why
        (the operator copies it into the adapter's per-pod status) and it is not loaded again until
        another version is pushed. Returns the reason, or None when the answer is not that failure."""
        if v.served_ok or not is_engine_dead(status, body) or self.alias.get(served) is not v:
            return None
        reason = (f"the engine died at the first request that used version {v.version} (vLLM loads an adapter "
                  f"whose tensors do not fit the model and fails when it is first used): {body[:REASON_CHARS]}")
        self.first_use_failures[v.internal] = reason
        self.status[served] = {"name": served, "version": v.version, "state": "failed", "reason": reason}
        self._retire(self.alias.pop(served), REQUEST_ID.get())
        self.metrics.adapters_loaded.set(len(self.alias))
        log.error("adapter failed at its first use; not routed or loaded again", extra={"adapter": v.internal})
        return reason

    # -- views --------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        adapters = []
        for served, spec in self.desired.items():
            st = self.status.get(served)
            if st is None:
                st = {"name": served, "version": spec.version, "state": "loading"}
            adapters.append(dict(st))
        return {
            "generation": self.generation,
            "applied": self.generation is not None,
            "concurrency": self._concurrency(),
            "adapters": adapters,
            # versions no longer routed whose engine unload is not yet confirmed (draining, or the unload
            # call is pending): the operator must not delete their directories yet (vLLM re-reads an
            # evicted adapter's directory while it is registered)
            "unloading": sorted(({"name": v.served, "version": v.version} for v in self.versions.values()
                                 if v.retired), key=lambda d: (d["name"], d["version"])),
        }


ENGINE_DEAD_TEXT = "EngineCore encountered an issue"  # vllm.v1.engine.exceptions.EngineDeadError


def is_engine_dead(status: int, body: str) -> bool:
    return status == 500 and ENGINE_DEAD_TEXT in body


def _reason(e: Exception) -> str:
    if isinstance(e, EngineHTTPError):
        return f"engine answered HTTP {e.status} to load_lora_adapter: {e.body[:REASON_CHARS]}"
    return str(e)[:REASON_CHARS]
