"""Cold path of vlmpool on the local cluster (real control plane, process kubelet, operator, patch
Jobs, proxies and simulator engines as processes).

1. apply → Ready: time from `kubectl apply` of a VLMAdapter to Ready with LOADED m/m, for several
   adapters one after the other (each a fresh tiny PEFT LoRA: fetch, verify, patch, publish, push, load).
2. restart convergence: N adapters on M pods; stop the operator, make every engine forget every
   adapter (a fleet-wide engine restart), start the operator, and time until every engine has every
   adapter loaded again (N*M loads) with no request sent.

The baseline is the seed (roboflow's in-process adapter manager), whose cold path took 2.4 s per
adapter as quoted in its PR description; it is not re-run here (it needs the roboflow inference
server), so the ratio is against that quoted figure. Prints a table and, last, one JSON line.

    .venv/bin/python bench/coldpath.py [--adapters 4] [--pods 2] [--restart-adapters 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SEED_COLD_PATH_S = 2.4
NS = "bench"
POOL = "bench"


def http_json(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=4, help="adapters applied one after the other (default 4)")
    ap.add_argument("--pods", type=int, default=2, help="pods of the pool (default 2)")
    ap.add_argument("--restart-adapters", type=int, default=8, help="N for the restart convergence (default 8)")
    args = ap.parse_args()

    from vlmpool.localcluster.dev import DevCluster
    from vlmpool.testing.adapters import make_adapter
    from vlmpool.testing.waiting import wait_for

    work = Path(tempfile.mkdtemp(prefix="vlmpool-bench-"))
    total = max(args.adapters, args.restart_adapters)
    print(f"making {total} tiny PEFT adapters ...", flush=True)
    sources = [make_adapter("qwen2_5_vl", work / f"a{i}", seed=100 + i) for i in range(total)]
    with DevCluster(work / "cluster", gpus=max(8, args.pods), resync_seconds=60) as dev:
        dev.kubectl("create", "namespace", NS)
        pool = {"apiVersion": "vlmpool.io/v1alpha1", "kind": "VLMPool", "metadata": {"name": POOL, "namespace": NS},
                "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"},
                         "replicas": args.pods, "engine": {"gpus": 1, "maxLoras": 8, "maxCpuLoras": 64}}}
        dev.kubectl("apply", "-f", "-", input=json.dumps(pool))

        def pods():
            out = json.loads(dev.kubectl("get", "pods", "-n", NS, "-l", f"vlmpool.io/pool={POOL}",
                                         "-o", "json").stdout)["items"]
            return [p for p in out if any(c["type"] == "Ready" and c["status"] == "True"
                                          for c in p.get("status", {}).get("conditions", []))
                    and not p["metadata"].get("deletionTimestamp")]
        wait_for(lambda: len(pods()) == args.pods, 180, what="pool pods ready")

        def adapter(i: int) -> dict:
            return {"apiVersion": "vlmpool.io/v1alpha1", "kind": "VLMAdapter",
                    "metadata": {"name": f"adapter-{i}", "namespace": NS},
                    "spec": {"poolRef": {"name": POOL}, "source": {"uri": f"file://{sources[i]}"}}}

        cold = []
        for i in range(args.adapters):
            t0 = time.monotonic()
            dev.kubectl("apply", "-f", "-", input=json.dumps(adapter(i)))
            dev.wait_adapter_ready(f"adapter-{i}", NS, timeout=180)
            cold.append(time.monotonic() - t0)
            print(f"  adapter-{i}: apply -> Ready {args.pods}/{args.pods} in {cold[-1]:.2f}s", flush=True)

        for i in range(args.adapters, args.restart_adapters):
            dev.kubectl("apply", "-f", "-", input=json.dumps(adapter(i)))
        versions = {}
        for i in range(args.restart_adapters):
            versions[f"adapter-{i}"] = dev.wait_adapter_ready(f"adapter-{i}", NS, timeout=300)["version"]
        want = {f"{name}@{v}" for name, v in versions.items()}

        dev.stop_operator()
        engines = [f"http://{p['status']['podIP']}:8000" for p in pods()]
        for url in engines:
            http_json(url + "/sim/forget", {})
        t0 = time.monotonic()
        dev.start_operator()
        operator_up = time.monotonic() - t0

        def converged() -> bool:
            return all(want <= {m["id"] for m in http_json(url + "/v1/models")["data"]} for url in engines)
        wait_for(converged, 300, interval=0.1, what="all adapters reloaded on all engines")
        restart = time.monotonic() - t0

    median = statistics.median(cold)
    loads = args.restart_adapters * args.pods
    print()
    print(f"{'measure':44} {'value':>10}")
    print(f"{'apply -> Ready on all pods, median (s)':44} {median:10.2f}")
    print(f"{'apply -> Ready on all pods, min / max (s)':44} {min(cold):5.2f} / {max(cold):.2f}")
    print(f"{'seed in-process cold path (quoted, s)':44} {SEED_COLD_PATH_S:10.2f}")
    print(f"{'ratio ours / seed':44} {median / SEED_COLD_PATH_S:10.2f}")
    print(f"{'operator restart -> healthy (s)':44} {operator_up:10.2f}")
    print(f"{f'restart -> {args.restart_adapters} adapters x {args.pods} pods loaded (s)':44} {restart:10.2f}")
    print(json.dumps({"bench": "coldpath", "pods": args.pods, "apply_to_ready_s": cold,
                      "apply_to_ready_median_s": round(median, 3), "seed_cold_path_s": SEED_COLD_PATH_S,
                      "ratio_vs_seed": round(median / SEED_COLD_PATH_S, 3),
                      "restart_adapters": args.restart_adapters, "restart_loads": loads,
                      "operator_restart_to_healthy_s": round(operator_up, 3),
                      "restart_converge_s": round(restart, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
