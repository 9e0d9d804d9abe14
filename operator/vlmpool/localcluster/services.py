"""Reach a Service of the local cluster from the host.

Kubernetes refuses loopback addresses in EndpointSlices, so the local cluster has no Service
routing; this forwarder plays kube-proxy for one Service: it listens on a host port and splices each
TCP connection to one of the Service's ready pods (round robin), chosen from the live Pod list.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import aiohttp

from vlmpool.kube.client import PODS, ApiError, KubeClient, Resource

log = logging.getLogger("vlmpool.services")
SERVICES = Resource("", "v1", "services")


class ServiceForwarder:
    def __init__(self, kube: KubeClient, namespace: str, service: str, host: str = "127.0.0.1", port: int = 0,
                 refresh: float = 1.0):
        self.kube, self.namespace, self.service = kube, namespace, service
        self.host, self.port, self.refresh = host, port, refresh
        self._targets: list[tuple[str, int]] = []
        self._has_targets = asyncio.Event()
        self._rr = itertools.count()
        self._server: asyncio.base_events.Server | None = None
        self._task: asyncio.Task | None = None

    async def _resolve(self) -> None:
        svc = await self.kube.get(SERVICES, self.service, self.namespace)
        selector = ",".join(f"{k}={v}" for k, v in (svc["spec"].get("selector") or {}).items())
        port = svc["spec"]["ports"][0]
        target = port.get("targetPort", port["port"])
        targets = []
        for pod in await self.kube.list(PODS, self.namespace, label_selector=selector):
            st = pod.get("status") or {}
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or [])
            if not ready or not st.get("podIP") or pod["metadata"].get("deletionTimestamp"):
                continue
            number = target
            if isinstance(target, str):
                number = next((p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []
                               if p.get("name") == target), None)
            if number:
                targets.append((st["podIP"], int(number)))
        self._targets = sorted(targets)
        if self._targets:
            self._has_targets.set()
        else:
            self._has_targets.clear()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self._resolve()
            except (ApiError, aiohttp.ClientError, KeyError) as e:
                log.debug("service %s/%s: %s", self.namespace, self.service, e)
            await asyncio.sleep(self.refresh)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until the Service has a ready pod (as a client of a real Service would be refused
        meanwhile, not left hanging)."""
        try:
            await asyncio.wait_for(self._has_targets.wait(), timeout)
        except TimeoutError:
            pass
        return bool(self._targets)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        targets = self._targets
        if not targets:
            writer.close()
            return
        host, port = targets[next(self._rr) % len(targets)]
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def start(self) -> int:
        await self._resolve()
        self._task = asyncio.create_task(self._refresh_loop())
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    @property
    def ready_targets(self) -> list[tuple[str, int]]:
        return list(self._targets)
