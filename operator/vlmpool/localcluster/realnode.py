"""`vlmpool dev --kubeconfig K`: the quickstart on a cluster that already runs, with the operator installed by
the chart: the real node that `make dev` brings up (hack/node.sh dev). Nothing is started but a
`kubectl port-forward` to the pool's Service; Ctrl-C stops that and leaves the cluster (`make node-down`
removes it).

It sets the node's fake `nvidia.com/gpu` capacity to `--gpus`, makes the quickstart's files under
`--state-dir` (a directory the chart's `sources.allowHostPaths` lets pods read: the tiny PEFT adapter, and
with `--engine vllm` the tiny Qwen2.5-VL the real engine serves, reached through a claim), applies the
quickstart pool and adapter, waits until the adapter is Ready on every pod, sends one image chat through the
adapter, and prints how to call it (localcluster/quickstart.py has what is applied).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from vlmpool.localcluster.controlplane import find_binaries
from vlmpool.localcluster.quickstart import (
    ADAPTER,
    POOL,
    QUICKSTART_NS,
    VLLM_START_SECONDS,
    image_chat,
    make_material,
    quickstart_manifests,
    smoke_line,
    weights_volume,
)


class RunningCluster:
    """kubectl against a running cluster's kubeconfig."""

    def __init__(self, kubeconfig: Path, bin_dir: str | None = None):
        self.kubeconfig = Path(kubeconfig).resolve()
        self._kubectl = find_binaries(bin_dir) / "kubectl"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run([str(self._kubectl), f"--kubeconfig={self.kubeconfig}", *args], input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def set_gpus(self, gpus: int) -> list[str]:
        """Every node's fake `nvidia.com/gpu` capacity (what pools are scheduled on) set to `gpus`."""
        nodes = self.kubectl("get", "nodes", "-o", "name").stdout.split()
        patch = json.dumps([{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": str(gpus)}])
        for node in nodes:
            self.kubectl("patch", node, "--subresource=status", "--type=json", "-p", patch)
        return nodes

    def wait_exists(self, kind: str, name: str, namespace: str, timeout: float, stop: threading.Event) -> bool:
        """Whether `kind/name` exists within `timeout` s (False at once once `stop` is set)."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            if self.kubectl("get", kind, name, "-n", namespace, "-o", "name", check=False).returncode == 0:
                return True
            if time.monotonic() > deadline:
                return False
            stop.wait(0.5)
        return False

    def port_forward(self, namespace: str, service: str, port: int, stop: threading.Event,
                     timeout: float = 60) -> tuple[subprocess.Popen, int]:
        """`kubectl port-forward svc/SERVICE PORT:<its first port>` on 127.0.0.1 (through the apiserver and
        the kubelet: the Service's own address is inside the node's network namespace). Returns the
        process and the local port, once kubectl says it forwards."""
        svc = json.loads(self.kubectl("get", "svc", service, "-n", namespace, "-o", "json").stdout)
        remote = svc["spec"]["ports"][0]["port"]
        proc = subprocess.Popen([str(self._kubectl), f"--kubeconfig={self.kubeconfig}", "-n", namespace,
                                 "port-forward", "--address", "127.0.0.1", f"svc/{service}", f"{port}:{remote}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        assert proc.stdout is not None
        found: list[int] = []
        got = threading.Event()

        def read() -> None:  # its first line names the local port; the rest is drained so it never blocks
            for line in proc.stdout:  # type: ignore[union-attr]
                m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
                if m and not found:
                    found.append(int(m.group(1)))
                    got.set()
            got.set()

        threading.Thread(target=read, name="port-forward-output", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not got.wait(0.5):
            if stop.is_set() or time.monotonic() > deadline:
                break
        if not found:
            proc.terminate()
            raise RuntimeError(f"kubectl port-forward svc/{service} did not start (exit {proc.poll()})")
        return proc, found[0]


def run_on_cluster(args: argparse.Namespace) -> int:
    from vlmpool.localcluster.dev import wait_adapter_ready

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.monotonic()
    engine = getattr(args, "engine", "sim")
    cluster = RunningCluster(args.kubeconfig)
    nodes = cluster.set_gpus(args.gpus)
    print(f"{', '.join(nodes)}: nvidia.com/gpu capacity {args.gpus}", flush=True)
    if args.no_quickstart:
        return 0
    # The patch Job's pod and the engine (uid 65532, not root) read these through hostPath volumes (the
    # chart's sources.allowHostPaths covers the state directory).
    src, weights = make_material(Path(args.state_dir), engine)
    docs = quickstart_manifests(f"file://{src}", args.replicas, engine, getattr(args, "engine_image", None))
    if weights is not None:
        docs = [*weights_volume(weights), *docs]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
    what = "the real vLLM engine (its CPU build)" if engine == "vllm" else "the vLLM simulator"
    print(f"applied VLMPool/{POOL} ({args.replicas} pods running {what}) and VLMAdapter/{ADAPTER}; waiting until "
          "the adapter is Ready on all pods ...", flush=True)
    rollout_s = VLLM_START_SECONDS if engine == "vllm" else 600
    try:
        # Every pod of the pool up first (the scheduler places them on the node's GPUs), then the adapter
        # loaded on every one of them. The operator creates the Deployment after the pool is applied:
        # `rollout status` on a Deployment not there yet fails at once, so its existence is awaited first.
        if not cluster.wait_exists("deployment", POOL, QUICKSTART_NS, timeout=120, stop=stop):
            print(f"the operator made no Deployment/{POOL} in 120 s: kubectl describe vlmp {POOL}; "
                  "kubectl -n vlmpool-system logs deploy/vlmpool-operator", flush=True)
            return 130 if stop.is_set() else 1
        res = cluster.kubectl("rollout", "status", f"deployment/{POOL}", "-n", QUICKSTART_NS,
                              f"--timeout={rollout_s}s", check=False, timeout=rollout_s + 20)
        if stop.is_set():
            return 130
        if res.returncode != 0:
            print(f"the pool's pods are not all up: {res.stderr.strip()}\n"
                  f"  kubectl describe pods -n {QUICKSTART_NS} (e.g. not enough nvidia.com/gpu: --gpus)", flush=True)
            return 1
        status = wait_adapter_ready(cluster.kubectl, ADAPTER, QUICKSTART_NS, timeout=600, stop=stop)
    except KeyboardInterrupt:
        return 130
    print(f"adapter Ready, LOADED {status.get('loaded')}, version {status.get('version')} "
          f"({time.monotonic() - t0:.1f}s)\n", flush=True)
    print(cluster.kubectl("get", "vlmp,vlma,pods", "-n", QUICKSTART_NS, "-o", "wide").stdout, flush=True)
    proc, port = cluster.port_forward(QUICKSTART_NS, POOL, args.port, stop)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        smoke = image_chat(base)
        print(f"an image chat through {ADAPTER}: {smoke_line(smoke)} ({time.monotonic() - t0:.1f}s)", flush=True)
        if args.exit_when_ready:
            return 0 if smoke.get("status") == 200 else 1
        print(f"""Service/{POOL} (the pool's OpenAI-compatible API) is forwarded to {base}.

  export KUBECONFIG={cluster.kubeconfig}
  kubectl get vlmp,vlma,pods -o wide
  kubectl logs deploy/{POOL} -c proxy           # logs, exec and port-forward go through the apiserver

  curl -s {base}/models
  curl -s {base}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{ADAPTER}", "messages": [{{"role": "user", "content": "Describe the image."}}]}}'

Ctrl-C stops the port-forward; the node keeps running (make node-down removes it).""", flush=True)
        while not stop.wait(1):
            if proc.poll() is not None:
                print(f"kubectl port-forward exited ({proc.returncode})", flush=True)
                return 1
        return 0
    finally:
        proc.terminate()
        proc.wait(10)
