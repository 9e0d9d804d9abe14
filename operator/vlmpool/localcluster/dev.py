"""The whole system on one machine, no Docker: a real control plane, the process kubelet and local
provisioner, the CRDs, and the operator (a local process under its own RBAC rules). Used by
`vlmpool dev` and by the e2e tests."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmpool.api.crdgen import render as render_crds
from vlmpool.controller import rbac
from vlmpool.localcluster.controlplane import ControlPlane, free_port
from vlmpool.localcluster.kubelet import NodeConfig
from vlmpool.localcluster.node import LocalNode
from vlmpool.names import ADAPTER_PLURAL, ADAPTER_SHORT, GROUP, POOL_PLURAL

log = logging.getLogger("vlmpool.dev")

OPERATOR_USER = "vlmpool-operator"


@dataclass
class DevCluster:
    state_dir: Path
    gpus: int = 8
    operator: bool = True
    operator_args: list[str] = field(default_factory=list)
    resync_seconds: float = 30.0

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.cp = ControlPlane(workdir=self.state_dir / "control-plane")
        self.node: LocalNode | None = None
        self._operator: subprocess.Popen | None = None
        self.operator_metrics_port = 0

    @property
    def kubeconfig(self) -> Path:
        return self.cp.kubeconfig

    def kubectl(self, *args: str, **kw):
        return self.cp.kubectl(*args, **kw)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> DevCluster:
        t0 = time.monotonic()
        self.cp.start()
        try:
            self.install_crds()
            self.node = LocalNode(self.cp.kubeconfig, self.state_dir / "node", NodeConfig(gpus=self.gpus)).start()
            if self.operator:
                self.start_operator()
        except BaseException:
            self.stop()
            raise
        log.info("local cluster up in %.1fs", time.monotonic() - t0)
        return self

    def install_crds(self) -> None:
        docs = "---\n".join(render_crds().values())
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=vlmpool-dev", "-f", "-",
                     input=docs)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                     f"crd/{POOL_PLURAL}.{GROUP}", f"crd/{ADAPTER_PLURAL}.{GROUP}")

    def operator_kubeconfig(self) -> Path:
        """A kubeconfig for a user bound to exactly the operator's ClusterRole."""
        docs = [rbac.cluster_role(), rbac.cluster_role_binding([rbac.subject_user(OPERATOR_USER)])]
        self.kubectl("apply", "-f", "-", input="---\n".join(yaml.safe_dump(d) for d in docs))
        return self.cp.kubeconfig_for(OPERATOR_USER)

    def _token_key(self) -> Path:
        """The key the pools' admin tokens derive from, kept with the cluster's state."""
        path = self.state_dir / "operator-token-key"
        if not path.exists():
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path

    def start_operator(self) -> None:
        kc = self.operator_kubeconfig()
        self.operator_metrics_port = free_port()
        logs = self.state_dir / "logs"
        logs.mkdir(exist_ok=True)
        fh = open(logs / "operator.log", "ab")
        argv = [sys.executable, "-m", "vlmpool", "operator", "--all-namespaces", "--kubeconfig", str(kc),
                "--metrics-host", "127.0.0.1", "--metrics-port", str(self.operator_metrics_port),
                "--resync-seconds", str(self.resync_seconds),
                # A one-user local cluster: file:// sources may name any local path.
                "--allow-host-path", "/", "--token-key-file", str(self._token_key()), *self.operator_args]
        self._operator = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        fh.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._operator.poll() is not None:
                raise RuntimeError(f"operator exited with {self._operator.returncode}; see {logs / 'operator.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.operator_metrics_port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"operator not healthy after 60s; see {logs / 'operator.log'}")

    def stop_operator(self, sig: int = 15) -> None:
        if self._operator and self._operator.poll() is None:
            os.killpg(self._operator.pid, sig)
            try:
                self._operator.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self._operator.pid, 9)
                self._operator.wait(10)
        self._operator = None

    def restart_operator(self) -> None:
        self.stop_operator()
        self.start_operator()

    def stop(self) -> None:
        self.stop_operator()
        if self.node:
            self.node.stop()
            self.node = None
        self.cp.stop()

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- helpers ---------------------------------------------------------------------------------
    def get(self, kind: str, name: str, namespace: str = "default") -> dict:
        return json.loads(self.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)

    def wait_adapter_ready(self, name: str, namespace: str = "default", timeout: float = 300,
                           stop=None) -> dict:
        return wait_adapter_ready(self.kubectl, name, namespace, timeout, stop)


def wait_adapter_ready(kubectl, name: str, namespace: str = "default", timeout: float = 300, stop=None) -> dict:
    """Wait until the adapter is Ready on every pod (`kubectl` runs kubectl against the cluster); `stop`
    (a threading.Event) aborts the wait with KeyboardInterrupt, so Ctrl-C during the wait still stops
    everything cleanly."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        res = kubectl("get", ADAPTER_SHORT, name, "-n", namespace, "-o", "json", check=False)
        if res.returncode == 0:
            last = json.loads(res.stdout).get("status") or {}
            if last.get("phase") == "Failed":
                raise RuntimeError(f"adapter {name} Failed: {last.get('reason')}: {last.get('message')}")
            if last.get("phase") == "Ready" and last.get("loadedPods") and \
                    last.get("loadedPods") == last.get("desiredPods"):
                return last
        time.sleep(0.5)
    raise TimeoutError(f"adapter {name} not Ready on all pods after {timeout}s: {last}")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
