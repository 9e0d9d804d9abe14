"""What every part of the controller shares: its configuration, RetryLater, Events, the listing of a
pool's adapters and the pools' admin tokens. It imports no part (controller/reconciler.py builds them)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlmpool.api.objects import Adapter
from vlmpool.kube.client import VLMADAPTERS, KubeClient
from vlmpool.manifests.common import ADAPTER_ROOT

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


class Events:
    """Posts Kubernetes Events for the parts, best effort (a failure to post is logged, never raised)."""

    def __init__(self, post: EventFn | None = None):
        self._post = post or (lambda body, type_, reason, message: None)

    def __call__(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            self._post(body, type_, reason, message[:1000])
        except Exception:  # events are best effort
            log.debug("event not posted", exc_info=True)


async def pool_adapters(kube: KubeClient, ns: str, pool: str) -> list[Adapter]:
    """The pool's adapters, parsed (the adapters of other pools are not). One whose spec does not
    parse is left out (and logged): it must not stop the pool's push of the others."""
    items = await kube.list(VLMADAPTERS, ns)
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
