"""The e2e suite runs on a kubeconfig. By default it starts the local cluster (`vlmpool dev`'s
DevCluster: real control plane, process kubelet, operator under its RBAC) for the session; set
VLMPOOL_E2E_KUBECONFIG to run it against another cluster (kind, via `make kind-e2e`) where the
operator is already installed: the tests then reach pods through `kubectl port-forward` and `kubectl
exec` instead of the local pod addresses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlmpool.localcluster.runtime import mounts_supported


class LocalE2E:
    """The local cluster: pods are processes on loopback addresses of this machine."""

    def __init__(self, dev):
        self.dev = dev
        self.kubeconfig = dev.kubeconfig
        self.kubectl = dev.kubectl

    def pod_url(self, pod: dict, port: int) -> str:
        return f"http://{pod['status']['podIP']}:{port}"

    def kill_container(self, pod: dict, container: str) -> None:
        cs = next(c for c in pod["status"]["containerStatuses"] if c["name"] == container)
        os.kill(int(cs["containerID"].split("://", 1)[1]), 9)

    def adapter_files(self, pool: dict, namespace: str, adapter: str) -> Path | None:
        """The adapter's directory on the pool's volume."""
        claim = pool["spec"].get("adapterVolume", {}).get("claimName") or f"{pool['metadata']['name']}-adapters"
        pvc = json.loads(self.kubectl("get", "pvc", claim, "-n", namespace, "-o", "json").stdout)
        pv = json.loads(self.kubectl("get", "pv", pvc["spec"]["volumeName"], "-o", "json").stdout)
        return Path(pv["spec"]["hostPath"]["path"]) / adapter

    def restart_operator(self) -> None:
        self.dev.restart_operator()

    def stop_operator(self) -> None:
        self.dev.stop_operator()

    def start_operator(self) -> None:
        self.dev.start_operator()


@pytest.fixture(scope="session")
def e2e(tmp_path_factory):
    if os.environ.get("VLMPOOL_E2E_KUBECONFIG"):
        pytest.skip("external-cluster mode is driven by `make kind-e2e` (needs Docker and kind)")
    ok, why = mounts_supported()
    if not ok:
        pytest.skip(f"local cluster unavailable here: {why}")
    from vlmpool.localcluster.dev import DevCluster

    dev = DevCluster(tmp_path_factory.mktemp("e2e-cluster"), gpus=4, resync_seconds=15)
    dev.start()
    try:
        yield LocalE2E(dev)
    finally:
        dev.stop()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory):
    """Real PEFT adapters of a tiny Qwen2.5-VL: two versions of one fine-tune, and two bad ones."""
    import torch

    from vlmpool.testing.adapters import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    out = {
        "v1": make_adapter("qwen2_5_vl", root / "v1", seed=1),
        "v2": make_adapter("qwen2_5_vl", root / "v2", seed=2),
        "other": make_adapter("qwen2_5_vl", root / "other", seed=3),
        "wrong-base": make_adapter("qwen2_5_vl", root / "wrong-base", base_name="Qwen/Qwen2-VL-7B-Instruct"),
    }
    pickle = make_adapter("qwen2_5_vl", root / "pickle", seed=4)
    from safetensors.torch import load_file

    tensors = load_file(str(pickle / "adapter_model.safetensors"))
    torch.save(tensors, pickle / "adapter_model.bin")
    (pickle / "adapter_model.safetensors").unlink()
    out["pickle"] = pickle
    return out
