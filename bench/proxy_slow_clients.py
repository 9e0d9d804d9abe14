"""How long slow clients hold `vlmpool proxy` (run with its default limits, as a process): 300 slowloris
connections that trickle one header line a second and never finish their head, and one POST that
announces 1,000 bytes and sends 10. Prints when the proxy closed them (or that they were still open at
--cap seconds).

    .venv/bin/python bench/proxy_slow_clients.py [--connections 300] [--cap 130]

2026-11-23, 2-core machine: main held all 300 and the slow body past 130 s (aiohttp's server default
keep-alive deadline is 3,630 s); with --header-timeout 20 / --body-timeout 60 (the defaults) the 300
are closed at 20 s and the slow body is answered 408 and closed at 62 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import free_port, wait_http


async def closed_after(reader: asyncio.StreamReader, t0: float, cap: float) -> float | None:
    try:
        async with asyncio.timeout(cap - (time.monotonic() - t0)):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - t0


async def measure(port: int, n: int, cap: float) -> None:
    t0 = time.monotonic()
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        conns.append((r, w))
    br, bw = await asyncio.open_connection("127.0.0.1", port)
    bw.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")

    async def trickle() -> None:
        i = 0
        while True:
            for _, w in conns:
                if not w.is_closing():
                    w.write(f"X-Slow-{i}: 1\r\n".encode())
            i += 1
            await asyncio.sleep(1)

    task = asyncio.create_task(trickle())
    *loris, body = await asyncio.gather(*(closed_after(r, t0, cap) for r, _ in conns), closed_after(br, t0, cap))
    task.cancel()
    done = [x for x in loris if x is not None]
    last = f"the last at {max(done):.1f} s" if done else "none"
    print(f"slowloris: {len(done)}/{n} closed ({last}); {n - len(done)} still open at {cap:g} s")
    print("slow body: " + (f"closed at {body:.1f} s" if body is not None else f"still open at {cap:g} s"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=300)
    ap.add_argument("--cap", type=float, default=130.0)
    args = ap.parse_args()
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMPOOL_")}
    env["VLMPOOL_ADMIN_TOKEN"] = "bench"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmpool", "proxy", "--host", "127.0.0.1", "--port", str(port),
         "--admin-port", str(admin_port), "--engine-url", "http://127.0.0.1:9", "--base-model", "base",
         "--no-access-log"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        asyncio.run(measure(port, args.connections, args.cap))
    finally:
        proc.terminate()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
