"""What bench/scale.py measures with: the apiserver's request counters, process CPU and memory from
/proc, the simulators' load counters, adapter variants, and a request load (imported by name: the
benches run as scripts from this directory)."""

from __future__ import annotations

import collections
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchlib import cpu_seconds

WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
Key = tuple[str, str]  # (verb, resource[/subresource])


# ---- the apiserver's own counters --------------------------------------------------------------
def apiserver_requests(cp: Any) -> collections.Counter[Key]:
    """apiserver_request_total from the apiserver's /metrics, summed by (verb, resource/subresource);
    a POST that answered 409 (already exists) is kept apart as verb 'POST-409'."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = cp.request("/metrics", timeout=30)
    if status != 200:
        raise RuntimeError(f"apiserver /metrics answered {status}")
    out: collections.Counter[Key] = collections.Counter()
    for fam in text_string_to_metric_families(body.decode()):
        if fam.name != "apiserver_request":
            continue
        for s in fam.samples:
            if not s.name.endswith("_total"):
                continue
            lab = s.labels
            res = lab.get("resource", "") + (f"/{lab['subresource']}" if lab.get("subresource") else "")
            verb = lab.get("verb", "")
            if verb == "POST" and lab.get("code") == "409":
                verb = "POST-409"
            out[(verb, res or lab.get("component", "?"))] += int(s.value)
    return out


def diff(after: collections.Counter[Key], before: collections.Counter[Key]) -> dict[Key, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


def writes(d: dict[Key, int]) -> dict[str, int]:
    """Writes by resource (creates, updates, patches, deletes)."""
    out: collections.Counter[str] = collections.Counter()
    for (verb, res), n in d.items():
        if verb in WRITE_VERBS:
            out[res] += n
    return dict(out.most_common())


def reads(d: dict[Key, int]) -> int:
    return sum(n for (verb, _), n in d.items() if verb not in WRITE_VERBS and verb != "WATCH")


def jobs_created(d: dict[Key, int]) -> int:
    return d.get(("POST", "jobs"), 0)


# ---- processes -----------------------------------------------------------------------------------
def proc_mem_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a live process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def main_process(pid: int, marker: str) -> int:
    """The process of a container whose arguments include `marker` (its launcher, sh or unshare,
    execs into it or runs it as a child)."""
    todo = [pid]
    while todo:
        p = todo.pop(0)
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv and Path(argv[0].decode()).name not in ("sh", "unshare"):
            return p
        todo += _children(p)
    return pid


def container_pids(node: Any, namespace: str, container: str) -> dict[str, int]:
    """pod name -> pid of one container's process, read from the process kubelet (same process)."""
    out = {}
    kubelet = node.kubelet
    for worker in list(kubelet.workers.values()):
        if worker.ns != namespace:
            continue
        for run in worker.containers:
            if run.name == container and run.proc is not None and run.proc.returncode is None:
                out[worker.name] = run.proc.pid
    return out


class ProcWatch:
    """CPU seconds and peak RSS of a set of processes over one phase (a restarted process is new)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = dict(pids)
        self.cpu0 = {k: _cpu(p) for k, p in self.pids.items()}

    def read(self) -> dict[str, dict[str, float]]:
        out = {}
        for k, p in self.pids.items():
            try:
                mem = proc_mem_kib(p)
                out[k] = {"cpu_s": round(_cpu(p) - self.cpu0[k], 2), "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
                          "rss_mib": round(mem["VmRSS"] / 1024, 1)}
            except OSError:
                continue
        return out


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def summarize(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    """Sum and max of CPU seconds, max peak RSS and max RSS over processes."""
    if not stats:
        return {}
    cpu = [s["cpu_s"] for s in stats.values()]
    return {"n": len(stats), "cpu_s_sum": round(sum(cpu), 2), "cpu_s_max": round(max(cpu), 2),
            "peak_rss_mib_max": max(s["peak_rss_mib"] for s in stats.values()),
            "rss_mib_max": max(s["rss_mib"] for s in stats.values())}


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return {"cpus": os.cpu_count(), "mem_gib": round(mem["MemTotal"] / 2**20, 1),
            "mem_available_gib": round(mem.get("MemAvailable", 0) / 2**20, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


# ---- engines (simulators) --------------------------------------------------------------------------
def http_json(url: str, body: dict | None = None, timeout: float = 10) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def http_text(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def engine_loads(engines: list[str]) -> int:
    """Adapter reads from disk (real loads, not 'already loaded' answers) summed over the engines."""
    return sum(sum(http_json(u + "/sim/stats")["adapter_disk_loads"].values()) for u in engines)


def engine_models(url: str) -> set[str]:
    try:
        return {m["id"] for m in http_json(url + "/v1/models", timeout=5)["data"]}
    except (OSError, ValueError, KeyError):
        return set()


# ---- adapters ----------------------------------------------------------------------------------------
def adapter_variants(seed_dir: Path, out: Path, n: int) -> list[Path]:
    """n distinct adapters (different lora_B bytes, so different content digests) from one PEFT adapter."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(seed_dir / "adapter_model.safetensors"))
    rng = np.random.default_rng(0)
    dirs = []
    for i in range(n):
        d = out / f"v{i}"
        d.mkdir(parents=True, exist_ok=True)
        for f in seed_dir.iterdir():
            if f.name != "adapter_model.safetensors" and f.is_file():
                shutil.copy2(f, d / f.name)
        # language lora_B only: a vision tower that looks trained is refused by the patch Job
        mixed = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.01
                     if "lora_B" in k and "visual." not in k else v) for k, v in tensors.items()}
        save_file(mixed, str(d / "adapter_model.safetensors"))
        dirs.append(d)
    return dirs


# ---- a request load --------------------------------------------------------------------------------
class Load:
    """`threads` clients sending small chat completions for `model` round-robin over `urls`
    (each pod's proxy) until stopped; counts answers by status."""

    def __init__(self, urls: list[str], model: str, threads: int = 4):
        self.urls, self.model = urls, model
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _urls(self) -> list[str]:
        return self.urls

    def _run(self, i: int) -> None:
        body = {"model": self.model, "max_tokens": 4, "messages": [{"role": "user", "content": "describe"}]}
        n = i
        while not self._stop.is_set():
            urls = self._urls()
            if not urls:
                with self._lock:
                    self.counts["no_endpoint"] += 1
                time.sleep(0.05)
                continue
            url = urls[n % len(urls)] + "/v1/chat/completions"
            n += 1
            try:
                http_json(url, body, timeout=30)
                key = "ok"
            except urllib.error.HTTPError as e:
                key = f"http_{e.code}"
                self._note(f"{url}: HTTP {e.code}: {e.read()[:200]!r}")
            except OSError as e:
                key = "connection"
                self._note(f"{url}: {e}")
            with self._lock:
                self.counts[key] += 1

    def _note(self, text: str) -> None:
        with self._lock:
            if len(self.errors) < 10:
                self.errors.append(text)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    @property
    def failed(self) -> int:
        return sum(n for k, n in self.counts.items() if k != "ok")


class FollowLoad(Load):
    """Load over the pods a Service would send to: `endpoints()` (the Ready pods not being deleted, as the
    endpoints controller computes them) re-read every `refresh` seconds and used `lag` seconds late, as
    kube-proxy or a gateway follows EndpointSlices (about a second on a real cluster: the endpoints
    controller's batching, then the proxy's sync). The local cluster has no Service data path (loopback
    pod addresses are refused in EndpointSlices), so the lag is modelled here, not measured."""

    def __init__(self, endpoints, model: str, threads: int = 4, refresh: float = 0.2, lag: float = 1.0):
        super().__init__([], model, threads)
        self._endpoints, self._refresh, self._lag = endpoints, refresh, lag
        self._seen: collections.deque[tuple[float, list[str]]] = collections.deque([(0.0, list(endpoints()))])
        self._watcher = threading.Thread(target=self._follow, daemon=True)

    def _follow(self) -> None:
        while not self._stop.wait(self._refresh):
            try:
                self._seen.append((time.monotonic(), list(self._endpoints())))
            except Exception as e:  # noqa: BLE001 - the apiserver busy: keep the last list
                self._note(f"endpoints: {e}")

    def _urls(self) -> list[str]:
        cutoff = time.monotonic() - self._lag
        while len(self._seen) > 1 and self._seen[1][0] <= cutoff:
            self._seen.popleft()
        return self._seen[0][1]

    def __enter__(self) -> FollowLoad:
        super().__enter__()
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._watcher.join(10)


def wait_until(pred, timeout: float, what: str, interval: float = 0.5) -> float:
    """Poll `pred` until true; returns the monotonic time it first held. TimeoutError names `what`."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached after {timeout:.0f}s")
        time.sleep(interval)
