#!/usr/bin/env python3
"""What the proxy costs: the same load against the simulator directly and through `vlmpool proxy`.

Starts `vlmpool sim` (fixed latency model) and `vlmpool proxy` in front of it, each as its own process
(as in a pod: engine container + proxy container), then at each concurrency level runs a closed loop
of N clients sending non-streaming chat completions, once straight to the simulator and once through
the proxy, and prints per level: throughput of both, the ratio proxy/direct, and the latency the
proxy adds at p50 and p99. The last line is a JSON object with every figure.

    .venv/bin/python bench/proxy.py                      # levels 1,16,64,256, 5 s each
    .venv/bin/python bench/proxy.py --levels 64 --duration 10

The load generator, the simulator and the proxy share this machine's cores, so on a small machine the
figures include CPU contention between the three; the report prints the core count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_seconds, free_port, percentile, stop_all, wait_http

REPO = Path(__file__).resolve().parents[1]
VLMPOOL = [sys.executable, "-m", "vlmpool"]


async def closed_loop(url: str, model: str, concurrency: int, duration: float, warmup: float, tokens: int) -> dict:
    """`concurrency` clients, each sending the next request as soon as the previous one is answered.

    The load generator is the proxy's own lean HTTP/1.1 client (vlmpool.proxy.upstream), the same for
    both targets: it costs ~50 us of CPU per request where aiohttp's costs ~200 us, which on a small
    machine leaves more CPU to the two things measured."""
    from urllib.parse import urlsplit

    from vlmpool.proxy.engine import EngineUnavailable
    from vlmpool.proxy.upstream import Upstream

    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": "describe the scene"}],
        "max_tokens": tokens,
        "min_tokens": tokens,  # vLLM's knob: every answer is exactly `tokens` long (fixed service time)
        "temperature": 0,
    }).encode()
    u = urlsplit(url)
    client = Upstream(f"{u.scheme}://{u.netloc}", keepalive_s=30)
    latencies: list[float] = []
    errors = 0
    counter = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration

    async def worker() -> None:
        nonlocal errors, counter
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            counter += 1
            try:
                resp = await client.post(u.path, body, f"bench-{counter}", stream=False, timeout=120)
                await resp.read()
                client.release(resp)
                ok = resp.status == 200
            except EngineUnavailable:
                ok = False
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return {
        "latencies": latencies,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / duration,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "mean_ms": (statistics.fmean(latencies) * 1000) if latencies else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,16,64,256", help="comma-separated concurrency levels")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per level and target")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--tpot-ms", type=float, default=1.0)
    ap.add_argument("--output-tokens", type=int, default=64,
                    help="tokens per answer (sent as max_tokens = min_tokens): service time = ttft + (n-1) * tpot")
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--proxy-concurrency", type=int, default=1024,
                    help="the proxy's limiter size (above the highest level: the bench measures the proxy's "
                         "overhead, not its admission control)")
    ap.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the proxy's per-request JSON access log on (its production default)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="direct/proxy run pairs per level, alternated; figures pool all runs")
    ap.add_argument("--isolate-proxy", action="store_true",
                    help="pin the proxy to the last CPU and the simulator + load generator to the others "
                         "(as in a pod, where the proxy container has CPU of its own); needs >= 2 CPUs")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        uvloop = None

    model = "bench-base"
    sim_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    env = dict(os.environ, VLMPOOL_ADMIN_TOKEN="bench-token", VLMPOOL_LOG_LEVEL="warning")
    procs: list[subprocess.Popen] = []
    all_cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus, other_cpus = set(all_cpus), set(all_cpus)
    if args.isolate_proxy:
        if len(all_cpus) < 2:
            ap.error("--isolate-proxy needs at least 2 CPUs")
        proxy_cpus, other_cpus = {all_cpus[-1]}, set(all_cpus[:-1])
        os.sched_setaffinity(0, other_cpus)
    logs_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    try:
        sim_log = open(logs_dir / f"bench-proxy-sim-{sim_port}.log", "w")
        procs.append(subprocess.Popen(
            VLMPOOL + ["sim", "--model", model, "--host", "127.0.0.1", "--port", str(sim_port),
                       "--ttft-ms", str(args.ttft_ms), "--tpot-ms", str(args.tpot_ms),
                       "--max-num-seqs", str(args.max_num_seqs)],
            env=env, stdout=sim_log, stderr=subprocess.STDOUT, cwd=REPO,
            preexec_fn=lambda: os.sched_setaffinity(0, other_cpus)))
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        proxy_log = open(logs_dir / f"bench-proxy-proxy-{proxy_port}.log", "w")
        cmd = VLMPOOL + ["proxy", "--engine-url", f"http://127.0.0.1:{sim_port}", "--host", "127.0.0.1",
                         "--port", str(proxy_port), "--admin-port", str(admin_port), "--base-model", model,
                         "--concurrency", str(args.proxy_concurrency), "--queue-limit", "4096",
                         "--log-level", "info" if args.access_log else "warning"]
        if not args.access_log:
            cmd.append("--no-access-log")
        procs.append(subprocess.Popen(cmd, env=env, stdout=proxy_log, stderr=subprocess.STDOUT, cwd=REPO,
                                      preexec_fn=lambda: os.sched_setaffinity(0, proxy_cpus)))
        wait_http(f"http://127.0.0.1:{proxy_port}/healthz")

        direct_url = f"http://127.0.0.1:{sim_port}/v1/chat/completions"
        proxy_url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        cores = os.cpu_count()
        print(f"# proxy bench: sim ttft={args.ttft_ms:g}ms tpot={args.tpot_ms:g}ms output_tokens={args.output_tokens} "
              f"duration={args.duration:g}s/run x{args.repeat}, load average {os.getloadavg()[0]:.2f}, "
              f"{cores} CPU cores shared by load generator + sim + proxy, "
              f"python {platform.python_version()}, uvloop={'yes' if uvloop else 'no'}, "
              f"proxy access log {'on' if args.access_log else 'off'}, "
              + (f"proxy pinned to CPU {sorted(proxy_cpus)}, sim + load generator to {sorted(other_cpus)}"
                 if args.isolate_proxy else "no CPU pinning"))
        print(f"{'conc':>5} {'direct rps':>11} {'proxy rps':>10} {'ratio':>6} {'p50 direct':>11} {'p50 proxy':>10} "
              f"{'+p50 ms':>8} {'p99 direct':>11} {'p99 proxy':>10} {'+p99 ms':>8} {'errors':>6} "
              f"{'proxy cpu us/req':>16} {'sim cpu us/req':>14} {'in-proxy p50/p99 ms':>20}")

        def run(coro):
            if uvloop is not None:
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                    return r.run(coro)
            return asyncio.run(coro)

        sim_pid, proxy_pid = procs[0].pid, procs[1].pid

        proxy_log_path = Path(proxy_log.name)

        def handler_overheads(offset: int) -> list[float]:
            """From the proxy's access log: duration - engine time - queue wait, per answered request."""
            out = []
            with open(proxy_log_path, "rb") as f:
                f.seek(offset)
                for line in f:
                    if b'"engine_ms"' not in line:
                        continue
                    try:
                        x = json.loads(line)
                    except ValueError:
                        continue
                    if x.get("status") == 200:
                        out.append((x["duration_ms"] - x["engine_ms"] - x["queue_ms"]) / 1000)
            return out

        def measured(url: str, c: int) -> dict:
            s0, p0 = cpu_seconds(sim_pid), cpu_seconds(proxy_pid)
            proxy_log.flush()
            offset = proxy_log_path.stat().st_size
            out = run(closed_loop(url, model, c, args.duration, args.warmup, args.output_tokens))
            s1, p1 = cpu_seconds(sim_pid), cpu_seconds(proxy_pid)
            out["handler_overheads"] = handler_overheads(offset) if url == proxy_url else []
            # CPU of the whole run (warm-up included) over the requests of the whole run (from the rate)
            out["all_requests"] = out["rps"] * (args.duration + args.warmup)
            out["sim_cpu_s"], out["proxy_cpu_s"] = s1 - s0, p1 - p0
            return out

        def merge(runs: list[dict]) -> dict:
            lat = [x for r in runs for x in r["latencies"]]
            total = sum(r["all_requests"] for r in runs)
            return {
                "requests": len(lat),
                "errors": sum(r["errors"] for r in runs),
                "rps": len(lat) / (args.duration * len(runs)),
                "p50_ms": percentile(lat, 0.50) * 1000,
                "p99_ms": percentile(lat, 0.99) * 1000,
                "sim_cpu_us_per_req": sum(r["sim_cpu_s"] for r in runs) / total * 1e6 if total else float("nan"),
                "proxy_cpu_us_per_req": sum(r["proxy_cpu_s"] for r in runs) / total * 1e6 if total else float("nan"),
                "handler_p50_ms": percentile([x for r in runs for x in r["handler_overheads"]], 0.5) * 1000,
                "handler_p99_ms": percentile([x for r in runs for x in r["handler_overheads"]], 0.99) * 1000,
            }

        results = []
        load_before = os.getloadavg()
        for c in levels:
            d_runs, p_runs = [], []
            for _ in range(args.repeat):  # alternate, so drifting background load hits both alike
                d_runs.append(measured(direct_url, c))
                p_runs.append(measured(proxy_url, c))
            d, p = merge(d_runs), merge(p_runs)
            row = {
                "concurrency": c,
                "direct": d,
                "proxy": p,
                "throughput_ratio": (p["rps"] / d["rps"]) if d["rps"] else float("nan"),
                "added_p50_ms": p["p50_ms"] - d["p50_ms"],
                "added_p99_ms": p["p99_ms"] - d["p99_ms"],
            }
            results.append(row)
            print(f"{c:>5} {d['rps']:>11.1f} {p['rps']:>10.1f} {row['throughput_ratio']:>6.3f} {d['p50_ms']:>11.2f} "
                  f"{p['p50_ms']:>10.2f} {row['added_p50_ms']:>8.2f} {d['p99_ms']:>11.2f} {p['p99_ms']:>10.2f} "
                  f"{row['added_p99_ms']:>8.2f} {d['errors'] + p['errors']:>6} {p['proxy_cpu_us_per_req']:>16.0f} "
                  f"{p['sim_cpu_us_per_req']:>14.0f} {p['handler_p50_ms']:>9.3f}/{p['handler_p99_ms']:<9.3f}",
                  flush=True)
        target = next((r for r in results if r["concurrency"] == 64), None)
        summary = {
            "bench": "proxy",
            "cpu_cores": cores,
            "sim": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms, "output_tokens": args.output_tokens},
            "duration_s": args.duration,
            "repeat": args.repeat,
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "access_log": args.access_log,
            "isolate_proxy": args.isolate_proxy,
            "levels": [{
                "concurrency": r["concurrency"],
                "direct_rps": round(r["direct"]["rps"], 2),
                "proxy_rps": round(r["proxy"]["rps"], 2),
                "throughput_ratio": round(r["throughput_ratio"], 4),
                "direct_p50_ms": round(r["direct"]["p50_ms"], 3),
                "proxy_p50_ms": round(r["proxy"]["p50_ms"], 3),
                "added_p50_ms": round(r["added_p50_ms"], 3),
                "direct_p99_ms": round(r["direct"]["p99_ms"], 3),
                "proxy_p99_ms": round(r["proxy"]["p99_ms"], 3),
                "added_p99_ms": round(r["added_p99_ms"], 3),
                "errors": r["direct"]["errors"] + r["proxy"]["errors"],
                "proxy_cpu_us_per_request": round(r["proxy"]["proxy_cpu_us_per_req"], 1),
                "sim_cpu_us_per_request": round(r["proxy"]["sim_cpu_us_per_req"], 1),
                "in_proxy_handler_p50_ms": round(r["proxy"]["handler_p50_ms"], 3),
                "in_proxy_handler_p99_ms": round(r["proxy"]["handler_p99_ms"], 3),
            } for r in results],
            "target_c64": None if target is None else {
                "throughput_ratio_ge_0_9": target["throughput_ratio"] >= 0.9,
                "added_p50_lt_1ms": target["added_p50_ms"] < 1.0,
            },
        }
        print(json.dumps(summary))
        return 0
    finally:
        stop_all(procs)


if __name__ == "__main__":
    sys.exit(main())
