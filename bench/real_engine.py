#!/usr/bin/env python3
"""The proxy against vLLM's real engine (the CPU build, issue #22): what `vlmpool proxy` adds in front of it,
how long a LoRA load takes there, and what a version swap leaves resident in the engine.

    .venv/bin/python bench/real_engine.py      # all three sections: 1.5 min (load 5) to 5 min (load 12), 2 cores
    .venv/bin/python bench/real_engine.py --sections overhead,load --requests 48
    .venv/bin/python bench/real_engine.py --sections swap --max-cpu-loras 4 --swaps 6

Figures, their commands and the machine they ran on: docs/performance.md, "The real engine (vLLM's CPU
build) in pods".

One real engine for the whole run: vLLM's own CLI through images/vllm-cpu/vllm_cli.py, started by
tests/vllm/real_engine.py's start_engine (the flags and environment of tests/vllm/test_sim_vs_vllm.py, plus
--max-cpu-loras and VLLM_SERVER_DEV_MODE=1 for `/collective_rpc list_loras`, the worker's own adapter list),
on the tiny Qwen2.5-VL `vlmpool testing make-model` writes, with PEFT adapters from make_adapter. The vLLM
environment is `bash hack/vllm-env.sh` (or --vllm-python / $VLMPOOL_VLLM_PYTHON). `vlmpool proxy` runs in
front of it as its own process, as bench/proxy.py starts it, and is given adapters by PUT /admin/v1/state.

Sections (--sections, comma-separated, run in this order):
- overhead: the same requests straight to the engine (the adapter by its engine name `<served>@<version>`)
  and through the proxy (by its served name), interleaved chunk by chunk (the order flips every chunk, so
  drifting background load hits both alike): chat and streamed chat, base model and an adapter, at each
  --levels concurrency. Per row: p50/p95 latency, TTFT p50 for streams, throughput, proxy/direct ratios,
  the p50 the proxy adds, the proxy process's CPU per request, and the time each request spent in the
  proxy outside the engine (duration - engine - queue, from its access log, as bench/proxy.py reads it).
- load: POST /v1/load_lora_adapter straight to the engine (--loads adapters under new names, each unloaded
  after), and the proxy's push->loaded path: PUT /admin/v1/state?wait with a new version (answered once the
  proxy converged: its /v1/models planning call, the engine load, the state flip) then GET until the state
  shows it loaded.
- swap: --swaps version swaps of one adapter through the proxy's push path (load the new version's name,
  serve requests on it, unload the old one once drained), then a rollback of the last swap; first alone,
  then with a second adapter live (used before the swapped one in every step). After each: the engine's
  /v1/models, whether requests to the current version and the live one succeed, whether any load failed,
  the engine's RSS (VmRSS summed over its process group), the worker's adapter ids after the push and
  after the requests (dev-mode /collective_rpc list_loras), and the lora series on /metrics.

Everything shares this machine's cores (engine, proxy, load generator, and whatever else runs): the report
prints nproc, memory and the load average (uptime) before and after each section; compare direct and proxy
only within one run. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from benchlib import cpu_seconds, http, percentile, uptime, vllm_python, wait_http  # noqa: E402


def _tests_engine_module():
    """tests/vllm/real_engine.py (the engine as the tests start it), loaded under its own name: this file has
    the same module name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_test_engine", REPO / "tests" / "vllm" / "real_engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_engine = _tests_engine_module()
free_port, start_engine = _engine.free_port, _engine.start_engine

TOKEN = "bench-real-engine-token-0123456789"
BASE = "base"
# tests/vllm/test_sim_vs_vllm.py's ARGS (the engine flags the differential test uses); --max-cpu-loras (the
# worker's CPU LoRA cache) is added from --max-cpu-loras (vLLM's own default is --max-loras)
ENGINE_ARGS = ["--served-model-name", BASE, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
               "--max-model-len", "512", "--max-num-seqs", "4", "--dtype", "bfloat16",
               "--limit-mm-per-prompt", '{"image":1,"video":0}']


# ---- the machine ---------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {"nproc": os.cpu_count(), "mem_gib": round(mem_kb / 2**20, 1)}




def group_rss_kb(pgid: int) -> dict[int, int]:
    """VmRSS (kB) of every process in the process group (the engine: API server, EngineCore, its helpers)."""
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[int(d)] = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


class Rig:
    """The engine, the proxy in front of it, and the adapter directories under one root."""

    def __init__(self, engine_url: str, engine_pid: int, proxy_url: str, admin_url: str, root: Path,
                 proxy_pid: int):
        self.engine_url, self.engine_pid, self.proxy_pid = engine_url, engine_pid, proxy_pid
        self.proxy_url, self.admin_url, self.root = proxy_url, admin_url, root
        self.generation = 0
        self.sources: list[Path] = []
        self.proxy_log = root / "proxy.log"
        self.ovh_id: int | None = None  # the worker's int id of the adapter the overhead section uses

    def version_dir(self, name: str, version: str, seed: int) -> str:
        """`<root>/<name>/versions/<version>`: the operator's layout, a copy of one of the made adapters."""
        d = self.root / "adapters" / name / "versions" / version
        if not d.exists():
            shutil.copytree(self.sources[seed % len(self.sources)], d)
        return str(d)

    def push(self, adapters: list[dict[str, str]], wait: float = 60) -> tuple[int, dict, float]:
        self.generation += 1
        state = {"generation": self.generation, "concurrency": 16, "adapters": adapters}
        t0 = time.perf_counter()
        status, body = http("PUT", f"{self.admin_url}/admin/v1/state?wait={wait:g}", state, TOKEN)
        return status, json.loads(body), time.perf_counter() - t0

    def state(self) -> dict:
        return json.loads(http("GET", f"{self.admin_url}/admin/v1/state", token=TOKEN)[1])

    def wait_unloaded(self, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state().get("unloading"):
                return True
            time.sleep(0.05)
        return False

    def engine_models(self) -> list[str]:
        status, body = http("GET", f"{self.engine_url}/v1/models")
        return [m["id"] for m in json.loads(body).get("data", [])] if status == 200 else []

    def worker_loras(self) -> list[int] | None:
        """The LoRA int ids the worker holds (its CPU cache, LRUCacheWorkerLoRAManager.list_adapters), via
        vLLM's dev-mode /collective_rpc; None when that route is off."""
        status, body = http("POST", f"{self.engine_url}/collective_rpc", {"method": "list_loras"})
        if status != 200:
            return None
        results = json.loads(body).get("results") or [""]
        return sorted(int(x) for x in re.findall(r"\d+", str(results[0])))

    def lora_metrics(self) -> dict[str, Any]:
        """Every vllm series with 'lora' in its name, and lora_requests_info's current series' labels (the
        one with the largest value: the time of its last update)."""
        _, text = http("GET", f"{self.engine_url}/metrics")
        names: set[str] = set()
        current: tuple[float, dict[str, str]] = (-1.0, {})
        series = 0
        for line in text.splitlines():
            m = re.match(r"^(vllm:[a-z_]*lora[a-z_]*)(?:\{(.*)\})? (\S+)", line)
            if not m:
                continue
            names.add(m.group(1))
            series += 1
            if m.group(1) == "vllm:lora_requests_info" and float(m.group(3)) > current[0]:
                current = (float(m.group(3)), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
        return {"names": sorted(names), "series": series, "lora_requests_info": current[1]}

    def chat(self, url: str, model: str, tokens: int = 4) -> int:
        return http("POST", f"{url}/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens})[0]


# ---- section 1: proxy overhead ------------------------------------------------------------------------------

async def one_request(session, url: str, body: bytes, stream: bool) -> tuple[bool, float, float | None]:
    """(ok, latency s, time to the first content chunk s for streams)."""
    t0 = time.perf_counter()
    ttft = None
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if not stream:
            await r.read()
            return r.status == 200, time.perf_counter() - t0, None
        done = False
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    done = True
                elif ttft is None:
                    event = json.loads(line[6:])
                    delta = (event.get("choices") or [{}])[0].get("delta") or {}
                    if delta.get("content"):
                        ttft = time.perf_counter() - t0
        return r.status == 200 and done, time.perf_counter() - t0, ttft


async def chunk(session, url: str, body: bytes, stream: bool, n: int, conc: int) -> tuple[list, float, int]:
    """n requests by `conc` workers; (per-request (latency, ttft), wall s, errors)."""
    left = n
    out: list[tuple[float, float | None]] = []
    errors = 0

    async def worker() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            try:
                ok, lat, ttft = await one_request(session, url, body, stream)
            except Exception:  # noqa: BLE001 - counted
                ok, lat, ttft = False, 0.0, None
            if ok:
                out.append((lat, ttft))
            else:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return out, time.perf_counter() - t0, errors


def handler_times(log: Path, offset: int) -> list[float]:
    """From the proxy's access log after `offset`: duration - engine time - queue wait (ms), per 200 chat."""
    out = []
    with open(log, "rb") as f:
        f.seek(offset)
        for line in f:
            if b'"engine_ms"' not in line or b"/v1/chat/completions" not in line:
                continue
            try:
                x = json.loads(line)
            except ValueError:
                continue
            if x.get("status") == 200:
                out.append(x["duration_ms"] - x["engine_ms"] - x.get("queue_ms", 0.0))
    return out


def request_body(model: str, tokens: int, stream: bool) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "describe the scene"}],
                       "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, "stream": stream}).encode()


async def overhead(rig: Rig, args, adapter_engine_name: str) -> list[dict]:
    import aiohttp

    rows = []
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        for conc in args.levels:
            for kind, stream in (("chat", False), ("stream", True)):
                for target in ("base", "adapter"):
                    direct_body = request_body(BASE if target == "base" else adapter_engine_name, args.tokens, stream)
                    proxy_body = request_body(BASE if target == "base" else "ovh", args.tokens, stream)
                    urls = {"direct": (f"{rig.engine_url}/v1/chat/completions", direct_body),
                            "proxy": (f"{rig.proxy_url}/v1/chat/completions", proxy_body)}
                    for side in urls:  # warm-up, unmeasured
                        await chunk(session, urls[side][0], urls[side][1], stream, conc, conc)
                    log_offset = rig.proxy_log.stat().st_size
                    res = {s: {"lat": [], "ttft": [], "wall": 0.0, "errors": 0, "cpu": 0.0} for s in urls}
                    per_chunk = conc * 2
                    chunks = max(1, -(-args.requests // per_chunk))
                    for i in range(chunks):
                        order = ("direct", "proxy") if i % 2 == 0 else ("proxy", "direct")
                        for side in order:
                            cpu0 = cpu_seconds(rig.proxy_pid)
                            got, wall, errors = await chunk(session, urls[side][0], urls[side][1], stream,
                                                            per_chunk, conc)
                            res[side]["cpu"] += cpu_seconds(rig.proxy_pid) - cpu0
                            res[side]["lat"] += [x[0] for x in got]
                            res[side]["ttft"] += [x[1] for x in got if x[1] is not None]
                            res[side]["wall"] += wall
                            res[side]["errors"] += errors
                    row: dict[str, Any] = {"kind": kind, "model": target, "concurrency": conc}
                    for s, r in res.items():
                        row[s] = {"requests": len(r["lat"]), "errors": r["errors"],
                                  "p50_ms": percentile(r["lat"], 0.5) * 1000,
                                  "p95_ms": percentile(r["lat"], 0.95) * 1000,
                                  "ttft_p50_ms": percentile(r["ttft"], 0.5) * 1000 if stream else None,
                                  "rps": len(r["lat"]) / r["wall"] if r["wall"] else float("nan")}
                    d, p = row["direct"], row["proxy"]
                    row["p50_ratio"] = p["p50_ms"] / d["p50_ms"]
                    row["added_p50_ms"] = p["p50_ms"] - d["p50_ms"]
                    row["rps_ratio"] = p["rps"] / d["rps"]
                    row["proxy_cpu_ms_per_request"] = res["proxy"]["cpu"] / max(1, per_chunk * chunks) * 1000
                    inside = handler_times(rig.proxy_log, log_offset)
                    row["in_proxy_p50_ms"] = percentile(inside, 0.5)
                    row["in_proxy_p95_ms"] = percentile(inside, 0.95)
                    row["added_ttft_p50_ms"] = (p["ttft_p50_ms"] - d["ttft_p50_ms"]) if stream else None
                    rows.append(row)
                    ttft = (f"{d['ttft_p50_ms']:>7.1f}/{p['ttft_p50_ms']:<7.1f}" if stream else f"{'-':>7}/{'-':<7}")
                    print(f"{kind:>6} {target:>7} {conc:>4} {d['p50_ms']:>8.1f} {p['p50_ms']:>8.1f} "
                          f"{row['p50_ratio']:>6.3f} {row['added_p50_ms']:>7.1f} "
                          f"{d['p95_ms']:>8.1f} {p['p95_ms']:>8.1f} "
                          f"{ttft} {d['rps']:>6.2f} {p['rps']:>6.2f} {row['rps_ratio']:>6.3f} "
                          f"{row['proxy_cpu_ms_per_request']:>6.2f} {row['in_proxy_p50_ms']:>5.2f}/"
                          f"{row['in_proxy_p95_ms']:<5.2f} {d['errors'] + p['errors']:>4} {d['requests']:>4}",
                          flush=True)
    return rows


# ---- section 2: LoRA load latency ---------------------------------------------------------------------------

def loads(rig: Rig, args) -> dict:
    path = rig.version_dir("ld-direct", "0000000d", 0)
    direct, unload, failed = [], [], 0
    for i in range(args.loads):
        t0 = time.perf_counter()
        status, _ = http("POST", f"{rig.engine_url}/v1/load_lora_adapter",
                         {"lora_name": f"ld-{i}", "lora_path": path})
        direct.append(time.perf_counter() - t0)
        failed += status != 200
        t0 = time.perf_counter()
        http("POST", f"{rig.engine_url}/v1/unload_lora_adapter", {"lora_name": f"ld-{i}"})
        unload.append(time.perf_counter() - t0)
    pushed, polled, push_failed = [], [], 0
    steady = {"name": "ovh", "version": OVH_VERSION, "path": rig.version_dir("ovh", OVH_VERSION, 0)}
    for i in range(args.loads):
        version = f"{0x1d000000 + i:08x}"
        spec = {"name": "ld", "version": version, "path": rig.version_dir("ld", version, i)}
        t0 = time.perf_counter()
        status, _, took = rig.push([steady, spec])
        # the state as a client polling GET sees it: loaded at this version
        while True:
            st = next((a for a in rig.state()["adapters"] if a["name"] == "ld"), {})
            if st.get("version") == version and st.get("state") in ("loaded", "failed"):
                break
            time.sleep(0.01)
        polled.append(time.perf_counter() - t0)
        pushed.append(took)
        push_failed += st.get("state") != "loaded" or status != 200
        rig.wait_unloaded()
    rig.push([steady])
    rig.wait_unloaded()

    def summary(xs: list[float]) -> dict:
        return {"n": len(xs), "median_ms": percentile(xs, 0.5) * 1000, "p95_ms": percentile(xs, 0.95) * 1000,
                "ms": [round(x * 1000, 1) for x in xs]}

    out = {"direct_load": summary(direct), "direct_unload": summary(unload), "direct_failed": failed,
           "proxy_push_wait": summary(pushed), "proxy_push_to_loaded": summary(polled), "proxy_failed": push_failed}
    for key in ("direct_load", "direct_unload", "proxy_push_wait", "proxy_push_to_loaded"):
        s = out[key]
        print(f"{key:>22}: n={s['n']} median {s['median_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms")
    print(f"{'failed':>22}: direct {failed}, proxy {push_failed}")
    return out


# ---- section 3: swap residency ------------------------------------------------------------------------------

def swap_phase(rig: Rig, args, phase: str, live: bool, first: int, names: dict[int, str], rss0: int) -> list[dict]:
    """args.swaps version swaps of `swap` (then a rollback of the last swap) through the proxy's
    push path; with `live`, the adapter `ovh` stays desired and gets one request per step before `swap`'s
    requests (so at the next load it, not the unloaded old version, is the least recently used)."""
    steady = {"name": "ovh", "version": OVH_VERSION, "path": rig.version_dir("ovh", OVH_VERSION, 0)}
    versions = [f"{first + i:08x}" for i in range(args.swaps + 1)]
    # the last step rolls the last swap back: the version unloaded one step before is loaded again (a new
    # engine id: vLLM forgot the name at the unload, not the weights)
    steps = [*enumerate(versions), (len(versions) - 2, versions[-2])]
    rows = []

    def ids(worker: list[int] | None) -> str:
        return "-" if worker is None else ",".join(f"{names.get(i, '?')}#{i}" for i in worker)

    for step, (i, version) in enumerate(steps):
        spec = {"name": "swap", "version": version, "path": rig.version_dir("swap", version, i)}
        status, snap, took = rig.push([steady, spec] if live else [spec])
        st = next((a for a in snap.get("adapters", []) if a["name"] == "swap"), {})
        unloaded = rig.wait_unloaded()
        after_push = rig.worker_loras()
        if after_push:
            names.setdefault(max(after_push), f"swap@{version}")  # the engine numbers loads 1, 2, 3, ...
        live_status, live_ms = None, None
        if live:
            t0 = time.perf_counter()
            live_status = rig.chat(rig.proxy_url, "ovh")
            live_ms = (time.perf_counter() - t0) * 1000
        oks = sum(rig.chat(rig.proxy_url, "swap") == 200 for _ in range(args.swap_requests))
        time.sleep(0.3)  # a metrics round after the last request
        after_requests = rig.worker_loras()
        models = [m for m in rig.engine_models() if m != BASE]
        rss = group_rss_kb(rig.engine_pid)
        metrics = rig.lora_metrics()
        row = {"phase": phase, "step": step, "version": version, "rollback": step == len(steps) - 1,
               "push_status": status, "push_ms": took * 1000, "state": st.get("state"), "reason": st.get("reason"),
               "old_unloaded": unloaded, "swap_ok": oks, "swap_requests": args.swap_requests,
               "live_status": live_status, "live_ms": live_ms, "engine_models": models,
               "worker_after_push": after_push, "worker_after_requests": after_requests,
               "worker_names_after_push": ids(after_push), "worker_names_after_requests": ids(after_requests),
               "rss_kb": sum(rss.values()), "rss_kb_by_pid": rss, "metrics": metrics}
        rows.append(row)
        info = metrics["lora_requests_info"]
        live_txt = f"{live_status} {live_ms:.0f}ms" if live else "-"
        print(f"{step:>4}{'r' if row['rollback'] else ' '} {version:>9} {took * 1000:>7.0f} {st.get('state')!s:>7} "
              f"{oks:>3}/{args.swap_requests:<3} {live_txt:>10} {','.join(models):<28} {ids(after_push):<36} "
              f"{ids(after_requests):<36} {(row['rss_kb'] - rss0) / 1024:>+7.1f} {metrics['series']:>6} "
              f"running={info.get('running_lora_adapters')!r}", flush=True)
    return rows


def swaps(rig: Rig, args) -> dict:
    # which worker id is which adapter: the engine gives every load of a new name the next int id
    names: dict[int, str] = {}
    before = rig.worker_loras()
    ovh_id = rig.ovh_id
    if ovh_id is not None:
        names[ovh_id] = "ovh"
    rss0 = sum(group_rss_kb(rig.engine_pid).values())
    print(f"# before: engine models {rig.engine_models()}, worker lora ids {before} (ovh is #{ovh_id}), "
          f"engine RSS {rss0 / 1024:.0f} MiB; worker ids shown as name#id ('?': loaded by an earlier section)")
    print(f"{'step':>5} {'version':>9} {'push ms':>7} {'state':>7} {'swap':>7} {'live ovh':>10} "
          f"{'engine /v1/models (LoRAs)':<28} {'worker after push':<36} {'worker after requests':<36} "
          f"{'dRSS MiB':>7} {'series':>6} lora_requests_info")
    out: dict[str, Any] = {"rss_before_kb": rss0, "worker_before": before}
    print("# phase 1: `swap` alone (`ovh` no longer desired)")
    out["alone"] = swap_phase(rig, args, "alone", False, 0x5a000000, names, rss0)
    print("# phase 2: `ovh` desired again (pushed alone first: a new engine id), used before `swap` in every step")
    rig.push([{"name": "ovh", "version": OVH_VERSION, "path": rig.version_dir("ovh", OVH_VERSION, 0)}])
    rig.wait_unloaded()
    ids = rig.worker_loras() or []
    if ids:
        names[max(ids)] = "ovh"
    print(f"#   ovh re-loaded: worker ids {ids}")
    out["with_live"] = swap_phase(rig, args, "with_live", True, 0x5b000000, names, rss0)
    _, text = http("GET", f"{rig.engine_url}/metrics")
    out["lora_requests_info_series"] = [line for line in text.splitlines()
                                        if line.startswith("vllm:lora_requests_info{")]
    print(f"# /metrics: {len(out['lora_requests_info_series'])} vllm:lora_requests_info series, e.g.")
    for line in out["lora_requests_info_series"][-4:]:
        print(f"#   {line}")
    return out


OVH_VERSION = "0000a001"


# ---- main ---------------------------------------------------------------------------------------------------



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="overhead,load,swap", help="comma-separated: overhead, load, swap")
    ap.add_argument("--levels", default="1,4", help="overhead: comma-separated client concurrency levels")
    ap.add_argument("--requests", type=int, default=24,
                    help="overhead: measured requests per row and side (in chunks of 2 x concurrency)")
    ap.add_argument("--tokens", type=int, default=16, help="overhead: tokens per answer (max_tokens = min_tokens)")
    ap.add_argument("--loads", type=int, default=20, help="load: loads direct and pushes through the proxy")
    ap.add_argument("--swaps", type=int, default=8, help="swap: version swaps (then one rollback)")
    ap.add_argument("--swap-requests", type=int, default=3, help="swap: requests to the new version per swap")
    ap.add_argument("--max-cpu-loras", type=int, default=2,
                    help="the engine's --max-cpu-loras (its CPU LoRA cache, LRU; vLLM's default is --max-loras, 2)")
    ap.add_argument("--vllm-python", help="the vLLM environment's python (default $VLMPOOL_VLLM_PYTHON, else "
                                          "`bash hack/vllm-env.sh`'s last line)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (model, adapters, logs)")
    args = ap.parse_args()
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"overhead", "load", "swap"}
    if unknown:
        ap.error(f"unknown sections: {sorted(unknown)}")

    from vlmpool.testing.adapters import make_adapter
    from vlmpool.testing.vlm_model import make_model

    python = vllm_python(args.vllm_python)
    engine_args = [*ENGINE_ARGS, "--max-cpu-loras", str(args.max_cpu_loras)]
    work = Path(tempfile.mkdtemp(prefix="bench-real-engine-"))
    size = machine()
    summary: dict[str, Any] = {"bench": "real_engine", "machine": size, "engine_args": engine_args,
                               "uptime": {"start": uptime()}}
    print(f"# real-engine bench: nproc {size['nproc']}, memory {size['mem_gib']} GiB, {summary['uptime']['start']}")
    t0 = time.monotonic()
    model = make_model(work / "Qwen2.5-VL-tiny")
    sources = [make_adapter("qwen2_5_vl", work / f"src{s}", r=8, alpha=16, model_dir=model, base_name=str(model),
                            seed=s) for s in (1, 2)]
    summary["adapter_bytes"] = (sources[0] / "adapter_model.safetensors").stat().st_size
    print(f"# adapter_model.safetensors {summary['adapter_bytes'] / 1e3:.0f} kB (rank 8, 7 projections, 2 layers)")
    print(f"# model and adapters made in {time.monotonic() - t0:.1f} s under {work}")
    proxy = None
    try:
        with start_engine(python, model, engine_args, work / "vllm.log", env={"VLLM_SERVER_DEV_MODE": "1"}) as engine:
            summary["engine_start_s"] = round(engine.started_in_s, 1)
            print(f"# engine {engine.url} (pid {engine.pid}) healthy in {engine.started_in_s:.1f} s; "
                  f"flags: {' '.join(engine_args)}", flush=True)
            port, admin_port = free_port(), free_port()
            env = dict(os.environ, VLMPOOL_ADMIN_TOKEN=TOKEN)
            proxy_log = open(work / "proxy.log", "w")
            proxy = subprocess.Popen(
                [sys.executable, "-m", "vlmpool", "proxy", "--engine-url", engine.url, "--host", "127.0.0.1",
                 "--port", str(port), "--admin-port", str(admin_port), "--base-model", BASE, "--max-loras", "2",
                 "--adapter-root", str(work / "adapters"), "--log-level", "info"],
                env=env, stdout=proxy_log, stderr=subprocess.STDOUT, cwd=REPO)
            wait_http(f"http://127.0.0.1:{port}/healthz")
            rig = Rig(engine.url, engine.pid, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", work,
                      proxy.pid)
            rig.sources = sources
            (work / "adapters").mkdir(exist_ok=True)
            status, snap, _ = rig.push([{"name": "ovh", "version": OVH_VERSION,
                                            "path": rig.version_dir("ovh", OVH_VERSION, 0)}])
            assert status == 200 and snap["counts"]["loaded"] == 1, snap
            rig.ovh_id = max(rig.worker_loras() or [0]) or None
            if "overhead" in sections:
                summary["uptime"]["overhead_start"] = uptime()
                print(f"\n## overhead: {args.requests} requests per row and side, {args.tokens} tokens each, "
                      f"interleaved in chunks of 2 x concurrency; {summary['uptime']['overhead_start']}")
                print(f"{'kind':>6} {'model':>7} {'conc':>4} {'p50 dir':>8} {'p50 prx':>8} {'ratio':>6} {'+p50ms':>7} "
                      f"{'p95 dir':>8} {'p95 prx':>8} {'ttft dir/prx':>15} {'rps d':>6} {'rps p':>6} {'ratio':>6} "
                      f"{'cpu ms':>6} {'in-proxy':>11} {'err':>4} {'n':>4}")
                print("# cpu ms: the proxy process's CPU over the proxied chunks per proxied request (its background "
                      "work included); in-proxy p50/p95 ms: duration - engine - queue from its access log")
                summary["overhead"] = asyncio.run(overhead(rig, args, f"ovh@{OVH_VERSION}"))
                summary["uptime"]["overhead_end"] = uptime()
                print(f"# {summary['uptime']['overhead_end']}")
            if "load" in sections:
                summary["uptime"]["load_start"] = uptime()
                print(f"\n## load: {args.loads} loads of a rank-8 adapter; {summary['uptime']['load_start']}")
                summary["load"] = loads(rig, args)
                summary["uptime"]["load_end"] = uptime()
                print(f"# {summary['uptime']['load_end']}")
            if "swap" in sections:
                summary["uptime"]["swap_start"] = uptime()
                print(f"\n## swap: {args.swaps} swaps of `swap` + a rollback, `ovh` live, engine "
                      f"--max-loras 2 --max-cpu-loras {args.max_cpu_loras}; {summary['uptime']['swap_start']}")
                summary["swap"] = swaps(rig, args)
                summary["uptime"]["swap_end"] = uptime()
                print(f"# {summary['uptime']['swap_end']}")
    finally:
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proxy.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"# kept {work}")
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
