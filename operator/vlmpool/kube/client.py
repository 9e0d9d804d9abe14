"""A small async Kubernetes API client on aiohttp.

Only what the operator needs: get / list / create / patch (merge, json, strategic, server-side apply)
/ delete, the status subresource, and pod bindings (used by tests that play the kubelet). kopf does
the watching.

Why our own thin client rather than an async client library (``kubernetes_asyncio``, or the
``kubernetes.aio`` package of recent ``kubernetes`` releases): vlmpool needs a dozen verbs on dicts
(server-side apply included), not generated model classes, and the libraries' async config loaders
differ between releases. The hard part of a client, the credentials, is borrowed: :mod:`vlmpool.kube.config`
gets them from the ``kubernetes`` package's loader, exec plugins and OIDC included.

Every answer goes through :meth:`KubeClient.request`, the one place that classifies errors into the
types of :mod:`vlmpool.kube.errors`, retries what :func:`vlmpool.kube.errors.retry_delay` says is
retryable (429 and 5xx honouring Retry-After, timeouts of idempotent requests), and renews the
credentials once after a 401.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from vlmpool.kube.config import KubeConfig
from vlmpool.kube.errors import (
    IDEMPOTENT,
    ApiError,
    ApiUnavailable,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    NotFound,
    ServerError,
    TooManyRequests,
    Unauthorized,
    classify,
    retry_delay,
)
from vlmpool.names import ADAPTER_KIND, ADAPTER_PLURAL, API_VERSION, GROUP, POOL_KIND, POOL_PLURAL, VERSION

__all__ = [
    "ApiError",
    "ApiUnavailable",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "Gone",
    "Invalid",
    "KubeClient",
    "NotFound",
    "Resource",
    "ServerError",
    "TooManyRequests",
    "Unauthorized",
    "resource_for",
]

log = logging.getLogger("vlmpool.kube")

FIELD_MANAGER = "vlmpool-operator"


@dataclass(frozen=True)
class Resource:
    """An API resource: group ('' for core), version, plural, namespaced."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
            if sub:
                base += f"/{sub}"
        return base


# The resources vlmpool touches.
PODS = Resource("", "v1", "pods")
SERVICES = Resource("", "v1", "services")
SECRETS = Resource("", "v1", "secrets")
PVCS = Resource("", "v1", "persistentvolumeclaims")
EVENTS = Resource("", "v1", "events")
NODES = Resource("", "v1", "nodes", namespaced=False)
NAMESPACES = Resource("", "v1", "namespaces", namespaced=False)
DEPLOYMENTS = Resource("apps", "v1", "deployments")
REPLICASETS = Resource("apps", "v1", "replicasets")
JOBS = Resource("batch", "v1", "jobs")
VLMPOOLS = Resource(GROUP, VERSION, POOL_PLURAL)
VLMADAPTERS = Resource(GROUP, VERSION, ADAPTER_PLURAL)
LEASES = Resource("coordination.k8s.io", "v1", "leases")
# spec.routing's children (manifests/routing.py)
INFERENCEPOOLS = Resource("inference.networking.k8s.io", "v1", "inferencepools")
CONFIGMAPS = Resource("", "v1", "configmaps")
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts")
ROLES = Resource("rbac.authorization.k8s.io", "v1", "roles")
ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings")
NETWORKPOLICIES = Resource("networking.k8s.io", "v1", "networkpolicies")

KIND_TO_RESOURCE = {
    ("v1", "Pod"): PODS,
    ("v1", "Service"): SERVICES,
    ("v1", "Secret"): SECRETS,
    ("v1", "PersistentVolumeClaim"): PVCS,
    ("v1", "Event"): EVENTS,
    ("apps/v1", "Deployment"): DEPLOYMENTS,
    ("batch/v1", "Job"): JOBS,
    (API_VERSION, POOL_KIND): VLMPOOLS,
    (API_VERSION, ADAPTER_KIND): VLMADAPTERS,
    ("coordination.k8s.io/v1", "Lease"): LEASES,
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCEPOOLS,
    ("v1", "ConfigMap"): CONFIGMAPS,
    ("v1", "ServiceAccount"): SERVICEACCOUNTS,
    ("rbac.authorization.k8s.io/v1", "Role"): ROLES,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ROLEBINDINGS,
    ("networking.k8s.io/v1", "NetworkPolicy"): NETWORKPOLICIES,
}


def resource_for(obj: dict[str, Any]) -> Resource:
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    try:
        return KIND_TO_RESOURCE[key]
    except KeyError:
        raise ValueError(f"unknown kind {key[1]!r} of {key[0]!r}") from None


PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "apply": "application/apply-patch+yaml",
}


class KubeClient:
    """Use as ``async with KubeClient(config) as kube:`` or call :meth:`close`."""

    def __init__(self, config: KubeConfig | None = None, *, timeout: float = 30.0,
                 field_manager: str = FIELD_MANAGER, attempts: int = 5):
        self.config = config or KubeConfig.load()
        self.field_manager = field_manager
        self.attempts = attempts  # tries of one request, the first included (see errors.retry_delay)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._tls: tuple[str | None, ...] = ()
        self._retired: set[asyncio.Task[None]] = set()
        self._closed = False

    async def __aenter__(self) -> KubeClient:
        self._ensure()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _ensure(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("KubeClient is closed")
        tls = self.config.tls_identity
        if self._session is not None and not self._session.closed and tls != self._tls:
            # Renewed client certificates (an exec plugin may issue them): new connections from now on;
            # the old session finishes its requests in flight and is closed a minute later.
            old, self._session = self._session, None
            task = asyncio.get_running_loop().create_task(_close_later(old, 60.0))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        if self._session is None or self._session.closed:
            self._tls = tls
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=32),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        for task in list(self._retired):
            task.cancel()
        await asyncio.gather(*self._retired, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- raw ---------------------------------------------------------------------------------------
    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None,
                      content_type: str = "application/json") -> Any:
        """One API call: the decoded JSON answer, or an :class:`ApiError` subclass after the retries."""
        data = None if body is None else json.dumps(body)
        clean = {k: (str(v).lower() if isinstance(v, bool) else str(v))
                 for k, v in (params or {}).items() if v is not None}
        idempotent = method in IDEMPOTENT or content_type == PATCH_TYPES["apply"]
        renewed = False
        attempt = 0
        while True:
            header = await self.config.fresh_header()
            try:
                return await self._once(method, path, data, clean, content_type, header)
            except Unauthorized:
                # Expired or revoked credentials: renew them once and try again.
                if renewed or not await self.config.renew_after_401(header):
                    raise
                renewed = True
                continue
            except ApiError as e:
                attempt += 1
                delay = retry_delay(e, attempt - 1, idempotent=idempotent) if attempt < self.attempts else None
                if delay is None:
                    raise
                log.info("%s %s: %s %s; retrying in %.1fs (attempt %d of %d)", method, path, e.status,
                         e.reason, delay, attempt + 1, self.attempts)
                await asyncio.sleep(delay)

    async def _once(self, method: str, path: str, data: str | None, params: dict[str, str], content_type: str,
                    auth: str | None) -> Any:
        session = self._ensure()
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = auth
        if data is not None:
            headers["Content-Type"] = content_type
        kwargs: dict[str, Any] = {}
        if self.config.tls_server_name:
            kwargs["server_hostname"] = self.config.tls_server_name
        try:
            async with session.request(method, self.config.server + path, data=data, params=params,
                                       headers=headers, **kwargs) as resp:
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise ApiUnavailable(0, type(e).__name__, str(e) or type(e).__name__, method, path) from e
        if resp.status >= 400:
            raise classify(resp.status, text, http_reason=resp.reason or "", method=method, path=path,
                           retry_after=resp.headers.get("Retry-After"))
        return json.loads(text) if text else None

    # ---- verbs -------------------------------------------------------------------------------------
    async def get(self, res: Resource, name: str, namespace: str | None = None,
                  subresource: str | None = None) -> dict[str, Any]:
        return await self.request("GET", res.path(namespace, name, subresource))

    async def get_or_none(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return await self.get(res, name, namespace)
        except NotFound:
            return None

    async def list(self, res: Resource, namespace: str | None = None, *, label_selector: str | None = None,
                   field_selector: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            out = await self.request("GET", res.path(namespace), params={
                "labelSelector": label_selector, "fieldSelector": field_selector, "limit": 500,
                "continue": cont})
            items.extend(out.get("items") or [])
            cont = (out.get("metadata") or {}).get("continue")
            if not cont:
                return items

    async def create(self, obj: dict[str, Any], namespace: str | None = None,
                     res: Resource | None = None) -> dict[str, Any]:
        res = res or resource_for(obj)
        ns = namespace or obj.get("metadata", {}).get("namespace")
        return await self.request("POST", res.path(ns), body=obj,
                                  params={"fieldManager": self.field_manager})

    async def create_if_absent(self, obj: dict[str, Any], namespace: str | None = None) -> tuple[dict[str, Any], bool]:
        """Create, or return the existing object of that name. Returns (object, created)."""
        res = resource_for(obj)
        ns = namespace or obj["metadata"].get("namespace")
        try:
            return await self.create(obj, ns, res), True
        except Conflict:
            pass
        return await self.get(res, obj["metadata"]["name"], ns), False

    async def patch(self, res: Resource, name: str, body: Any, namespace: str | None = None, *,
                    patch_type: str = "merge", subresource: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"fieldManager": self.field_manager}
        return await self.request("PATCH", res.path(namespace, name, subresource), body=body,
                                  params=params, content_type=PATCH_TYPES[patch_type])

    async def patch_status(self, res: Resource, name: str, status: dict[str, Any],
                           namespace: str | None = None) -> dict[str, Any]:
        return await self.patch(res, name, {"status": status}, namespace, subresource="status")

    async def apply(self, obj: dict[str, Any], namespace: str | None = None, *, force: bool = True,
                    subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply with this client's field manager (JSON is valid apply YAML)."""
        res = resource_for(obj)
        ns = namespace or obj["metadata"].get("namespace")
        return await self.request(
            "PATCH", res.path(ns, obj["metadata"]["name"], subresource), body=obj,
            params={"fieldManager": self.field_manager, "force": force},
            content_type=PATCH_TYPES["apply"])

    async def delete(self, res: Resource, name: str, namespace: str | None = None, *,
                     propagation: str | None = "Background", missing_ok: bool = True) -> dict[str, Any] | None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation} if propagation else None
        try:
            return await self.request("DELETE", res.path(namespace, name), body=body)
        except NotFound:
            if missing_ok:
                return None
            raise

    async def bind_pod(self, name: str, namespace: str, node: str) -> dict[str, Any]:
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": namespace},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        return await self.request("POST", PODS.path(namespace, name, "binding"), body=binding)


async def _close_later(session: aiohttp.ClientSession, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
    finally:
        await session.close()
