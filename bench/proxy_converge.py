"""How fast one proxy converges a pushed state of N adapters (the asynchronous push of issue 12): the
real proxy in front of the real simulator with a per-load latency, in one process on loopback. Prints
the time to the 202, to convergence (against the ideal N x load / parallelism), and a re-push of the
converged state (no load expected).

    .venv/bin/python bench/proxy_converge.py [--adapters 500] [--load-ms 200] [--parallelism 4]

2026-11-23, 2-core machine shared with other work: 500 adapters at 200 ms, parallelism 4: 202 in 14 ms,
converged in 25.9 s (ideal 25.0 s), re-push 200 in 16 ms with 0 loads; parallelism 16: 6.7 s (ideal
6.2 s); 100 ms, parallelism 1: 51.7 s (ideal 50.0 s). The simulator overlaps concurrent loads; vLLM
runs one add_lora at a time in its engine core, so there the parallelism mostly overlaps the
proxy's and the HTTP round trips, and N x load is the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "proxy"))

from proxy_helpers import Admin, proxy_config, start_sim, write_adapter

from vlmpool.proxy.server import run_proxy


async def main(n: int, load_ms: float, par: int) -> None:
    path = str(write_adapter(Path(tempfile.mkdtemp()) / "a" / "versions" / "00000001", seed=1))
    sim, runner = await start_sim(lora_load_ms=load_ms, max_cpu_loras=n + 8, max_loras=8)
    try:
        async with run_proxy(proxy_config(sim.url, access_log=False)) as p:
            admin = Admin(p.admin_url)
            state = {"generation": 1, "concurrency": 16, "load_parallelism": par,
                     "adapters": [{"name": f"a{i:04d}", "version": "00000001", "path": path} for i in range(n)]}
            t0 = time.monotonic()
            status, _ = await admin.put(state, wait=None)
            ack = time.monotonic() - t0
            done: dict = {"converged": False}
            while not done["converged"]:
                _, done = await admin.get(wait=60, generation=1)
            converged = time.monotonic() - t0
            loads = len(sim.received("/v1/load_lora_adapter"))
            t1 = time.monotonic()
            status2, _ = await admin.put(state, wait=60)
            again = time.monotonic() - t1
            print(f"adapters={n} load_ms={load_ms:g} parallelism={par}: {status} in {ack * 1000:.0f} ms, converged "
                  f"in {converged:.1f} s (ideal {n * load_ms / 1000 / par:.1f} s, "
                  f"ratio {converged / (n * load_ms / 1000 / par):.2f}), {done['counts']['loaded']} loaded with "
                  f"{loads} load calls; re-push {status2} in {again * 1000:.0f} ms with "
                  f"{len(sim.received('/v1/load_lora_adapter')) - loads} more")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=500)
    ap.add_argument("--load-ms", type=float, default=200.0)
    ap.add_argument("--parallelism", type=int, default=4)
    a = ap.parse_args()
    asyncio.run(main(a.adapters, a.load_ms, a.parallelism))
