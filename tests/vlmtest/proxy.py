"""Helpers for the proxy tests: the real simulator (`vlmpool.sim`) on a loopback port, with a request
log of what it received (headers and bodies), the real proxy in front of it, real LoRA adapter
directories written with torch + safetensors, and the `openai` SDK as the client."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from vlmpool.proxy.server import ProxyConfig
from vlmpool.sim.server import ENGINE_KEY, SimConfig, create_app
from vlmpool.testing.adapters import write_lora

BASE = "base-vlm"
TOKEN = "test-admin-token-0123456789"
V1, V2 = "00000001", "00000002"  # adapter versions of the form the patcher publishes ([0-9a-f]{8,64})


# A small loadable LoRA for this suite's base model (shared maker: vlmpool.testing.adapters).
write_adapter = functools.partial(write_lora, base=BASE)


@dataclass
class Sim:
    url: str
    app: web.Application
    log: list[dict[str, Any]] = field(default_factory=list)  # every request the engine received
    forget_before_generation: bool = False  # the engine forgets its runtime adapters before each generation
    loads_running: dict[str, int] = field(default_factory=dict)  # lora name -> load calls running now
    load_peak: int = 0  # most load calls running at once
    same_name_peak: int = 0  # most load calls of one lora name running at once

    def load_counts(self) -> dict[str, int]:
        """lora name -> load calls the engine received."""
        out: dict[str, int] = {}
        for r in self.received("/v1/load_lora_adapter"):
            out[r["json"]["lora_name"]] = out.get(r["json"]["lora_name"], 0) + 1
        return out

    def received(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.log if r["path"] == path]

    async def call(self, method: str, path: str, payload: Any = None) -> Any:
        async with aiohttp.ClientSession() as s:
            async with s.request(method, self.url + path, json=payload) as r:
                assert r.status == 200, await r.text()
                return await r.json(content_type=None)

    async def stats(self) -> dict[str, Any]:
        return await self.call("GET", "/sim/stats")

    async def faults(self, **kw: Any) -> dict[str, Any]:
        return await self.call("POST", "/sim/faults", kw)


@dataclass
class Admin:
    url: str
    token: str = TOKEN

    async def put(self, state: dict[str, Any], token: str | None = None,
                  request_id: str | None = None, wait: float | None = 30) -> tuple[int, Any]:
        """PUT the state; with `wait` (the default) the proxy answers once it converged (200) or after
        that many seconds (202); wait=None: the asynchronous answer at once."""
        headers = {"Authorization": f"Bearer {token or self.token}"}
        if request_id:
            headers["X-Request-Id"] = request_id
        params = {"wait": str(wait)} if wait else {}
        async with aiohttp.ClientSession() as s:
            async with s.put(self.url + "/admin/v1/state", json=state, headers=headers, params=params) as r:
                return r.status, await r.json(content_type=None)

    async def get(self, token: str | None = None, **params: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s:
            async with s.get(self.url + "/admin/v1/state", params={k: str(v) for k, v in params.items()},
                             headers={"Authorization": f"Bearer {token or self.token}"}) as r:
                return r.status, await r.json(content_type=None)


async def start_sim(port: int = 0, **overrides: Any):
    cfg = dict(model=BASE, enable_lora=True, runtime_lora=True, max_loras=8, max_cpu_loras=32,
               max_num_seqs=256, ttft_ms=2.0, tpot_ms=0.5)
    cfg.update(overrides)
    app = create_app(SimConfig(**cfg))
    sim = Sim(url="", app=app)

    @web.middleware
    async def record(request: web.Request, handler):
        body = await request.read()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = body
        sim.log.append({"method": request.method, "path": request.path,
                        "headers": {k.lower(): v for k, v in request.headers.items()}, "json": parsed})
        if sim.forget_before_generation and request.path in ("/v1/chat/completions", "/v1/completions"):
            app[ENGINE_KEY].forget()  # as if it restarted again between a re-load and the retry
        if request.path != "/v1/load_lora_adapter" or not isinstance(parsed, dict):
            return await handler(request)
        name = str(parsed.get("lora_name"))
        sim.loads_running[name] = sim.loads_running.get(name, 0) + 1
        sim.load_peak = max(sim.load_peak, sum(sim.loads_running.values()))
        sim.same_name_peak = max(sim.same_name_peak, sim.loads_running[name])
        try:
            return await handler(request)
        finally:
            sim.loads_running[name] -= 1

    app.middlewares.insert(0, record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    sim.url = f"http://127.0.0.1:{port}"
    return sim, runner


def proxy_config(engine_url: str, **overrides: Any) -> ProxyConfig:
    cfg = dict(engine_url=engine_url, host="127.0.0.1", port=0, admin_port=0, admin_token=TOKEN, base_model=BASE,
               concurrency=16, queue_limit=1024, queue_timeout=30.0, request_timeout=30.0, shutdown_timeout=5.0)
    cfg.update(overrides)
    return ProxyConfig(**cfg)


def proxy_config_with(engine_url: str, **settings: Any) -> ProxyConfig:
    """proxy_config() with settings assigned after construction, so a test of a new setting runs (and
    fails on behaviour, not on a TypeError) against a proxy that does not know the setting yet."""
    cfg = proxy_config(engine_url)
    for key, value in settings.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
async def sim():
    """The simulator on a loopback port with its request log (a fixture: import it into a test module)."""
    s, runner = await start_sim()
    try:
        yield s
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------ `vlmpool proxy` as a process


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kib(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM)."""
    from pathlib import Path

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


async def proxy_process(engine_url: str, *extra: str, token: str = TOKEN):
    """`vlmpool proxy` with its default limits (only the addresses and `extra` given; no VLMPOOL_*
    environment but the admin token), ready on /healthz: (process, public url, admin url)."""
    import os
    import subprocess
    import sys

    from vlmpool.testing.waiting import wait_until

    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMPOOL_")}
    env["VLMPOOL_ADMIN_TOKEN"] = token
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmpool", "proxy", "--host", "127.0.0.1", "--port", str(port),
         "--admin-port", str(admin_port), "--engine-url", engine_url, "--base-model", BASE, "--no-access-log",
         *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            async with aiohttp.ClientSession() as s, s.get(url + "/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(up, timeout=60, interval=0.1, what="the proxy process to serve /healthz")
    return proc, url, f"http://127.0.0.1:{admin_port}"


def stop_process(proc) -> None:
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
