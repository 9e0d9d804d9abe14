"""`vlmpool dev`: the whole system on this machine, no Docker, no GPU.

Starts a real control plane (etcd, kube-apiserver, kube-controller-manager), the process kubelet, the
CRDs and the operator; applies a quickstart (a pool of two pods whose engine is the vLLM simulator,
and an adapter made on the spot from a tiny generated PEFT adapter); waits until the adapter is Ready
on every pod, and prints how to call it. Ctrl-C stops everything; state lives in --state-dir.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

QUICKSTART_NS = "default"
POOL = "demo"
ADAPTER = "demo-adapter"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("VLMPOOL_DEV_DIR", ".vlmpool/dev")),
                        help="where the cluster's state, logs and kubeconfig live (default .vlmpool/dev)")
    parser.add_argument("--port", type=int, default=8000,
                        help="host port of the pool's OpenAI-compatible Service (default 8000; 0 picks one)")
    parser.add_argument("--replicas", type=int, default=2, help="pods in the quickstart pool (default 2)")
    parser.add_argument("--gpus", type=int, default=8, help="fake nvidia.com/gpu capacity of the node (default 8)")
    parser.add_argument("--no-quickstart", action="store_true", help="start the cluster only")
    parser.add_argument("--exit-when-ready", action="store_true",
                        help="stop everything once the quickstart adapter is Ready (a smoke test)")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="the quickstart on this running cluster, operator installed by the chart (the real "
                             "node: `make dev`), instead of starting the process kubelet's")


def quickstart_manifests(adapter_uri: str, replicas: int) -> list[dict]:
    pool = {
        "apiVersion": "vlmpool.io/v1alpha1", "kind": "VLMPool",
        "metadata": {"name": POOL, "namespace": QUICKSTART_NS},
        "spec": {
            "model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "servedName": "qwen2.5-vl-3b", "family": "qwen2_5_vl"},
            "replicas": replicas,
            "engine": {"gpus": 1, "maxLoras": 4, "maxCpuLoras": 8, "maxLoraRank": 64},
            "proxy": {"concurrency": 16},
        },
    }
    adapter = {
        "apiVersion": "vlmpool.io/v1alpha1", "kind": "VLMAdapter",
        "metadata": {"name": ADAPTER, "namespace": QUICKSTART_NS},
        "spec": {"poolRef": {"name": POOL}, "source": {"uri": adapter_uri}},
    }
    return [pool, adapter]


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    import signal
    import threading
    import time

    from vlmpool.localcluster.dev import DevCluster
    from vlmpool.localcluster.runtime import mounts_supported

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.kubeconfig:
        from vlmpool.localcluster.realnode import run_on_cluster

        return run_on_cluster(args)
    ok, why = mounts_supported()
    if not ok:
        print(f"vlmpool dev: {why}")
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.monotonic()
    cluster = DevCluster(args.state_dir, gpus=args.gpus)
    print(f"starting the local cluster in {cluster.state_dir} ...", flush=True)
    cluster.start()
    try:
        if stop.is_set():
            return 130
        kc = cluster.kubeconfig
        print(f"control plane up ({time.monotonic() - t0:.1f}s). export KUBECONFIG={kc}", flush=True)
        if args.no_quickstart:
            if not args.exit_when_ready:
                stop.wait()
            return 0
        src = cluster.state_dir / "quickstart" / ADAPTER
        if not (src / "adapter_model.safetensors").exists():
            from vlmpool.testing.adapters import make_adapter

            print("generating a tiny PEFT LoRA adapter for Qwen2.5-VL ...", flush=True)
            make_adapter("qwen2_5_vl", src, r=8, alpha=16)
        docs = quickstart_manifests(f"file://{src}", args.replicas)
        cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
        print(f"applied VLMPool/{POOL} and VLMAdapter/{ADAPTER}; waiting until the adapter is Ready on all pods ...",
              flush=True)
        status = cluster.wait_adapter_ready(ADAPTER, QUICKSTART_NS, stop=stop)
        print(f"adapter Ready, LOADED {status.get('loaded')}, version {status.get('version')} "
              f"({time.monotonic() - t0:.1f}s since start)\n", flush=True)
        print(cluster.kubectl("get", "vlmp,vlma", "-n", QUICKSTART_NS).stdout, flush=True)
        if args.exit_when_ready:
            return 0
        return _serve(cluster, args.port, stop)
    except KeyboardInterrupt:
        return 130
    finally:
        print("stopping ...", flush=True)
        cluster.stop()


def _serve(cluster, port: int, stop) -> int:
    import asyncio

    from vlmpool.kube.client import KubeClient
    from vlmpool.kube.config import KubeConfig
    from vlmpool.localcluster.services import ServiceForwarder

    async def main() -> None:
        async with KubeClient(KubeConfig.load(cluster.kubeconfig)) as kube:
            fwd = ServiceForwarder(kube, QUICKSTART_NS, POOL, port=port)
            bound = await fwd.start()
            if not await fwd.wait_ready(120):
                print(f"warning: Service/{POOL} has no ready pod yet", flush=True)
            base = f"http://127.0.0.1:{bound}/v1"
            print(f"""The pool's OpenAI-compatible API is at {base} (a local stand-in for Service/{POOL}).

  export KUBECONFIG={cluster.kubeconfig}
  kubectl get vlmp,vlma

  curl -s {base}/models
  curl -s {base}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{ADAPTER}", "messages": [{{"role": "user", "content": "Describe the image."}}]}}'

  python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="unused")
r = client.chat.completions.create(model="{ADAPTER}", messages=[{{"role": "user", "content": "hello"}}])
print(r.choices[0].message.content)
PY

Ctrl-C stops everything (state stays in {cluster.state_dir}).""", flush=True)
            await asyncio.to_thread(stop.wait)  # a threading.Event: set by the signal handlers
            await fwd.stop()

    asyncio.run(main())
    return 0
