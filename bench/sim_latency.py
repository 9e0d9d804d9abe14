#!/usr/bin/env python3
"""How closely `vlmpool sim` follows its own latency model under load.

Starts `vlmpool sim` as its own process with a fixed latency model (TTFT, TPOT, --max-num-seqs) and
at each concurrency level runs a closed loop of N streaming clients that all ask for exactly
``--tokens`` output tokens (``ignore_eos``). For each level it prints the throughput the model
predicts (min(N, max_num_seqs) / (ttft + (tokens-1)*tpot)), the measured throughput, their ratio
(1.00 = the simulator is exactly as fast as configured; below 1 = overhead or CPU contention), the
measured TTFT p50/p99 (queueing included) and the simulator's CPU time per request. The last line
is a JSON object with every figure.

    .venv/bin/python bench/sim_latency.py                       # levels 1,16,64,256, 5 s each
    .venv/bin/python bench/sim_latency.py --levels 512 --max-num-seqs 256 --duration 10

The load generator and the simulator share this machine's cores; the report prints the core count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_seconds, free_port, percentile, wait_http

REPO = Path(__file__).resolve().parents[1]


async def level(url: str, clients: int, duration: float, tokens: int) -> dict:
    import aiohttp

    body = {"model": "bench-base", "messages": [{"role": "user", "content": "hello"}], "stream": True,
            "max_tokens": tokens, "ignore_eos": True}
    ttfts: list[float] = []
    done = 0
    errors = 0
    stop_at = time.monotonic() + duration

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            first = None
            try:
                async with session.post(url, json=body) as r:
                    async for line in r.content:
                        if first is None and line.startswith(b"data: {") and b'"content": "' in line \
                                and b'"content": ""' not in line:
                            first = time.monotonic() - t0
                    if r.status != 200:
                        errors += 1
                        continue
            except aiohttp.ClientError:
                errors += 1
                continue
            done += 1
            if first is not None:
                ttfts.append(first)

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        t0 = time.monotonic()
        await asyncio.gather(*(client(s) for _ in range(clients)))
        elapsed = time.monotonic() - t0
    return {"clients": clients, "requests": done, "errors": errors, "rps": done / elapsed,
            "ttft_p50_ms": percentile(ttfts, 0.5) * 1000, "ttft_p99_ms": percentile(ttfts, 0.99) * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,16,64,256")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--ttft-ms", type=float, default=50.0)
    ap.add_argument("--tpot-ms", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    args = ap.parse_args()

    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-sim-{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmpool", "sim", "--model", "bench-base", "--port", str(port),
         "--ttft-ms", str(args.ttft_ms), "--tpot-ms", str(args.tpot_ms), "--max-num-seqs", str(args.max_num_seqs)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    results = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        per_req = (args.ttft_ms + (args.tokens - 1) * args.tpot_ms) / 1000.0
        print(f"# sim latency bench: ttft={args.ttft_ms:g}ms tpot={args.tpot_ms:g}ms tokens={args.tokens} "
              f"max_num_seqs={args.max_num_seqs} duration={args.duration:g}s/level, "
              f"{os.cpu_count()} CPU cores shared by load generator + sim ({platform.python_version()})")
        print(f"{'clients':>8} {'model rps':>10} {'measured':>10} {'ratio':>6} {'ttft p50':>9} {'ttft p99':>9} "
              f"{'sim cpu us/req':>15} {'errors':>7}")
        for clients in [int(x) for x in args.levels.split(",") if x]:
            c0 = cpu_seconds(proc.pid)
            r = asyncio.run(level(url, clients, args.duration, args.tokens))
            c1 = cpu_seconds(proc.pid)
            r["model_rps"] = min(clients, args.max_num_seqs) / per_req
            r["ratio"] = r["rps"] / r["model_rps"]
            r["sim_cpu_us_per_req"] = (c1 - c0) / r["requests"] * 1e6 if r["requests"] else float("nan")
            results.append(r)
            print(f"{clients:>8} {r['model_rps']:>10.1f} {r['rps']:>10.1f} {r['ratio']:>6.2f} "
                  f"{r['ttft_p50_ms']:>8.1f}m {r['ttft_p99_ms']:>8.1f}m {r['sim_cpu_us_per_req']:>15.0f} "
                  f"{r['errors']:>7}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps({"bench": "sim_latency", "cores": os.cpu_count(), "config": vars(args),
                      "levels": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
