"""Prometheus metrics of one proxy, on its own registry (so several proxies can live in one process).

Besides its own ``vlmpool_proxy_*`` series the proxy exports the vLLM series a router's endpoint picker
reads (the Gateway API Inference Extension's EPP scrapes the port its InferencePool targets: the
proxy's, not the engine's), computed from the proxy's own view and always present, even when empty (the
EPP keeps the last scraped LoRA state when a series vanishes):

- ``vllm:lora_requests_info{max_lora, waiting_lora_adapters, running_lora_adapters}`` under SERVED
  names (vLLM reports the proxy's internal ``name@version`` names, which the EPP never matches to a
  request's ``model``), value the current time, the shape vLLM 0.32 exports (v1/metrics/loggers.py);
- ``vllm:num_requests_waiting``: the proxy's queue plus the engine's waiting requests;
- ``vllm:num_requests_running`` and ``vllm:kv_cache_usage_perc``: the engine's, passed through.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 120.0,
)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)


class ProxyMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vlmpool_proxy_requests_total",
            "Requests answered, by route, model (served name; 'unknown' for names not served) and HTTP status.",
            ["route", "model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vlmpool_proxy_request_duration_seconds",
            "Time from request arrival to the end of the response (streams: until the last byte).",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "vlmpool_proxy_time_to_first_byte_seconds",
            "Time from request arrival until the engine's first response bytes were received.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "vlmpool_proxy_overhead_seconds",
            "Time a generation request spent in the proxy's handler outside the engine and the queue "
            "(request duration - engine time - queue wait): the proxy's own cost, scheduling included.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "vlmpool_proxy_queue_wait_seconds",
            "Time spent waiting for a concurrency slot.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "vlmpool_proxy_in_flight_requests",
            "Generation requests currently holding a concurrency slot (i.e. at the engine).",
            registry=r,
        )
        self.queue_depth = Gauge("vlmpool_proxy_queue_depth", "Requests waiting for a concurrency slot.", registry=r)
        self.body_bytes = Gauge("vlmpool_proxy_body_budget_used_bytes",
                                "Request-body bytes held in the in-flight body budget (taken as they arrive).",
                                registry=r)
        self.lora = LoraView()
        self.engine_gauges = EngineGauges()
        self.routing = RoutingCollector(self.lora, self.engine_gauges)
        r.register(self.routing)
        self.limiter_size = Gauge("vlmpool_proxy_limiter_size", "Current concurrency limit.", registry=r)
        self.rejected = Counter(
            "vlmpool_proxy_rejected_total",
            "Requests answered 429 by the limiter, by reason (queue_full, queue_timeout).",
            ["reason"],
            registry=r,
        )
        self.client_cuts = Counter(
            "vlmpool_proxy_client_cuts_total",
            "Requests ended because of the client: disconnect (it went away mid-answer: status 499), "
            "write_timeout (it read nothing for --send-timeout: 408), body_timeout / body_too_slow (its body "
            "did not arrive in time or fast enough: 408).",
            ["reason"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "vlmpool_proxy_adapter_loads_total",
            "Adapter load calls to the engine that succeeded (already-loaded counts as success).",
            ["adapter"],
            registry=r,
        )
        self.adapter_load_failures = Counter(
            "vlmpool_proxy_adapter_load_failures_total",
            "Adapter load calls to the engine that failed.",
            ["adapter"],
            registry=r,
        )
        self.adapter_unloads = Counter(
            "vlmpool_proxy_adapter_unloads_total",
            "Adapter versions unloaded from the engine after draining.",
            ["adapter"],
            registry=r,
        )
        self.self_heals = Counter(
            "vlmpool_proxy_self_heals_total",
            "Requests that met an engine which had forgotten a desired adapter, by outcome of the re-load.",
            ["adapter", "result"],
            registry=r,
        )
        self.adapters_loaded = Gauge("vlmpool_proxy_adapters_serving", "Served adapter names with a loaded version.",
                                     registry=r)
        self.generation = Gauge("vlmpool_proxy_state_generation", "Generation of the newest applied state (-1: none).",
                                registry=r)
        self.generation.set(-1)

        self._req_children: dict[tuple[str, str, str], Any] = {}
        self._lat_children: dict[tuple[str, str], Any] = {}
        self._ttfb_children: dict[str, Any] = {}
        self._over_children: dict[str, Any] = {}

    def observe_request(self, route: str, model: str, status: int, seconds: float) -> None:
        """Count one answered request (children cached: the hot path skips prometheus' label lookup)."""
        key = (route, model, str(status))
        counter = self._req_children.get(key)
        if counter is None:
            counter = self._req_children[key] = self.requests.labels(*key)
        counter.inc()
        lkey = (route, model)
        hist = self._lat_children.get(lkey)
        if hist is None:
            hist = self._lat_children[lkey] = self.latency.labels(*lkey)
        hist.observe(seconds)

    def observe_overhead(self, route: str, seconds: float) -> None:
        hist = self._over_children.get(route)
        if hist is None:
            hist = self._over_children[route] = self.overhead.labels(route)
        hist.observe(seconds)

    def observe_ttfb(self, route: str, seconds: float) -> None:
        hist = self._ttfb_children.get(route)
        if hist is None:
            hist = self._ttfb_children[route] = self.ttfb.labels(route)
        hist.observe(seconds)

    def bind_limiter(self, active: Callable[[], float], waiting: Callable[[], float],
                     size: Callable[[], float]) -> None:
        self.in_flight.set_function(active)
        self.queue_depth.set_function(waiting)
        self.limiter_size.set_function(size)
        self.routing.active, self.routing.waiting = active, waiting

    def bind_routing(self, served: Callable[[], Iterable[str]], max_loras: int, model_name: str) -> None:
        self.routing.served, self.routing.max_loras, self.routing.model_name = served, max_loras, model_name

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoraView:
    """The proxy's own count of its adapter requests per SERVED name: queued for a concurrency slot
    (waiting) and holding one, i.e. at the engine (running). Names leave when their count drops to 0,
    so the maps stay as small as the set of adapters with requests."""

    def __init__(self) -> None:
        self.waiting: dict[str, int] = {}
        self.running: dict[str, int] = {}

    @staticmethod
    def _add(counts: dict[str, int], served: str | None, n: int) -> None:
        if served is None:  # the base model: not a LoRA request
            return
        left = counts.get(served, 0) + n
        if left > 0:
            counts[served] = left
        else:
            counts.pop(served, None)

    def queued(self, served: str | None) -> None:
        self._add(self.waiting, served, 1)

    def dequeued(self, served: str | None) -> None:
        self._add(self.waiting, served, -1)

    def started(self, served: str | None) -> None:
        self._add(self.running, served, 1)

    def finished(self, served: str | None) -> None:
        self._add(self.running, served, -1)


ENGINE_READ_MAX_AGE_S = 0.2
ENGINE_SERIES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


class EngineGauges:
    """The engine's scheduler gauges, read from its /metrics text: waiting and running summed over its
    series (one per engine core), KV-cache usage their mean. Unknown (engine not scraped yet or not
    answering): waiting 0, running None (the proxy's in-flight count stands in), KV usage 0."""

    def __init__(self) -> None:
        self.waiting = 0.0
        self.running: float | None = None
        self.kv_usage = 0.0
        self.read_at = -math.inf  # monotonic time of the last refresh attempt
        self._lock = asyncio.Lock()

    async def refresh(self, fetch: Callable[[], Awaitable[str | None]], max_age: float = ENGINE_READ_MAX_AGE_S) -> None:
        """Re-read the engine's /metrics through ``fetch`` when the values are older than ``max_age``: a
        router scrapes every 50 ms, the engine is read at most every ``max_age``, and concurrent scrapes
        share one read."""
        if time.monotonic() - self.read_at < max_age:
            return
        async with self._lock:
            if time.monotonic() - self.read_at >= max_age:
                self.update(await fetch())

    def update(self, text: str | None) -> None:
        self.read_at = time.monotonic()
        sums: dict[str, list[float]] = {name: [] for name in ENGINE_SERIES}
        if text is not None:
            try:
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name in sums and math.isfinite(sample.value):
                            sums[sample.name].append(sample.value)
            except ValueError:  # not Prometheus text: treat as unknown
                sums = {name: [] for name in ENGINE_SERIES}
        waiting, running, kv = (sums[n] for n in ENGINE_SERIES)
        self.waiting = sum(waiting)
        self.running = sum(running) if running else None
        self.kv_usage = sum(kv) / len(kv) if kv else 0.0


class RoutingCollector:
    """Renders the vLLM-named series an endpoint picker reads, plus the per-served-name queue depth
    (``vlmpool_proxy_adapter_queue_depth``, every served adapter at least 0, for per-adapter alerts and
    autoscaling queries). ``served``/``max_loras``/``model_name`` are bound by the proxy."""

    def __init__(self, lora: LoraView, engine: EngineGauges) -> None:
        self.lora = lora
        self.engine = engine
        self.served: Callable[[], Iterable[str]] = list
        self.max_loras: int = 0
        self.model_name: str = ""
        self.active: Callable[[], float] = lambda: 0.0
        self.waiting: Callable[[], float] = lambda: 0.0

    def describe(self) -> list:
        return []  # collected at scrape time only (values come from the proxy's live state)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        lora.add_metric([str(self.max_loras), ",".join(sorted(self.lora.waiting)),
                         ",".join(sorted(self.lora.running))], time.time())
        yield lora
        labels = ["model_name", "engine"]
        values = [self.model_name, "0"]
        eng = self.engine
        for name, doc, value in (
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed (the proxy's queue "
             "plus the engine's).", float(self.waiting()) + eng.waiting),
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             eng.running if eng.running is not None else float(self.active())),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", eng.kv_usage),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            yield family
        queue = GaugeMetricFamily("vlmpool_proxy_adapter_queue_depth",
                                  "Requests waiting for a concurrency slot, by served adapter name.",
                                  labels=["model"])
        counts = self.lora.waiting
        for served in sorted(set(self.served()) | set(counts)):
            queue.add_metric([served], float(counts.get(served, 0)))
        yield queue
