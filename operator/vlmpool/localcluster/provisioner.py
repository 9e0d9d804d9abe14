"""A local-path volume provisioner: PersistentVolumeClaims of the `vlmpool-local` StorageClass (the
cluster default) get a PersistentVolume backed by a directory under the state directory, pre-bound
to the claim so kube-controller-manager's PV controller completes the binding. Released volumes are
deleted with their directory (reclaim policy Delete)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import aiohttp

from vlmpool.kube.client import ApiError, Conflict, KubeClient, NotFound, Resource

log = logging.getLogger("vlmpool.provisioner")

STORAGE_CLASSES = Resource("storage.k8s.io", "v1", "storageclasses", namespaced=False)
PVCS = Resource("", "v1", "persistentvolumeclaims")
PVS = Resource("", "v1", "persistentvolumes", namespaced=False)

CLASS_NAME = "vlmpool-local"
PROVISIONER = "vlmpool.io/local-path"


class LocalProvisioner:
    def __init__(self, kube: KubeClient, root: Path, interval: float = 0.5):
        self.kube = kube
        self.root = Path(root)
        self.interval = interval
        self._stop = asyncio.Event()

    def storage_class(self) -> dict:
        return {
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": CLASS_NAME,
                         "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
        }

    async def ensure_class(self) -> None:
        try:
            await self.kube.request("POST", STORAGE_CLASSES.path(), body=self.storage_class())
        except Conflict:
            pass

    def volume(self, pvc: dict) -> dict:
        meta, spec = pvc["metadata"], pvc["spec"]
        name = f"pvc-{meta['uid']}"
        path = self.root / name
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        return {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
            "spec": {
                "capacity": {"storage": storage},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": CLASS_NAME,
                "volumeMode": spec.get("volumeMode", "Filesystem"),
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                             "name": meta["name"], "uid": meta["uid"]},
            },
        }

    async def sync_once(self) -> None:
        for pvc in await self.kube.list(PVCS):
            spec = pvc.get("spec") or {}
            if spec.get("volumeName") or spec.get("storageClassName") != CLASS_NAME:
                continue
            if (pvc.get("status") or {}).get("phase") != "Pending" or pvc["metadata"].get("deletionTimestamp"):
                continue
            pv = self.volume(pvc)
            await asyncio.to_thread(Path(pv["spec"]["hostPath"]["path"]).mkdir, parents=True, exist_ok=True)
            try:
                await self.kube.request("POST", PVS.path(), body=pv)
                log.info("provisioned %s for %s/%s", pv["metadata"]["name"], pvc["metadata"]["namespace"],
                         pvc["metadata"]["name"])
            except Conflict:
                pass
        for pv in await self.kube.list(PVS):
            ann = pv["metadata"].get("annotations") or {}
            if ann.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            if (pv.get("status") or {}).get("phase") in ("Released", "Failed") and \
                    pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                path = Path(pv["spec"]["hostPath"]["path"])
                if path.is_relative_to(self.root):
                    shutil.rmtree(path, ignore_errors=True)
                try:
                    await self.kube.request("DELETE", PVS.path(None, pv["metadata"]["name"]))
                    log.info("deleted released volume %s", pv["metadata"]["name"])
                except NotFound:
                    pass

    async def run(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        await self.ensure_class()
        while not self._stop.is_set():
            try:
                await self.sync_once()
            except (ApiError, aiohttp.ClientError) as e:
                log.warning("provisioner sync failed: %s", e)
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()


class NodeProvisioner(LocalProvisioner):
    """The provisioner of a real node (hack/node.sh, kind-e2e): hostPath volumes in a directory the node
    and this host share, opened to the images' uid 65532 (they run as that user, not as root)."""

    def volume(self, pvc: dict) -> dict:
        pv = super().volume(pvc)
        path = Path(pv["spec"]["hostPath"]["path"])
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        return pv


def main(argv: list[str] | None = None) -> None:
    """`python -m vlmpool.localcluster.provisioner --kubeconfig K --root DIR`: the real node's provisioner
    (hack/node.sh runs it as a node component), until SIGTERM."""
    import argparse
    import signal

    from vlmpool.kube.config import KubeConfig

    ap = argparse.ArgumentParser(prog="vlmpool-provisioner", description=main.__doc__)
    ap.add_argument("--kubeconfig", type=Path, required=True)
    ap.add_argument("--root", type=Path, required=True, help="the directory the volumes are made in")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        async with KubeClient(KubeConfig.load(args.kubeconfig)) as kube:
            prov = NodeProvisioner(kube, args.root)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, prov.stop)
            await prov.run()

    asyncio.run(run())


if __name__ == "__main__":
    main()
