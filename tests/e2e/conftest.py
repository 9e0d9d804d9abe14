"""The e2e suite runs on a kubeconfig, in one of these modes (the `e2e` fixture is parametrized):

- "local": the local cluster (`vlmpool dev`'s DevCluster: real control plane, process kubelet) with the
  operator as a host process under a user bound to its ClusterRole;
- "helm": the same local cluster without that operator; the Helm chart (charts/vlmpool) is installed
  (watching the suite's namespace: a Role there, nothing cluster-wide) and its Deployment runs the
  operator as a pod under the process kubelet, with the chart's service account and RBAC. Stopping
  and starting the operator scale that Deployment to 0 and back to 1;
- "external": VLMPOOL_E2E_KUBECONFIG names a cluster (kind, via `make kind-e2e`) where the chart is
  already installed; pods are reached through `kubectl port-forward` and `kubectl exec`.

VLMPOOL_E2E_MODES=local,helm (the default) picks the local modes; with VLMPOOL_E2E_KUBECONFIG set only
"external" runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vlmpool.localcluster.controlplane import find_helm
from vlmpool.localcluster.runtime import mounts_supported
from vlmpool.testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "vlmpool"
HELM_RELEASE, HELM_NAMESPACE = "vlmpool", "vlmpool-system"
OPERATOR_SELECTOR = ("app.kubernetes.io/name=vlmpool,app.kubernetes.io/instance=vlmpool,"
                     "app.kubernetes.io/component=operator")
RESYNC_SECONDS = 15
METRICS_PORT = 8080  # the chart's operator.metricsPort
E2E_NAMESPACE = "e2e"  # the namespace test_e2e.py works in
# The real engine's module runs where its image is on the cluster's node (hack/node.sh test with
# NODE_ENGINE=vllm sets this; CI does): elsewhere it is not collected, rather than skipped.
collect_ignore = [] if os.environ.get("VLMPOOL_E2E_VLLM_IMAGE") else ["test_real_engine.py"]


def _modes() -> list[str]:
    if os.environ.get("VLMPOOL_E2E_KUBECONFIG"):
        return ["external"]
    modes = [m.strip() for m in os.environ.get("VLMPOOL_E2E_MODES", "local,helm").split(",") if m.strip()]
    unknown = set(modes) - {"local", "helm"}
    if unknown:
        raise pytest.UsageError(f"VLMPOOL_E2E_MODES: unknown mode(s) {sorted(unknown)} (local, helm)")
    return modes


class LocalE2E:
    """The local cluster: pods are processes on loopback addresses of this machine."""

    mode = "local"

    def __init__(self, dev):
        self.dev = dev
        self.kubeconfig = dev.kubeconfig
        self.kubectl = dev.kubectl

    def pod_url(self, pod: dict, port: int) -> str:
        return f"http://{pod['status']['podIP']}:{port}"

    def operator_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.dev.operator_metrics_port}/metrics"

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

    def close(self) -> None:
        pass


class ChartOperator:
    """The operator as the Helm chart's Deployment: stop/start scale it 0/1 and wait."""

    def _operator_pods(self) -> list[dict]:
        out = self.kubectl("get", "pods", "-n", HELM_NAMESPACE, "-l", OPERATOR_SELECTOR, "-o", "json")
        return json.loads(out.stdout)["items"]

    def operator_metrics_url(self) -> str:
        pods = [p for p in self._operator_pods() if not p["metadata"].get("deletionTimestamp")]
        return self.pod_url(pods[0], METRICS_PORT) + "/metrics"  # type: ignore[attr-defined]

    def _deployment(self) -> str:
        return f"deployment/{HELM_RELEASE}-operator"

    def stop_operator(self) -> None:
        self.kubectl("scale", "-n", HELM_NAMESPACE, self._deployment(), "--replicas=0")
        wait_for(lambda: not self._operator_pods(), 90, what="operator pod gone")

    def start_operator(self) -> None:
        self.kubectl("scale", "-n", HELM_NAMESPACE, self._deployment(), "--replicas=1")
        self.wait_operator_ready()

    def restart_operator(self) -> None:
        # RollingUpdate with leader election: the new pod starts as a follower and takes the Lease when
        # the old one releases it on SIGTERM, as in a real upgrade.
        self.kubectl("rollout", "restart", "-n", HELM_NAMESPACE, self._deployment())
        self.wait_operator_ready()

    def wait_operator_ready(self) -> None:
        self.kubectl("rollout", "status", "-n", HELM_NAMESPACE, self._deployment(), "--timeout=120s", timeout=130)

        def one_ready_pod():
            pods = [p for p in self._operator_pods() if not p["metadata"].get("deletionTimestamp")]
            return len(pods) == 1 and len(self._operator_pods()) == 1 and any(
                c["type"] == "Ready" and c["status"] == "True" for c in pods[0]["status"].get("conditions", []))
        wait_for(one_ready_pod, 90, what="exactly one ready operator pod")


class HelmE2E(ChartOperator, LocalE2E):
    """The local cluster with the operator installed by `helm install` (a pod under the process kubelet)."""

    mode = "helm"

    def __init__(self, dev, helm: Path):
        super().__init__(dev)
        self.helm = helm

    def install(self) -> None:
        # The chart's most restrictive shape: the operator watches the suite's namespace only, with a
        # Role there and no cluster-wide permission (tests/helm checks the cluster-wide RBAC).
        self.kubectl("create", "namespace", E2E_NAMESPACE, check=False)
        cmd = [str(self.helm), "install", HELM_RELEASE, str(CHART), "--kubeconfig", str(self.kubeconfig),
               "--namespace", HELM_NAMESPACE, "--create-namespace", "--wait", "--timeout", "180s",
               "--set", f"operator.resyncSeconds={RESYNC_SECONDS}", "--set", f"watch.namespaces={{{E2E_NAMESPACE}}}",
               "--set", f"sources.allowHostPaths={{{tempfile.gettempdir()}}}"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        if res.returncode != 0:
            raise RuntimeError(f"helm install failed ({res.returncode}): {res.stderr.strip()}\n{self._operator_logs()}")
        self.wait_operator_ready()

    def _operator_logs(self) -> str:
        logs = sorted(Path(self.dev.state_dir / "node").rglob("operator.log"))
        return "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]) for p in logs)


class ExternalE2E(ChartOperator):
    """A cluster where the chart is installed already (kind): kubectl port-forward and exec reach pods.

    VLMPOOL_E2E_VOLUME_ROOT (set by hack/kind-e2e.sh): a host directory mounted at the same path into the
    cluster's nodes; pool claims are then provisioned there as hostPath volumes (the local provisioner,
    run by this fixture), so adapter files can be checked from here and `file://` sources under the
    pytest base directory (also under that mount) are visible to patch Jobs. hack/node.sh's node runs
    that provisioner itself (one filesystem with this host), so it leaves this unset."""

    mode = "external"

    def __init__(self, kubeconfig: Path):
        self.kubeconfig = kubeconfig
        self.kubectl_bin = os.environ.get("VLMPOOL_KUBECTL") or shutil.which("kubectl") or "kubectl"
        self._forwards: dict[tuple[str, int], tuple[subprocess.Popen, int]] = {}
        self._lock = threading.Lock()
        self._provisioner = None

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run([self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args], input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def pod_url(self, pod: dict, port: int) -> str:
        key = (f"{pod['metadata']['namespace']}/{pod['metadata']['name']}", port)
        with self._lock:
            fwd = self._forwards.get(key)
            if fwd is None or fwd[0].poll() is not None:
                fwd = self._port_forward(pod, port)
                self._forwards[key] = fwd
            return f"http://127.0.0.1:{fwd[1]}"

    def service_url(self, name: str, port: int, namespace: str = E2E_NAMESPACE) -> str:
        """The Service `name` (kubectl port-forward picks one of its ready pods, as kube-proxy would)."""
        key = (f"{namespace}/service/{name}", port)
        with self._lock:
            fwd = self._forwards.get(key)
            if fwd is None or fwd[0].poll() is not None:
                fwd = self._port_forward({"metadata": {"namespace": namespace, "name": name}}, port, "service")
                self._forwards[key] = fwd
            return f"http://127.0.0.1:{fwd[1]}"

    def _port_forward(self, pod: dict, port: int, kind: str = "pod") -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen([self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", "port-forward", "-n",
                                 pod["metadata"]["namespace"], f"{kind}/{pod['metadata']['name']}",
                                 f":{port}", "--address=127.0.0.1"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+) ->", line)
            if m:
                # Keep draining its output so it never blocks on a full pipe.
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return proc, int(m.group(1))
        proc.kill()
        raise RuntimeError(f"kubectl port-forward to {pod['metadata']['name']}:{port} did not start")

    def kill_container(self, pod: dict, container: str) -> None:
        # PID 1 of the container is the vlmpool process, which exits on SIGTERM (a signal with a handler
        # reaches PID 1 of a PID namespace; SIGKILL from inside would not); the kubelet restarts it.
        self.kubectl("exec", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"], "-c", container, "--",
                     "python", "-c", "import os, signal; os.kill(1, signal.SIGTERM)", check=False)

    def adapter_files(self, pool: dict, namespace: str, adapter: str) -> Path | None:
        return LocalE2E.adapter_files(self, pool, namespace, adapter)  # type: ignore[arg-type]

    def start_provisioner(self, root: Path) -> None:
        """Provision pool claims as hostPath volumes under `root` (see the class docstring)."""
        import asyncio

        from vlmpool.kube.client import KubeClient
        from vlmpool.kube.config import KubeConfig
        from vlmpool.localcluster.provisioner import NodeProvisioner

        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                async with KubeClient(KubeConfig.load(self.kubeconfig)) as kube:
                    self._provisioner = NodeProvisioner(kube, root)
                    self._loop = asyncio.get_running_loop()
                    ready.set()
                    await self._provisioner.run()
            asyncio.run(main())
        self._thread = threading.Thread(target=run, name="e2e-provisioner", daemon=True)
        self._thread.start()
        ready.wait(30)

    def close(self) -> None:
        for proc, _ in self._forwards.values():
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self._provisioner is not None:
            self._loop.call_soon_threadsafe(self._provisioner.stop)
            self._thread.join(10)


# Module scope: each cluster is torn down as soon as the e2e module is done with it, not kept
# running (and polling) through the rest of the session.
@pytest.fixture(scope="module", params=_modes())
def e2e(request, tmp_path_factory):
    mode = request.param
    if mode == "external":
        ext = ExternalE2E(Path(os.environ["VLMPOOL_E2E_KUBECONFIG"]))
        if os.environ.get("VLMPOOL_E2E_VOLUME_ROOT"):
            ext.start_provisioner(Path(os.environ["VLMPOOL_E2E_VOLUME_ROOT"]))
        try:
            ext.wait_operator_ready()
            yield ext
        finally:
            ext.close()
        return
    ok, why = mounts_supported()
    if not ok:
        pytest.skip(f"local cluster unavailable here: {why}")
    from vlmpool.localcluster.dev import DevCluster

    helm = find_helm() if mode == "helm" else None
    dev = DevCluster(tmp_path_factory.mktemp(f"e2e-{mode}"), gpus=4, resync_seconds=RESYNC_SECONDS,
                     operator=mode == "local")
    dev.start()
    try:
        if mode == "helm":
            env = HelmE2E(dev, helm)
            env.install()
        else:
            env = LocalE2E(dev)
        yield env
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
    # On a real cluster (kind) the patch Jobs read these file:// sources as uid 65532, and pytest makes
    # its directories private (0700): open the test data up for reading.
    base = tmp_path_factory.getbasetemp()
    base.chmod(0o755)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return out
