"""Normal traffic through `vlmpool proxy` with and without the two slow-client attacks of issue #23, in
one run against the same proxy (a process, its default limits) in front of `vlmpool sim`:

- stalled streams: connections with a 4 KiB receive buffer that ask for a long streamed answer and
  never read it (each re-opened as soon as the proxy cuts it: a persistent attacker);
- trickled bodies: POSTs that announce a 64 MiB body (every other one chunked, no length) and send
  1 byte a second (each re-opened as soon as the proxy answers it).

Phase 1 sends --requests normal chat completions at --clients concurrency (closed loop) alone; phase 2
starts the attackers, waits until they are in place, and sends the same normal traffic again. Prints
per phase the success rate (HTTP 200 within --request-timeout), p50/p95 latency of the served ones,
the ratios, what the attackers met, and the machine's size. Loopback only; bounded: each phase stops
issuing requests after --phase-cap seconds (those not sent count as not served).

    .venv/bin/python bench/proxy_slow_clients.py [--stalled-streams 8] [--tricklers 8] [--requests 6000]
        [--clients 4] [--proxy-concurrency 16] [--proxy-arg=--send-timeout=10 ...]

Goal (issue #23): under attack >= 99 % of the normal requests served and p50 within 2x of alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import free_port, percentile, stop_all, wait_http

VLMPOOL = [sys.executable, "-m", "vlmpool"]
MODEL = "bench-base"


async def normal_traffic(url: str, requests: int, clients: int, tokens: int, timeout: float, cap: float) -> dict:
    """`requests` non-streaming chat completions by `clients` closed-loop clients; stops issuing at `cap` s."""
    import aiohttp

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "describe the scene"}],
                       "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}).encode()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    t_end = time.monotonic() + cap

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal issued
        while issued < requests and time.monotonic() < t_end:
            issued += 1
            t0 = time.monotonic()
            try:
                async with s.post(url + "/v1/chat/completions", data=body,
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    key = str(r.status)
            except (aiohttp.ClientError, TimeoutError) as e:
                key = type(e).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if key == "200":
                latencies.append(time.monotonic() - t0)

    t0 = time.monotonic()
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        await asyncio.gather(*(client(s) for _ in range(clients)))
    return {"requests": requests, "issued": issued, "served": len(latencies), "statuses": statuses,
            "seconds": time.monotonic() - t0, "success": len(latencies) / requests,
            "p50_ms": percentile(latencies, 0.50) * 1000, "p95_ms": percentile(latencies, 0.95) * 1000}


class Attack:
    """The attackers, each re-opened when the proxy ends it, until stop()."""

    def __init__(self, port: int, stalled: int, tricklers: int) -> None:
        self.port = port
        self.stalled, self.tricklers = stalled, tricklers
        self.stopping = False
        self.opened = {"stalled": 0, "trickle": 0}
        self.ended = {"stalled": 0, "trickle": 0}
        self.answers: dict[str, int] = {}  # first line of what the proxy answered a trickler
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._stalled_loop()) for _ in range(self.stalled)]
        self.tasks += [asyncio.create_task(self._trickle_loop(i % 2 == 1)) for i in range(self.tricklers)]

    async def stop(self) -> None:
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _stalled_loop(self) -> None:
        loop = asyncio.get_running_loop()
        body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 900_000, "min_tokens": 900_000,
                           "messages": [{"role": "user", "content": "tell a long story"}]}).encode()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        while not self.stopping:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", self.port))
                await loop.sock_sendall(sock, head + body)
                self.opened["stalled"] += 1
                # never read: wait until the proxy closes or resets it (polled once a second)
                while not self.stopping:
                    await asyncio.sleep(1.0)
                    if _closed_by_peer(sock):
                        self.ended["stalled"] += 1
                        break
            except OSError:
                await asyncio.sleep(0.1)
            finally:
                sock.close()

    async def _trickle_loop(self, chunked: bool) -> None:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: " + str(64 << 20).encode()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + framing + b"\r\n\r\n")
        piece = b"1\r\n \r\n" if chunked else b" "
        while not self.stopping:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.opened["trickle"] += 1
            writer.write(head + (b"1\r\n{\r\n" if chunked else b"{"))
            try:
                while not self.stopping:
                    try:
                        async with asyncio.timeout(1.0):
                            first = await reader.readline()
                    except TimeoutError:
                        writer.write(piece)  # 1 body byte a second
                        continue
                    key = first.decode("latin-1").strip()[:40] or "closed"
                    self.answers[key] = self.answers.get(key, 0) + 1
                    self.ended["trickle"] += 1
                    break
            except (ConnectionError, OSError):
                self.answers["reset"] = self.answers.get("reset", 0) + 1
                self.ended["trickle"] += 1
            finally:
                writer.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer closed or reset the connection, unread data waiting or not (POLLRDHUP)."""
    p = select.poll()
    p.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(p.poll(0))


def _mem_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return float("nan")


async def run(args: argparse.Namespace, proxy_port: int) -> dict:
    url = f"http://127.0.0.1:{proxy_port}"
    # warm-up (connections, first-request costs), not measured
    await normal_traffic(url, 50, args.clients, args.output_tokens, args.request_timeout, 30)
    alone = await normal_traffic(url, args.requests, args.clients, args.output_tokens, args.request_timeout,
                                 args.phase_cap)
    attack = Attack(proxy_port, args.stalled_streams, args.tricklers)
    attack.start()
    t0 = time.monotonic()  # until every attacker has its connection open
    while sum(attack.opened.values()) < args.stalled_streams + args.tricklers and time.monotonic() - t0 < 30:
        await asyncio.sleep(0.05)
    await asyncio.sleep(args.settle)  # the stalled streams fill their buffers and hold their slots
    try:
        under = await normal_traffic(url, args.requests, args.clients, args.output_tokens, args.request_timeout,
                                     args.phase_cap)
    finally:
        await attack.stop()
    return {"alone": alone, "under_attack": under, "attack": {"opened": attack.opened, "ended": attack.ended,
                                                              "trickle_answers": attack.answers}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=6000, help="normal requests per phase (the default lasts "
                    "longer than the proxy's --send-timeout: the stalled streams are cut and re-opened in it)")
    ap.add_argument("--clients", type=int, default=4, help="normal clients (closed loop)")
    ap.add_argument("--stalled-streams", type=int, default=8)
    ap.add_argument("--tricklers", type=int, default=8)
    ap.add_argument("--proxy-concurrency", type=int, default=16, help="the proxy's --concurrency (its default)")
    ap.add_argument("--proxy-arg", action="append", default=[], help="one more proxy flag (repeatable)")
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--tpot-ms", type=float, default=1.0)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=60.0, help="a normal request not answered 200 "
                    "within this counts as not served")
    ap.add_argument("--phase-cap", type=float, default=300.0, help="seconds a phase may issue requests")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between the attack's start and phase 2")
    args = ap.parse_args()

    sim_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMPOOL_")}
    env.update(VLMPOOL_ADMIN_TOKEN="bench-token", VLMPOOL_LOG_LEVEL="warning")
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            VLMPOOL + ["sim", "--model", MODEL, "--host", "127.0.0.1", "--port", str(sim_port),
                       "--ttft-ms", str(args.ttft_ms), "--tpot-ms", str(args.tpot_ms), "--max-num-seqs", "1024",
                       "--max-model-len", "1000000"],
            env=env, stdout=open(logs / f"bench-slow-sim-{sim_port}.log", "w"), stderr=subprocess.STDOUT))
        wait_http(f"http://127.0.0.1:{sim_port}/health")
        cmd = VLMPOOL + ["proxy", "--engine-url", f"http://127.0.0.1:{sim_port}", "--host", "127.0.0.1",
                         "--port", str(proxy_port), "--admin-port", str(admin_port), "--base-model", MODEL,
                         "--concurrency", str(args.proxy_concurrency), "--no-access-log", *args.proxy_arg]
        proxy_log = logs / f"bench-slow-proxy-{proxy_port}.log"
        procs.append(subprocess.Popen(cmd, env=env, stdout=open(proxy_log, "w"), stderr=subprocess.STDOUT))
        wait_http(f"http://127.0.0.1:{proxy_port}/healthz")
        out = asyncio.run(run(args, proxy_port))
    finally:
        stop_all(procs)

    a, u = out["alone"], out["under_attack"]
    p50_ratio = u["p50_ms"] / a["p50_ms"] if a["p50_ms"] else float("nan")
    p95_ratio = u["p95_ms"] / a["p95_ms"] if a["p95_ms"] else float("nan")
    print(f"# machine: {os.cpu_count()} CPUs, {_mem_gib():.1f} GiB memory, load average {os.getloadavg()[0]:.2f}, "
          f"python {platform.python_version()}; sim + proxy + clients + attackers share it")
    print(f"# proxy --concurrency {args.proxy_concurrency} {' '.join(args.proxy_arg)} (other limits: defaults); "
          f"sim ttft {args.ttft_ms:g} ms, tpot {args.tpot_ms:g} ms, {args.output_tokens} tokens an answer")
    print(f"# attack: {args.stalled_streams} stalled streams + {args.tricklers} trickled bodies, each re-opened "
          f"when cut; normal: {args.requests} requests at {args.clients} clients per phase")
    for name, r in (("alone", a), ("under attack", u)):
        print(f"{name:>13}: served {r['served']}/{r['requests']} ({r['success'] * 100:.2f} %), "
              f"p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, {r['seconds']:.1f} s, statuses {r['statuses']}")
    print(f"       ratios: p50 {p50_ratio:.2f}x, p95 {p95_ratio:.2f}x; "
          f"goal (>= 99 % served, p50 <= 2x): {'met' if u['success'] >= 0.99 and p50_ratio <= 2 else 'NOT met'}")
    print(f"     attackers: opened {out['attack']['opened']}, ended by the proxy {out['attack']['ended']}, "
          f"trickled bodies answered {out['attack']['trickle_answers']}")
    out.update(bench="proxy_slow_clients", cpus=os.cpu_count(), mem_gib=round(_mem_gib(), 1),
               p50_ratio=round(p50_ratio, 3), p95_ratio=round(p95_ratio, 3), args=vars(args))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
