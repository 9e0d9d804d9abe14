"""What every part of the reconciler shares: its configuration, RetryLater, the status writers with
an optimistic lock, and the pools' admin tokens."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmpool.api.objects import Adapter, Pool
from vlmpool.controller import status as S
from vlmpool.controller.decisions import Cond
from vlmpool.controller.metrics import OperatorMetrics
from vlmpool.kube.client import VLMADAPTERS, VLMPOOLS, Conflict, KubeClient, NotFound
from vlmpool.manifests.common import ADAPTER_ROOT

if TYPE_CHECKING:
    from vlmpool.controller.pushing import PushSummary

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
class OperatorConfig:
    resync_seconds: float = 60.0
    push_timeout: float = 10.0
    push_parallelism: int = 16
    progress_wait: float = 2.0  # longest wait of one long poll of a pod's convergence, seconds
    max_patch_jobs: int = 8  # patch Jobs alive at once; more wait (jobgate.fair_order)
    patch_image: str | None = None  # default: manifests.adapter.DEFAULT_PATCH_IMAGE (never a pool's image)
    patch_dora_image: str | None = None  # patch Jobs of svd/strip adapters (torch); default: patch_image
    adapter_root: str = ADAPTER_ROOT  # mount path of the adapter volume in Jobs and engines
    source_allow: tuple[str, ...] = ()  # internal hosts/CIDRs patch Jobs may fetch from (--source-allow)
    host_paths: tuple[str, ...] = ()  # node directories file:// sources may name (--allow-host-path)
    # A NetworkPolicy per pool (--network-policy): {"adminFrom", "httpFrom", "extraIngress"}; None: none.
    network_policy: dict[str, list[dict[str, Any]]] | None = None
    # The key the pools' admin tokens are derived from (--token-key-file); the default suits a
    # single process only (tests): the chart mounts a key that outlives operator restarts.
    token_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))



class ReconcilerBase:
    """State and helpers the pool, adapter, deletion and push parts share (Reconciler sets them up)."""

    kube: KubeClient
    config: OperatorConfig
    metrics: OperatorMetrics
    _event: EventFn

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            self._event(body, type_, reason, message[:1000])
        except Exception:  # events are best effort
            log.debug("event not posted", exc_info=True)


    async def _write_pool_status(self, pool: dict[str, Any], fields: dict[str, Any],
                                 conds: Sequence[Cond] = ()) -> dict[str, Any]:
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

    async def _pool_adapters(self, ns: str, pool: str) -> list[Adapter]:
        """The pool's adapters, parsed (the adapters of other pools are not). One whose spec does not
        parse is left out (and logged): it must not stop the pool's push of the others."""
        items = await self.kube.list(VLMADAPTERS, ns)
        out = []
        for a in items:
            if ((a.get("spec") or {}).get("poolRef") or {}).get("name") != pool:
                continue
            try:
                out.append(Adapter.parse(a))
            except ValueError as e:  # pydantic's ValidationError: this adapter alone is left out
                log.warning("adapter %s/%s left out of pool %s: its spec is invalid: %s", ns,
                            a["metadata"].get("name"), pool, str(e)[:500])
        return out

    async def _write_adapter_status(self, adapter: dict[str, Any], fields: dict[str, Any],
                                    conds: Sequence[Cond] = (),
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

    # Implemented by the parts (Reconciler combines them); declared here so each part can call the others.
    async def push_pool(self, ns: str, pool: str) -> PushSummary | None:
        raise NotImplementedError

    async def reconcile_adapter(self, adapter: Adapter, pool: Pool | None = None) -> None:
        raise NotImplementedError


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
        return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _duration(start: str | None, end: str | None) -> float | None:
    a, b = _parse_time(start), _parse_time(end)
    return (b - a).total_seconds() if a and b else None
