#!/usr/bin/env python3
"""LoRA-affinity routing vs the plain Service, side by side in one run: adapter swaps per request and
latency, many adapters, a small maxLoras.

Everything is the real path of tests/routing: the test control plane (kube-apiserver + etcd, no
controller manager), the GIE InferencePool CRD, two pool pods (each a real vlmpool proxy before the
simulator, on its own loopback IP), and the real endpoint picker (EPP, `make epp`) configured as the
operator renders it. A closed loop of clients sends chat completions for adapters drawn uniformly at
random; per request the pod is chosen
- plain: at random (what kube-proxy does for the pool's Service);
- affinity: by the EPP through its ext_proc API (what Envoy asks it), then sent to that pod.

The simulator models the engine's LoRA cost (sim/engine.py): at most `max_loras` distinct adapters run
in one batch (a request for another waits, vLLM's scheduler rule), and GPU LoRA slots are an LRU of
`max_loras`; a request whose adapter is in no slot is admitted after an activation (a swap) costing
`--swap-ms`. Swaps per request = the engines' activations / requests answered.

    VLMPOOL_K8S_BIN=... .venv/bin/python bench/routing.py            # 8 adapters, maxLoras 2, 16 clients
    .venv/bin/python bench/routing.py --adapters 16 --duration 20

The last line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "routing"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import percentile  # noqa: E402
from routing_helpers import (  # noqa: E402
    ExtProcClient,
    LoopThread,
    ModelPod,
    adapter_paths,
    apply_pool_objects,
    common_free_port,
    install_inferencepool_crd,
    pod_ips,
    pool_spec,
    start_epp,
    stop_process,
    wait_for_picks,
)

from vlmpool.localcluster.controlplane import ControlPlane  # noqa: E402


async def run_mode(mode: str, pods: list[ModelPod], client: ExtProcClient, names: list[str], clients: int,
                   duration: float, tokens: int) -> dict:
    by_endpoint = {p.endpoint: p for p in pods}
    before = sum(p.engine.lora_activations for p in pods)
    lat: list[float] = []
    errors = 0
    rng = random.Random(7)
    stop = time.monotonic() + duration

    async def one_client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < stop:
            model = rng.choice(names)
            t0 = time.perf_counter()
            if mode == "affinity":
                endpoint = await asyncio.to_thread(client.pick, model)
                pod = by_endpoint.get(endpoint or "", pods[0])
            else:
                pod = rng.choice(pods)
            body = {"model": model, "messages": [{"role": "user", "content": "bench"}], "max_tokens": tokens,
                    "ignore_eos": True}
            async with session.post(pod.url + "/v1/chat/completions", json=body) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    continue
            lat.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one_client(session) for _ in range(clients)))
    swaps = sum(p.engine.lora_activations for p in pods) - before
    return {"mode": mode, "requests": len(lat), "errors": errors, "rps": round(len(lat) / duration, 2),
            "swaps": swaps, "swaps_per_request": round(swaps / max(1, len(lat)), 3),
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p99_ms": round(1000 * percentile(lat, 0.99), 1) if lat else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-loras", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per answer (ignore_eos)")
    ap.add_argument("--tpot-ms", type=float, default=10.0)
    ap.add_argument("--swap-ms", type=float, default=25.0, help="cost of one GPU-slot activation in the simulator")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vlmpool-bench-routing-"))
    cp = ControlPlane(workdir=work / "cp", controller_manager=False).start()
    loops = LoopThread()
    ips = pod_ips()
    port = common_free_port(ips)
    sim = {"max_loras": args.max_loras, "max_num_seqs": 64, "ttft_ms": 20.0, "tpot_ms": args.tpot_ms}
    pods = [ModelPod("vision-a", ips[0], port, sim=sim), ModelPod("vision-b", ips[1], port, sim=sim)]
    names = [f"adapter-{i}" for i in range(args.adapters)]
    epp = client = None
    try:
        ns = f"bench-{uuid.uuid4().hex[:6]}"
        cp.kubectl("create", "namespace", ns)
        cp.kubectl("create", "serviceaccount", "default", "-n", ns)  # no controller manager here
        install_inferencepool_crd(cp)
        paths = adapter_paths(work / "adapters", tuple(names))
        for pod in pods:
            loops.run(pod.start(paths))
            pod.engine.lora_activate_ms = args.swap_ms
        spec = pool_spec(port)
        apply_pool_objects(cp, ns, pods, spec)
        epp = start_epp(cp, ns, spec, work)
        client = ExtProcClient(epp.grpc_port)
        os.environ.setdefault("CI", "")
        wait_for_picks(client, epp)
        results = []
        for mode in ("plain", "affinity"):
            r = loops.run(run_mode(mode, pods, client, names, args.clients, args.duration, args.tokens),
                          timeout=args.duration + 120)
            results.append(r)
            print(f"{mode:9s} {r['requests']:6d} req  {r['rps']:7.1f} req/s  swaps/req {r['swaps_per_request']:.3f}  "
                  f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  errors {r['errors']}")
        print(json.dumps({"adapters": args.adapters, "max_loras": args.max_loras, "pods": 2, "clients": args.clients,
                          "duration_s": args.duration, "tokens": args.tokens, "tpot_ms": args.tpot_ms,
                          "swap_ms": args.swap_ms, "cores": os.cpu_count(), "results": results}))
    finally:
        if client is not None:
            client.close()
        if epp is not None:
            stop_process(epp.proc)
        for pod in pods:
            loops.run(pod.stop())
        loops.stop()
        cp.stop()


if __name__ == "__main__":
    main()
