"""`vlmpool dev`: the whole system on this machine, no Docker, no GPU.

Starts a real control plane (etcd, kube-apiserver, kube-controller-manager), the process kubelet, the
CRDs and the operator; applies a quickstart (a pool of two pods whose engine is the vLLM simulator,
and an adapter made on the spot from a tiny generated PEFT adapter); waits until the adapter is Ready
on every pod, sends one image chat through it, and prints how to call it. Ctrl-C stops everything; state
lives in --state-dir. With --kubeconfig the same quickstart goes to a running cluster (the real node:
`make dev`), where `--engine vllm` runs vLLM itself in the pool's pods (localcluster/realnode.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vlmpool.localcluster.quickstart import (
    ADAPTER,
    DEFAULT_VLLM_IMAGE,
    ENGINES,
    POOL,
    QUICKSTART_NS,
    image_chat,
    make_material,
    quickstart_manifests,
    smoke_line,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("VLMPOOL_DEV_DIR", ".vlmpool/dev")),
                        help="where the cluster's state, logs and kubeconfig live (default .vlmpool/dev)")
    parser.add_argument("--port", type=int, default=8000,
                        help="host port of the pool's OpenAI-compatible Service (default 8000; 0 picks one)")
    parser.add_argument("--replicas", type=int, default=2, help="pods in the quickstart pool (default 2)")
    parser.add_argument("--gpus", type=int, default=8, help="fake nvidia.com/gpu capacity of the node (default 8)")
    parser.add_argument("--engine", choices=ENGINES, default="sim",
                        help="the pool's engine: sim (the vLLM simulator, the fast default) or vllm (vLLM itself, "
                             "its CPU build, serving a tiny Qwen2.5-VL made here; the real node only: "
                             "make dev DEV_ARGS=\"--engine vllm\")")
    parser.add_argument("--engine-image", default=DEFAULT_VLLM_IMAGE,
                        help=f"the real engine's image with --engine vllm (default {DEFAULT_VLLM_IMAGE}, which "
                             "NODE_ENGINE=vllm make node builds and imports)")
    parser.add_argument("--no-quickstart", action="store_true", help="start the cluster only")
    parser.add_argument("--exit-when-ready", action="store_true",
                        help="stop everything once the quickstart adapter is Ready and has answered an image chat "
                             "(a smoke test; exit 1 if it did not)")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="the quickstart on this running cluster, operator installed by the chart (the real "
                             "node: `make dev`), instead of starting the process kubelet's")


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
    if args.engine != "sim":
        print("vlmpool dev: the process kubelet runs no images, and the real engine is one (images/vllm-cpu): "
              "run it on the real node, make dev DEV_ARGS=\"--engine vllm\" (hack/node.sh dev --engine vllm)")
        return 2
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
        src, _ = make_material(cluster.state_dir, "sim")
        docs = quickstart_manifests(f"file://{src}", args.replicas)
        cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
        print(f"applied VLMPool/{POOL} and VLMAdapter/{ADAPTER}; waiting until the adapter is Ready on all pods ...",
              flush=True)
        status = cluster.wait_adapter_ready(ADAPTER, QUICKSTART_NS, stop=stop)
        print(f"adapter Ready, LOADED {status.get('loaded')}, version {status.get('version')} "
              f"({time.monotonic() - t0:.1f}s since start)\n", flush=True)
        print(cluster.kubectl("get", "vlmp,vlma", "-n", QUICKSTART_NS).stdout, flush=True)
        return _serve(cluster, args.port, stop, exit_when_ready=args.exit_when_ready)
    except KeyboardInterrupt:
        return 130
    finally:
        print("stopping ...", flush=True)
        cluster.stop()


def _serve(cluster, port: int, stop, exit_when_ready: bool = False) -> int:
    """The pool's Service forwarded to this host; one image chat through the adapter; then, unless
    `exit_when_ready` (which returns 0 if that chat answered 200, else 1), serve until Ctrl-C."""
    import asyncio

    from vlmpool.kube.client import KubeClient
    from vlmpool.kube.config import KubeConfig
    from vlmpool.localcluster.services import ServiceForwarder

    code = 0

    async def main() -> None:
        nonlocal code
        async with KubeClient(KubeConfig.load(cluster.kubeconfig)) as kube:
            fwd = ServiceForwarder(kube, QUICKSTART_NS, POOL, port=port)
            bound = await fwd.start()
            if not await fwd.wait_ready(120):
                print(f"warning: Service/{POOL} has no ready pod yet", flush=True)
            base = f"http://127.0.0.1:{bound}/v1"
            smoke = await asyncio.to_thread(image_chat, base)
            print(f"an image chat through {ADAPTER}: {smoke_line(smoke)}", flush=True)
            if exit_when_ready:
                code = 0 if smoke.get("status") == 200 else 1
                await fwd.stop()
                return
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
    return code
