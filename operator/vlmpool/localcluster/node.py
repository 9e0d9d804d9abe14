"""Run the process kubelet and the local provisioner in a background thread with its own event
loop, for tests and for `vlmpool dev` (which runs them in its own loop instead)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from urllib.parse import urlparse

from vlmpool.kube.client import KubeClient
from vlmpool.kube.config import KubeConfig
from vlmpool.localcluster.kubelet import NodeConfig, ProcessKubelet
from vlmpool.localcluster.provisioner import LocalProvisioner


class LocalNode:
    """`with LocalNode(kubeconfig, state_dir) as node:` — a node whose pods run as processes."""

    def __init__(self, kubeconfig: Path, state_dir: Path, node: NodeConfig | None = None):
        self.kubeconfig, self.state_dir = Path(kubeconfig), Path(state_dir)
        self.node_config = node or NodeConfig()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.kubelet: ProcessKubelet | None = None
        self.provisioner: LocalProvisioner | None = None

    async def _main(self) -> None:
        cfg = KubeConfig.load(self.kubeconfig)
        url = urlparse(cfg.server)
        async with KubeClient(cfg) as kube:
            self.kubelet = ProcessKubelet(kube, self.state_dir, self.node_config, url.hostname or "127.0.0.1",
                                          url.port or 443)
            self.provisioner = LocalProvisioner(kube, self.state_dir / "volumes")
            ready = asyncio.Event()
            prov = asyncio.create_task(self.provisioner.run())
            kl = asyncio.create_task(self.kubelet.run(ready))
            waiter = asyncio.create_task(ready.wait())
            done, _ = await asyncio.wait({kl, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if kl in done:
                kl.result()
            self._ready.set()
            await kl
            self.provisioner.stop()
            await prov

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    def start(self, timeout: float = 30) -> LocalNode:
        self._thread = threading.Thread(target=self._run, name="process-kubelet", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("process kubelet did not register its node in time")
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop and self.kubelet and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.kubelet.stop)
            self._thread.join(60)

    def __enter__(self) -> LocalNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
