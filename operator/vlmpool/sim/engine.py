"""The simulated engine: scheduler (max-num-seqs, max-loras), adapter registry and CPU LRU cache,
counters, and the Prometheus text the ``/metrics`` route serves.

Scheduling follows vLLM V1's scheduler: requests wait in FIFO order; a waiting request is admitted
when a sequence slot is free and, if it names an adapter, that adapter is already in the running
batch or fewer than ``max_loras`` distinct adapters are running. A waiting request that cannot be
admitted for the LoRA reason is skipped, not blocking the ones behind it (vLLM's
``skipped_waiting_requests``).

Adapters: the serving layer keeps every registered adapter (what ``/v1/models`` lists) until it is
unloaded; the worker keeps at most ``max_cpu_loras`` of them loaded (LRU). An adapter evicted from
that cache is read again from its registered path when a request next uses it, as vLLM does; if the
path no longer holds a valid adapter, the engine dies the way vLLM's V1 engine core does (every
generation then fails with 500 and ``/health`` answers 503 until ``POST /sim/forget``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from vlmpool.sim import adapters as adapters_mod


@dataclass
class Registered:
    name: str
    path: str
    int_id: int
    info: adapters_mod.AdapterInfo
    loaded_at: float = field(default_factory=time.time)


_SEQ_KEYS = itertools.count(1)


@dataclass
class Seq:
    """One request inside the engine."""

    request_id: str
    lora: str | None
    lora_path: str | None = None  # captured at arrival, as vLLM's LoRARequest carries its path
    key: int = field(default_factory=lambda: next(_SEQ_KEYS))  # unique even when request ids repeat
    arrived: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    admitted: asyncio.Future[None] | None = None
    activated: bool = False  # its adapter was put into a GPU slot on admission (a swap)


TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Engine:
    def __init__(self, *, model_name: str, max_num_seqs: int, max_loras: int, max_cpu_loras: int,
                 max_lora_rank: int, family: str, strict_layout: bool, enable_lora: bool,
                 lora_load_ms: float = 0.0, shape_check: str = "load", lora_load_workers: int = 0,
                 model_dims: adapters_mod.ModelDims | None = None) -> None:
        self.model_name = model_name
        self.max_num_seqs = max_num_seqs
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.family = family
        self.strict_layout = strict_layout
        self.enable_lora = enable_lora
        self.lora_load_ms = lora_load_ms
        self.shape_check = shape_check
        self.model_dims = model_dims  # the model's sizes (from its directory), for vLLM's buffer-fit refusals
        # GPU LoRA slots: vLLM keeps max_loras adapters on the GPU (LRU) beyond the running batch; a
        # request whose adapter is in none is admitted after an activation (a swap) costing this much
        self.lora_activate_ms = 0.0
        self.gpu_slots: collections.OrderedDict[str, None] = collections.OrderedDict()
        # vLLM runs add_lora in the EngineCore's input loop, one utility call after the other
        self._load_slots = asyncio.Semaphore(lora_load_workers) if lora_load_workers > 0 else None

        self.registered: dict[str, Registered] = {}
        self.cpu_cache: collections.OrderedDict[str, adapters_mod.AdapterInfo] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._lock_by_name: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

        self.waiting: collections.deque[Seq] = collections.deque()
        self.running: dict[int, Seq] = {}
        self.dead = False
        self.dead_reason = ""
        self.reset_counters()

    # ---- counters ------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Zero the counters, peaks and /metrics series (as a fresh engine would start)."""
        self.requests_total = 0
        self.peak_running = len(getattr(self, "running", {}))
        self.peak_waiting = len(getattr(self, "waiting", ()))
        self.peak_running_loras = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success: collections.Counter[str] = collections.Counter()
        self.adapter_disk_loads: collections.Counter[str] = collections.Counter()
        self.evictions = 0
        self.lora_activations = 0
        self._metrics = self._new_metrics()
        self._labels = {"model_name": self.model_name, "engine": "0"}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self._record_lora_info()

    # ---- adapters ------------------------------------------------------------------------------

    def lock_for(self, name: str) -> asyncio.Lock:
        return self._lock_by_name[name]

    def validate(self, name: str, path: str) -> adapters_mod.AdapterInfo:
        return adapters_mod.validate_adapter(name, path, max_lora_rank=self.max_lora_rank,
                                             family_name=self.family, strict_layout=self.strict_layout,
                                             shape_check=self.shape_check, model_dims=self.model_dims)

    async def read_adapter(self, name: str, path: str) -> adapters_mod.AdapterInfo:
        """The worker's disk read: validate off the event loop, pay the configured load time (one
        read at a time per load worker slot when bounded)."""
        if self._load_slots is None:
            return await self._read(name, path)
        async with self._load_slots:
            return await self._read(name, path)

    async def _read(self, name: str, path: str) -> adapters_mod.AdapterInfo:
        info = await asyncio.to_thread(self.validate, name, path)
        if self.lora_load_ms > 0:
            await asyncio.sleep(self.lora_load_ms / 1000.0)
        self.adapter_disk_loads[name] += 1
        return info

    def cache_put(self, name: str, info: adapters_mod.AdapterInfo) -> None:
        """Insert into the CPU LRU, evicting the least recently used adapters not in the batch."""
        self.cpu_cache[name] = info
        self.cpu_cache.move_to_end(name)
        busy = self.running_loras()
        while len(self.cpu_cache) > self.max_cpu_loras:
            victim = next((n for n in self.cpu_cache if n not in busy and n != name), None)
            if victim is None:
                break
            del self.cpu_cache[victim]
            self.evictions += 1

    def cache_touch(self, name: str) -> bool:
        if name in self.cpu_cache:
            self.cpu_cache.move_to_end(name)
            return True
        return False

    def register(self, name: str, path: str, info: adapters_mod.AdapterInfo) -> Registered:
        old = self.registered.get(name)
        reg = Registered(name=name, path=path, int_id=old.int_id if old else next(self._ids), info=info)
        self.registered[name] = reg
        self.cache_put(name, info)
        return reg

    def unregister(self, name: str) -> None:
        # vLLM's unload only forgets the name (serving.py unload_lora_adapter): the weights stay in the
        # worker's CPU LRU until evicted, and count against max_cpu_loras meanwhile.
        self.registered.pop(name, None)

    def forget(self) -> None:
        """Engine restart: every adapter is gone, the engine is alive again."""
        self.registered.clear()
        self.cpu_cache.clear()
        self.gpu_slots.clear()
        self.dead = False
        self.dead_reason = ""
        self._record_lora_info()

    def die(self, reason: str) -> None:
        self.dead = True
        self.dead_reason = reason

    # ---- scheduling ----------------------------------------------------------------------------

    def running_loras(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.running.values():
            if s.lora is not None:
                seen.setdefault(s.lora, None)
        return list(seen)

    def waiting_loras(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.waiting:
            if s.lora is not None:
                seen.setdefault(s.lora, None)
        return list(seen)

    async def acquire(self, seq: Seq) -> None:
        """Wait until the scheduler puts ``seq`` in the running batch."""
        seq.admitted = asyncio.get_running_loop().create_future()
        self.requests_total += 1
        self.waiting.append(seq)
        self.peak_waiting = max(self.peak_waiting, len(self.waiting))
        self._schedule()
        try:
            await seq.admitted
            if seq.activated and self.lora_activate_ms > 0:
                await asyncio.sleep(self.lora_activate_ms / 1000.0)
        except BaseException:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.running.pop(seq.key, None)
            self._schedule()
            raise

    def release(self, seq: Seq) -> None:
        self.running.pop(seq.key, None)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._schedule()

    def _schedule(self) -> None:
        loras = self.running_loras()
        skipped: list[Seq] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if (seq.lora is not None and seq.lora not in loras and len(loras) >= self.max_loras):
                skipped.append(seq)
                continue
            self.running[seq.key] = seq
            seq.admitted_at = time.monotonic()
            self._metrics["queue"].labels(**self._labels).observe(seq.admitted_at - seq.arrived)
            if seq.lora is not None and seq.lora not in loras:
                loras.append(seq.lora)
            if seq.lora is not None:
                self._activate(seq, loras)
            if seq.admitted is not None and not seq.admitted.done():
                seq.admitted.set_result(None)
        self.waiting.extendleft(reversed(skipped))
        self.peak_running = max(self.peak_running, len(self.running))
        self.peak_running_loras = max(self.peak_running_loras, len(loras))
        self._record_lora_info()

    def _activate(self, seq: Seq, running: list[str]) -> None:
        """Put the admitted request's adapter in a GPU slot (LRU over max_loras slots; a slot whose
        adapter is in the running batch is never the victim)."""
        name = seq.lora
        assert name is not None
        if name in self.gpu_slots:
            self.gpu_slots.move_to_end(name)
            return
        while len(self.gpu_slots) >= self.max_loras:
            victim = next((n for n in self.gpu_slots if n not in running), None)
            if victim is None:
                break
            del self.gpu_slots[victim]
        self.gpu_slots[name] = None
        self.lora_activations += 1
        seq.activated = True

    def _record_lora_info(self) -> None:
        if not self.enable_lora:
            return
        gauge = self._metrics["lora_info"]
        gauge.labels(max_lora=str(self.max_loras), waiting_lora_adapters=",".join(self.waiting_loras()),
                     running_lora_adapters=",".join(self.running_loras())).set_to_current_time()

    # ---- finishing -----------------------------------------------------------------------------

    def finished(self, seq: Seq, *, reason: str, prompt_tokens: int, generated: int,
                 first_token_at: float | None, model: str, status: int = 200) -> None:
        now = time.monotonic()
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generated
        self.success[reason] += 1
        m, labels = self._metrics, self._labels
        m["prompt_tokens"].labels(**labels).inc(prompt_tokens)
        m["generation_tokens"].labels(**labels).inc(generated)
        m["success"].labels(**labels, finished_reason=reason).inc()
        if first_token_at is not None:
            m["ttft"].labels(**labels).observe(first_token_at - seq.arrived)
        m["e2e"].labels(**labels).observe(now - seq.arrived)
        self.recent.append({"request_id": seq.request_id, "model": model, "lora": seq.lora,
                            "finish_reason": reason, "status": status,
                            "prompt_tokens": prompt_tokens, "completion_tokens": generated})

    # ---- views ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "peak_running": self.peak_running,
            "peak_waiting": self.peak_waiting,
            "peak_running_loras": self.peak_running_loras,
            "lora_activations": self.lora_activations,
            "running_loras": self.running_loras(),
            "waiting_loras": self.waiting_loras(),
            "requests_total": self.requests_total,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "finished": dict(self.success),
            "loaded_adapters": list(self.registered),
            "adapter_paths": {n: r.path for n, r in self.registered.items()},
            "cpu_cached_adapters": list(self.cpu_cache),
            "adapter_disk_loads": dict(self.adapter_disk_loads),
            "cpu_evictions": self.evictions,
            "engine_dead": self.dead,
            "engine_dead_reason": self.dead_reason,
            "limits": {"max_num_seqs": self.max_num_seqs, "max_loras": self.max_loras,
                       "max_cpu_loras": self.max_cpu_loras, "max_lora_rank": self.max_lora_rank},
            "recent_requests": list(self.recent),
        }

    def prometheus(self) -> bytes:
        """vLLM's /metrics text, produced by prometheus_client as vLLM's own server does."""
        from prometheus_client import generate_latest

        m = self._metrics
        labels = {"model_name": self.model_name, "engine": "0"}
        m["running"].labels(**labels).set(len(self.running))
        m["waiting"].labels(**labels).set(len(self.waiting))
        # modelled: each running sequence holds an equal share of the KV cache (max_num_seqs fill it)
        m["kv_usage"].labels(**labels).set(len(self.running) / max(1, self.max_num_seqs))
        return generate_latest(m["registry"])

    def _new_metrics(self) -> dict[str, Any]:
        from prometheus_client import CollectorRegistry, Counter, Gauge
        from prometheus_client import Histogram as PromHistogram

        reg = CollectorRegistry()
        names = ["model_name", "engine"]
        metrics: dict[str, Any] = {
            "registry": reg,
            "running": Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                             names, registry=reg),
            "waiting": Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                             names, registry=reg),
            "kv_usage": Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", names,
                              registry=reg),
            "lora_info": Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                               ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=reg)
            if self.enable_lora else None,
            "prompt_tokens": Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", names,
                                     registry=reg),
            "generation_tokens": Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         names, registry=reg),
            "success": Counter("vllm:request_success", "Count of successfully processed requests.",
                               names + ["finished_reason"], registry=reg),
            "ttft": PromHistogram("vllm:time_to_first_token_seconds",
                                  "Histogram of time to first token in seconds.", names, buckets=TTFT_BUCKETS,
                                  registry=reg),
            "e2e": PromHistogram("vllm:e2e_request_latency_seconds",
                                 "Histogram of e2e request latency in seconds.", names,
                                 buckets=LATENCY_BUCKETS, registry=reg),
            "queue": PromHistogram("vllm:request_queue_time_seconds",
                                   "Histogram of time spent in WAITING phase for request.", names,
                                   buckets=LATENCY_BUCKETS, registry=reg),
        }
        # vLLM binds its label values at start-up, so every series is exported (at 0) from the first scrape.
        labels = {"model_name": self.model_name, "engine": "0"}
        for key in ("running", "waiting", "kv_usage", "prompt_tokens", "generation_tokens", "ttft", "e2e", "queue"):
            metrics[key].labels(**labels)
        for reason in ("stop", "length", "abort"):
            metrics["success"].labels(**labels, finished_reason=reason)
        return metrics
