"""Prometheus metrics of one proxy, on its own registry (so several proxies can live in one process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
        self.limiter_size = Gauge("vlmpool_proxy_limiter_size", "Current concurrency limit.", registry=r)
        self.rejected = Counter(
            "vlmpool_proxy_rejected_total",
            "Requests answered 429 by the limiter, by reason (queue_full, queue_timeout).",
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
