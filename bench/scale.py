"""N adapters x M pods on the local cluster (real apiserver, process kubelet, operator, patch Jobs,
proxies, and the simulator as the engine with a per-load latency), the figures of issue 12:

1. apply all N adapters at once -> every adapter Ready on every pod (patch Jobs; the Job bound stated);
2. operator restart with nothing changed -> converged, counting new Jobs (apiserver) and loads (engines);
3. every engine killed (the kubelet restarts it; it forgot every adapter) -> all N loaded on all M pods;
4. one adapter's version swapped while requests for it run on every pod: time, and failed requests;
4b. a roll of the full pool (every GPU taken) after an engine-args change, under load through the pods a
   Service would pick: time until every pod is new and holds every adapter, and failed requests;
5. per phase: the apiserver's own request counts (apiserver_request_total, by verb and resource), the
   operator's CPU seconds and peak RSS, and the proxies' (and engines').

Each figure is printed with its ratio to the goal. Results are appended to --results (JSON lines), from
which bench/scaleplot.py draws the growth curves; --steps runs several sizes, each on a fresh cluster.

    .venv/bin/python bench/scale.py --adapters 500 --pods 20
    .venv/bin/python bench/scale.py --steps 20x4,50x8,100x10 --plot docs/img
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import scalelib as L
from scalereport import report, report_phase

from vlmpool.manifests.common import server_label_selector
from vlmpool.names import API_VERSION

PROXY_CONTAINER, ENGINE_CONTAINER = "proxy", "engine"  # vlmpool.manifests.pool's names

NS, POOL = "bench", "bench"
# the pool's server pods only (its patch Jobs' pods carry the pool label too, and have no engine)
SERVERS = urllib.parse.quote(server_label_selector(POOL), safe="")
# Default per-load latency and where it comes from (printed with the figures).
LOAD_MS = 100.0
LOAD_MS_SOURCE = ("vLLM 0.32.0's own add_lora disk read (PEFTHelper, validate_legal, LoRAModel.from_local_checkpoint "
                  "on the CPU) of a Qwen2.5-VL-3B-shaped rank-16 adapter (7 projections x 36 layers, bf16, 60 MB), "
                  "measured by bench/vllm_lora_load.py on this machine: 71 ms first read, 42 ms median from the page "
                  "cache, without pin_memory (no GPU here); 100 ms adds pinning and a margin, the low end of the "
                  "100-300 ms issue 12 quotes")
LOAD_WORKERS = 1  # vLLM's EngineCore runs add_lora calls one after the other
GOALS = {"operator_restart_s": 10.0, "engine_restart_s": 60.0}
PHASES = ("apply_all", "operator_restart", "engine_restart", "swap", "roll")  # Bench's methods, in order
DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "docs" / "perf" / "scale.jsonl"


class Bench:
    def __init__(self, dev: Any, args: argparse.Namespace, sources: list[Path]):
        self.dev, self.args, self.sources = dev, args, sources
        self.n, self.m = args.adapters, args.pods
        self.own: dict[L.Key, int] = {}  # the bench's own apiserver requests, taken out of each phase

    # ---- reading the cluster (counted, then taken out of the apiserver's figures) ---------------------
    def _get(self, path: str, key: L.Key) -> dict:
        status, body = self.dev.cp.request(path, timeout=30)
        self.own[key] = self.own.get(key, 0) + 1
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
        return json.loads(body)

    def _own(self, key: L.Key, n: int) -> None:
        self.own[key] = self.own.get(key, 0) + n

    def adapters(self) -> list[dict]:
        return self._get(f"/apis/{API_VERSION}/namespaces/{NS}/vlmadapters",
                         ("LIST", "vlmadapters"))["items"]

    def pods(self) -> list[dict]:
        items = self._get(f"/api/v1/namespaces/{NS}/pods?labelSelector={SERVERS}",
                          ("LIST", "pods"))["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions", []))]

    def all_ready(self, version_of: dict[str, str] | None = None) -> bool:
        items = self.adapters()
        bad = [a for a in items if (a.get("status") or {}).get("phase") == "Failed"]
        if bad:
            st = bad[0]["status"]
            raise RuntimeError(f"adapter {bad[0]['metadata']['name']} Failed: {st.get('reason')}: {st.get('message')}")
        if len(items) < self.n:
            return False
        for a in items:
            st = a.get("status") or {}
            if st.get("phase") != "Ready" or st.get("loadedPods") != self.m or st.get("desiredPods") != self.m:
                return False
            if version_of and st.get("version") == version_of.get(a["metadata"]["name"]):
                return False  # still the version it had before
        return True

    def operator_metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = L.http_text(f"http://127.0.0.1:{self.dev.operator_metrics_port}/metrics")
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.endswith("_total"):
                    key = s.name + "".join(f"|{v}" for v in s.labels.values())
                    out[key] = out.get(key, 0) + s.value
        return out

    # ---- one phase's bookkeeping -------------------------------------------------------------------
    def begin(self, operator: bool = True) -> dict:
        proxies = L.container_pids(self.dev.node, NS, PROXY_CONTAINER)
        engines = L.container_pids(self.dev.node, NS, ENGINE_CONTAINER)
        self.own = {}
        return {"api": L.apiserver_requests(self.dev.cp),
                "operator": L.ProcWatch({"operator": self.dev._operator.pid} if operator else {}),
                "proxies": L.ProcWatch({k: L.main_process(p, "proxy") for k, p in proxies.items()}),
                "engines": L.ProcWatch({k: L.main_process(p, "sim") for k, p in engines.items()})}

    def end(self, mark: dict, name: str, seconds: float, **extra: Any) -> dict:
        api = L.diff(L.apiserver_requests(self.dev.cp), mark["api"])
        for k, v in self.own.items():  # the bench's own polling is not the system's work
            if k in api:
                api[k] = max(0, api[k] - v)
        writes = L.writes(api)
        res = {"phase": name, "seconds": round(seconds, 2), "jobs_created": L.jobs_created(api),
               "apiserver_writes": sum(writes.values()), "apiserver_writes_by_resource": writes,
               "apiserver_reads": L.reads(api),
               "apiserver_requests": {f"{v} {r}": n for (v, r), n in sorted(api.items())},
               "operator": mark["operator"].read().get("operator", {}),
               "proxies": L.summarize(mark["proxies"].read()), "engines": L.summarize(mark["engines"].read()),
               **extra}
        return res

    def engines(self) -> list[str]:
        return [f"http://{p['status']['podIP']}:8000" for p in self.pods()]

    def engines_when_running(self) -> list[str]:
        """Every pool pod's engine URL, Ready or not (an engine that restarts makes its pod unready)."""
        items = self._get(f"/api/v1/namespaces/{NS}/pods?labelSelector={SERVERS}",
                          ("LIST", "pods"))["items"]
        return [f"http://{p['status']['podIP']}:8000" for p in items
                if not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("podIP")]

    def want(self) -> set[str]:
        return {f"{a['metadata']['name']}@{a['status']['version']}" for a in self.adapters()}

    # ---- the phases ------------------------------------------------------------------------------
    def adapter_doc(self, i: int, source: Path) -> dict:
        return {"apiVersion": API_VERSION, "kind": "VLMAdapter",
                "metadata": {"name": f"adapter-{i}", "namespace": NS},
                "spec": {"poolRef": {"name": POOL}, "source": {"uri": f"file://{source}"}}}

    def apply_all(self) -> dict:
        mark = self.begin()
        docs = "\n---\n".join(json.dumps(self.adapter_doc(i, self.sources[i])) for i in range(self.n))
        t0 = time.monotonic()
        self.dev.kubectl("apply", "-f", "-", input=docs)
        self._own(("GET", "vlmadapters"), self.n)  # kubectl apply: a GET and a create per adapter
        self._own(("POST", "vlmadapters"), self.n)
        t1 = L.wait_until(self.all_ready, self.args.timeout, f"{self.n} adapters Ready on {self.m} pods", 1.0)
        loads = L.engine_loads(self.engines())
        res = self.end(mark, "apply_all", t1 - t0, loads=loads, expected_loads=self.n * self.m)
        res["adapters_per_minute"] = round(self.n / (t1 - t0) * 60, 1)
        return res

    def operator_restart(self) -> dict:
        engines = self.engines()
        loads0 = L.engine_loads(engines)
        self.dev.stop_operator()
        mark = self.begin(operator=False)
        t0 = time.monotonic()
        self.dev.start_operator()
        mark["operator"] = L.ProcWatch({"operator": self.dev._operator.pid})

        def converged() -> bool:
            m = self.operator_metrics()
            recon = sum(v for k, v in m.items() if k.startswith("vlmpool_operator_reconciles_total|adapter"))
            pushed = sum(v for k, v in m.items() if k.startswith("vlmpool_operator_pushes_total|ok"))
            return recon >= self.n and pushed >= self.m and self.all_ready()
        t1 = L.wait_until(converged, self.args.timeout, "operator restart converged", 0.25)
        quiet(lambda: self.operator_metrics(), 3.0, self.args.timeout)  # later Jobs or loads would count too
        loads = L.engine_loads(engines) - loads0
        return self.end(mark, "operator_restart", t1 - t0, loads=loads,
                        goal_s=GOALS["operator_restart_s"], ratio=round((t1 - t0) / GOALS["operator_restart_s"], 2))

    def engine_restart(self) -> dict:
        want = self.want()
        old = L.container_pids(self.dev.node, NS, ENGINE_CONTAINER)
        mark = self.begin()
        t0 = time.monotonic()
        for pid in old.values():
            try:
                os.killpg(pid, signal.SIGKILL)  # the container's process group (its own session)
            except ProcessLookupError:
                pass

        def restarted() -> bool:
            now = L.container_pids(self.dev.node, NS, ENGINE_CONTAINER)
            return len(now) == self.m and not set(now.values()) & set(old.values())
        L.wait_until(restarted, self.args.timeout, "engine processes restarted", 0.1)
        engines = self.engines_when_running()
        up: dict[str, float] = {}
        loaded: dict[str, float] = {}

        def progress() -> bool:  # when each engine answered again, and when it held every adapter again
            for u in engines:
                if u not in up and _healthy(u):
                    up[u] = time.monotonic()
                if u in up and u not in loaded and want <= L.engine_models(u):
                    loaded[u] = time.monotonic()
            return len(loaded) == len(engines)
        t1 = L.wait_until(progress, self.args.timeout, f"{self.n} adapters loaded again on {self.m} engines", 0.1)
        t_up = max(up.values())
        mark["engines"] = L.ProcWatch({k: L.main_process(p, "sim")
                                       for k, p in L.container_pids(self.dev.node, NS, ENGINE_CONTAINER).items()})
        loads = L.engine_loads(engines)
        reload_s = t1 - t_up  # from the last engine answering again to every engine holding every adapter
        per_engine = max(loaded[u] - up[u] for u in engines)
        return self.end(mark, "engine_restart", t1 - t0, engines_up_s=round(t_up - t0, 2),
                        reload_per_engine_max_s=round(per_engine, 2),
                        reload_s=round(reload_s, 2), loads=loads, expected_loads=self.n * self.m,
                        goal_s=GOALS["engine_restart_s"], ratio=round(per_engine / GOALS["engine_restart_s"], 2))

    def swap(self) -> dict:
        name = "adapter-0"
        old = next(a["status"]["version"] for a in self.adapters() if a["metadata"]["name"] == name)
        # every pod Ready again first (after the engine restart their readiness lags the engines by a probe)
        L.wait_until(lambda: len(self.pods()) == self.m, self.args.timeout, f"{self.m} pods Ready before the swap",
                     0.25)
        proxies = [f"http://{p['status']['podIP']}:8080" for p in self.pods()]
        mark = self.begin()
        with L.Load(proxies, name, threads=self.args.load_threads) as load:
            time.sleep(1.0)  # requests already flowing on every pod before the change
            t0 = time.monotonic()
            self.dev.kubectl("apply", "-f", "-", input=json.dumps(self.adapter_doc(0, self.sources[self.n])))
            self._own(("GET", "vlmadapters"), 1)  # kubectl apply: a GET and a patch
            self._own(("PATCH", "vlmadapters"), 1)
            t1 = L.wait_until(lambda: self.all_ready({name: old}), self.args.timeout, "swapped version Ready", 0.25)
            time.sleep(2.0)  # and still flowing after it
        if not sum(load.counts.values()):
            raise RuntimeError("no request was sent during the swap: the figure would prove nothing")
        return self.end(mark, "swap", t1 - t0, requests=dict(load.counts), failed_requests=load.failed,
                        errors=load.errors)


    def roll(self) -> dict:
        """An engine-args change rolls every pod of the full pool (each pod holds a GPU; spec.rollout
        decides how many go down at once) while clients send requests through the pods a Service would
        pick (FollowLoad): time until every pod is new, Ready and holds every adapter; failed requests."""
        name = "adapter-0"
        L.wait_until(lambda: len(self.pods()) == self.m, self.args.timeout, f"{self.m} pods Ready before the roll",
                     0.25)
        before = {p["metadata"]["name"] for p in self.pods()}
        doc = pool_doc(self.args)
        doc["spec"]["engine"]["extraArgs"] += ["--tpot-ms", "2.5"]  # a new engine command line: a roll
        mark = self.begin()

        def endpoints() -> list[str]:
            return [f"http://{p['status']['podIP']}:8080" for p in self.pods()]
        with L.FollowLoad(endpoints, name, threads=self.args.load_threads, lag=self.args.endpoint_lag) as load:
            time.sleep(1.0)  # requests already flowing on every pod before the change
            t0 = time.monotonic()
            self.dev.kubectl("apply", "-f", "-", input=json.dumps(doc))
            self._own(("GET", "vlmpools"), 1)  # kubectl apply: a GET and a patch
            self._own(("PATCH", "vlmpools"), 1)

            def rolled() -> bool:
                now = self.pods()
                return (len(now) == self.m and not {p["metadata"]["name"] for p in now} & before
                        and self.all_ready())
            t1 = L.wait_until(rolled, self.args.timeout, f"{self.m} new pods Ready with every adapter", 0.5)
            time.sleep(2.0)  # and still flowing after it
        if not load.counts.get("ok"):
            raise RuntimeError("no request succeeded during the roll: the figure would prove nothing")
        return self.end(mark, "roll", t1 - t0, requests=dict(load.counts), failed_requests=load.failed,
                        errors=load.errors, max_unavailable=str(self.args.max_unavailable or 1),
                        endpoint_lag_s=self.args.endpoint_lag,
                        seconds_per_pod=round((t1 - t0) / self.m, 2))


def _healthy(url: str) -> bool:
    try:
        L.http_json(url + "/health", timeout=2)
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def quiet(read, window: float, timeout: float) -> None:
    """Wait until `read()` stops changing for `window` seconds."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= window:
            return


# ---- running one size ----------------------------------------------------------------------------
def pool_doc(args: argparse.Namespace) -> dict:
    extra = ["--lora-load-ms", f"{args.lora_load_ms:g}", "--lora-load-workers", str(args.lora_load_workers)]
    return {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": POOL, "namespace": NS},
            "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"},
                     "replicas": args.pods,
                     "engine": {"gpus": 1, "maxLoras": 8, "maxCpuLoras": min(4096, max(8, args.adapters + 2)),
                                "extraArgs": extra},
                     **({"rollout": {"maxUnavailable": _int_or_percent(args.max_unavailable)}}
                        if args.max_unavailable else {})}}


def _int_or_percent(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def run_size(args: argparse.Namespace, work: Path, seed: Path) -> dict:
    from vlmpool.localcluster.dev import DevCluster

    t_setup = time.monotonic()
    sources = L.adapter_variants(seed, work / f"sources-{args.adapters}", args.adapters + 1)
    operator_args = list(args.operator_arg or [])
    # Every GPU of the node is taken by the pool (a full cluster, as the issue's 20-pod pool).
    with DevCluster(work / f"cluster-{args.adapters}x{args.pods}", gpus=args.pods, resync_seconds=60,
                    operator_args=operator_args) as dev:
        dev.kubectl("create", "namespace", NS)
        dev.kubectl("apply", "-f", "-", input=json.dumps(pool_doc(args)))
        b = Bench(dev, args, sources)
        L.wait_until(lambda: len(b.pods()) == args.pods, args.timeout, f"{args.pods} pool pods Ready", 1.0)
        print(f"  cluster and {args.pods} pods up in {time.monotonic() - t_setup:.1f}s", flush=True)
        pod_ips = sorted(p["status"]["podIP"] for p in b.pods())
        phases = []
        # the phases up to --until (apply_all is every later phase's setup)
        names = PHASES[:PHASES.index(args.until) + 1] if args.until else PHASES
        for step in [getattr(b, name) for name in names]:
            print(f"  {step.__name__} ...", flush=True)
            try:
                phases.append(step())
            except TimeoutError as e:  # the figure is "not within the limit"; later phases need this one
                phases.append({"phase": step.__name__, "timed_out": True, "seconds": args.timeout, "error": str(e)})
                print(f"    {step.__name__}: TIMED OUT ({e}); the later phases are skipped", flush=True)
                break
            report_phase(phases[-1])
        proxy_rss = (phases[0].get("proxies") or {}).get("rss_mib_max")
    return {"bench": "scale", "label": args.label or git_rev(), "adapters": args.adapters, "pods": args.pods,
            "lora_load_ms": args.lora_load_ms,
            "lora_load_workers": args.lora_load_workers, "job_bound": args.job_bound,
            "operator_args": operator_args, "git": git_rev(), "machine": L.machine(),
            "proxy_rss_mib_with_all_adapters": proxy_rss, "phases": phases, "pod_ips": pod_ips,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def git_rev() -> str:
    import subprocess

    here = Path(__file__).resolve().parent
    out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def parse_steps(text: str) -> list[tuple[int, int]]:
    steps = []
    for part in text.split(","):
        n, _, m = part.strip().lower().partition("x")
        if not (n.isdigit() and m.isdigit()) or int(n) < 1 or int(m) < 1:
            raise SystemExit(f"--steps: {part!r} is not NxM (adapters x pods), e.g. 20x4")
        steps.append((int(n), int(m)))
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=500, help="N adapters (default 500)")
    ap.add_argument("--pods", type=int, default=20, help="M pods of the pool, one GPU each (default 20)")
    ap.add_argument("--steps", help="several sizes, each on a fresh cluster: NxM,NxM,... (e.g. 20x4,50x8,100x10)")
    ap.add_argument("--lora-load-ms", type=float, default=LOAD_MS,
                    help=f"engine time per adapter load (default {LOAD_MS:g})")
    ap.add_argument("--lora-load-workers", type=int, default=LOAD_WORKERS,
                    help="engine loads at once (default 1, as vLLM's EngineCore; 0: unbounded)")
    ap.add_argument("--operator-arg", action="append", help="an extra operator argument (repeatable)")
    ap.add_argument("--job-bound", default="none (every patch Job starts at once)",
                    help="the patch Job bound in force, as printed (set it with --operator-arg)")
    ap.add_argument("--load-threads", type=int, default=4, help="clients sending requests during the swap and roll")
    ap.add_argument("--endpoint-lag", type=float, default=1.0,
                    help="seconds the roll's clients follow the Ready pods late, as kube-proxy follows EndpointSlices "
                         "(default 1.0)")
    ap.add_argument("--max-unavailable", help="the pool's spec.rollout.maxUnavailable for the roll (a count or a "
                    "percent; default: the pool's default, 1)")
    ap.add_argument("--timeout", type=float, default=1800, help="per-phase limit in seconds")
    ap.add_argument("--label", default="", help="names the code measured in the results and curves (e.g. main)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON lines appended here")
    ap.add_argument("--no-results", action="store_true", help="append nothing (a smoke run)")
    ap.add_argument("--plot", type=Path, help="draw the growth curves from --results into this directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) after the run")
    ap.add_argument("--until", choices=PHASES,
                    help="stop after this phase (e.g. to re-measure an operator restart without the roll)")
    args = ap.parse_args(argv)

    def stop(signum, _frame):  # SIGTERM tears down as Ctrl-C does
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)

    from vlmpool.testing.adapters import make_adapter

    sizes = parse_steps(args.steps) if args.steps else [(args.adapters, args.pods)]
    print(f"machine: {L.machine()}")
    print(f"engine load latency: {args.lora_load_ms:g} ms per adapter, {args.lora_load_workers or 'unbounded'} at once "
          f"per engine; source of the default: {LOAD_MS_SOURCE}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vlmpool-scale-"))
    rc = 0
    try:
        seed = make_adapter("qwen2_5_vl", work / "seed", seed=7)
        for n, m in sizes:
            args.adapters, args.pods = n, m
            print(f"\n== {n} adapters x {m} pods", flush=True)
            result = run_size(args, work, seed)
            report(result)
            print(json.dumps(result), flush=True)
            if not args.no_results:
                args.results.parent.mkdir(parents=True, exist_ok=True)
                with open(args.results, "a") as f:
                    f.write(json.dumps(result) + "\n")
    except KeyboardInterrupt:
        print("interrupted: the cluster was torn down", file=sys.stderr)
        rc = 130
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.plot and rc == 0:
        from scalereport import plot

        for path in plot(args.results, args.plot):
            print(f"wrote {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
