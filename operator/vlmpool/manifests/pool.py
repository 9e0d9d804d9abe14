"""Manifests of a VLMPool's children: adapter PVC, admin-token Secret, Deployment, Service.

Pure functions: the pool (api/objects.Pool: the object as read from the API with its parsed spec) in,
a dict ready for server-side apply out.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from vlmpool import families
from vlmpool.api.objects import Pool
from vlmpool.api.pool import DEFAULT_ADAPTER_VOLUME_SIZE, VLMPoolSpec
from vlmpool.manifests.common import (
    A_TOKEN_CHECKSUM,
    ADAPTER_ROOT,
    ADMIN_TOKEN_DIR,
    ADMIN_TOKEN_KEY,
    API_KEY_DIR,
    BASE_WEIGHTS_MOUNT,
    adapter_claim_name,
    admin_secret_name,
    deployment_name,
    owner_reference,
    pool_labels,
    server_selector,
    service_name,
)
from vlmpool.proxy.settings import flag_args

PROXY_CONTAINER = "proxy"
ENGINE_CONTAINER = "engine"
ENGINE_HEALTH_PATH = "/health"
# The engine listens on the pod's loopback only: its API (inference on any adapter, runtime LoRA
# load/unload) has no authentication, and only the proxy, in the same pod, talks to it. Everything
# else (clients, the EPP's and Prometheus' scrapes: the proxy's /metrics carries vLLM's series) goes
# through the proxy. Its probes therefore run inside the engine container (exec), not from the kubelet.
ENGINE_HOST = "127.0.0.1"

# Pod Security Standards `restricted` by default (docs/security.md). The images run as uid/gid 65532;
# fsGroup lets the engines read what patch Jobs (same group) wrote on the adapter volume.
RUN_AS = 65532
POD_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                                "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY: dict[str, Any] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                      "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
# The engine's writable directories on a read-only root: HOME (vLLM, Hugging Face, Triton and torch
# caches live under ~/.cache, ~/.triton, ~/.config) and /tmp.
ENGINE_HOME = "/home/vlmpool"


def container_security(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The restricted container securityContext with `overrides` merged over it key by key (a key
    given replaces the default's value)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in CONTAINER_SECURITY.items()}
    for k, v in (overrides or {}).items():
        out[k] = v
    return out


def _meta(pool: Pool, name: str, component: str = "server") -> dict[str, Any]:
    return {
        "name": name,
        "namespace": pool.namespace,
        "labels": pool_labels(pool.name, component),
        "ownerReferences": [owner_reference(pool.obj)],
    }


def claim_name(pool: Pool) -> str:
    """The claim the pool's adapters live on: an existing one, or `<pool>-adapters`."""
    return pool.spec.adapter_volume.claim_name or adapter_claim_name(pool.name)


def adapter_pvc(pool: Pool) -> dict[str, Any] | None:
    """The adapter volume's claim, or None when the pool uses an existing claim."""
    vol = pool.spec.adapter_volume
    if vol.claim_name:
        return None
    pvc_spec: dict[str, Any] = {
        "accessModes": [vol.access_mode],
        "resources": {"requests": {"storage": vol.size or DEFAULT_ADAPTER_VOLUME_SIZE}},
    }
    if vol.storage_class_name:
        pvc_spec["storageClassName"] = vol.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(pool, adapter_claim_name(pool.name), "adapters"),
        "spec": pvc_spec,
    }


def admin_secret(pool: Pool, token: str) -> dict[str, Any]:
    """The bearer token the operator uses on the pods' admin port (derived from the pool's identity
    by the operator, so re-applying never rotates it)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(pool, admin_secret_name(pool.name), "admin-token"),
        "type": "Opaque",
        "data": {ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def engine_args(spec: VLMPoolSpec) -> list[str]:
    eng = spec.engine
    model = spec.model.name
    if spec.model.weights:
        model = BASE_WEIGHTS_MOUNT + "/" + spec.model.weights.path.strip("/")
        model = model.rstrip("/")
    args = [
        "--model", model,
        "--served-model-name", spec.served_name(),
        "--host", ENGINE_HOST,
        "--port", str(eng.port),
        "--enable-lora",
        "--max-loras", str(eng.max_loras),
        "--max-lora-rank", str(eng.max_lora_rank),
    ]
    if eng.max_cpu_loras is not None:
        args += ["--max-cpu-loras", str(eng.max_cpu_loras)]
    if eng.tower_connector_lora:
        args.append("--enable-tower-connector-lora")
    if eng.gpus > 1:
        args += ["--tensor-parallel-size", str(eng.gpus)]
    if eng.max_model_len is not None:
        args += ["--max-model-len", str(eng.max_model_len)]
    if eng.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(eng.gpu_memory_utilization)]
    return args + model_args(spec) + list(eng.extra_args)


def model_args(spec: VLMPoolSpec) -> list[str]:
    """The family's engine flags, its image budget and reasoning parser (spec.model, defaults from the
    family table). The budget is the Qwen-VL processors' `size` (transformers 5: shortest_edge = min
    pixels, longest_edge = max pixels; vLLM 0.32 also aliases min_pixels/max_pixels to it)."""
    m = spec.model
    args = list(families.family(m.family).vllm_flags)
    budget = m.pixel_budget()
    if budget is not None:
        size = {"shortest_edge": budget[0], "longest_edge": budget[1]}
        args += ["--mm-processor-kwargs", json.dumps({"size": size}, separators=(",", ":"))]
    if m.images is not None and m.images.max_images_per_prompt is not None:
        args += ["--limit-mm-per-prompt", json.dumps({"image": m.images.max_images_per_prompt}, separators=(",", ":"))]
    parser = m.reasoning_parser()
    if parser is not None:
        args += ["--reasoning-parser", parser]
    return args


PROXY_SHUTDOWN_S = 30  # the proxy finishes in-flight requests this long at most (ProxyConfig.shutdown_timeout)


def proxy_args(spec: VLMPoolSpec, adapter_root: str = ADAPTER_ROOT) -> list[str]:
    """The proxy's command line. Concurrency is not in it: the operator pushes it at run time, so
    changing it never rolls the (GPU) pods; the proxy is not ready before that first push anyway."""
    px = spec.proxy
    return [
        "proxy",
        *flag_args("engine_url", f"http://127.0.0.1:{spec.engine.port}"),
        *flag_args("port", px.port),
        *flag_args("admin_port", px.admin_port),
        *flag_args("base_model", spec.served_name()),
        *flag_args("queue_limit", px.queue_limit),
        *flag_args("max_loras", spec.engine.max_loras),  # exported to routers as vllm:lora_requests_info max_lora
        *flag_args("queue_timeout_seconds", px.queue_timeout_seconds),
        *flag_args("request_timeout_seconds", px.request_timeout_seconds),
        *flag_args("drain_seconds", px.drain_seconds),
        *flag_args("adapter_root", adapter_root),
        *flag_args("thinking", "switch" if families.family(spec.model.family).thinking_switch else "none"),
    ] + (flag_args("api_key_dir", API_KEY_DIR) if px.api_key_secret else []) + (
        [] if px.crop_describe else flag_args("crop_describe", False))


def engine_probe_command(port: int, timeout: int) -> list[str]:
    """The engine's health check from inside its container (python3 is in vLLM's image and in the
    simulator's): exit 0 when GET /health on the loopback port answers 2xx."""
    url = f"http://{ENGINE_HOST}:{port}{ENGINE_HEALTH_PATH}"
    return ["python3", "-c", f"import urllib.request as u; u.urlopen({url!r}, timeout={max(1, timeout - 1)})"]


def _resources(res: Any, gpus: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if res is not None:
        if res.requests:
            out["requests"] = dict(res.requests)
        if res.limits:
            out["limits"] = dict(res.limits)
    if gpus:
        out.setdefault("limits", {})["nvidia.com/gpu"] = str(gpus)
        out.setdefault("requests", {})["nvidia.com/gpu"] = str(gpus)
    return out


def pod_template(pool: Pool, token_hash: str = "", adapter_root: str = ADAPTER_ROOT) -> dict[str, Any]:
    spec, name = pool.spec, pool.name
    px, eng = spec.proxy, spec.engine
    proxy_env = [
        {"name": "VLMPOOL_ADMIN_TOKEN_FILE", "value": f"{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}"},
    ]
    proxy = {
        "name": PROXY_CONTAINER,
        "image": px.image,
        "imagePullPolicy": px.image_pull_policy,
        "command": ["vlmpool"],
        "args": proxy_args(spec, adapter_root),
        "env": proxy_env,
        "ports": [
            {"name": "http", "containerPort": px.port, "protocol": "TCP"},
            {"name": "admin", "containerPort": px.admin_port, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                           "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 6},
        "resources": _resources(px.resources),
        "volumeMounts": [{"name": "admin-token", "mountPath": ADMIN_TOKEN_DIR, "readOnly": True},
                         # read-only, so the proxy can check pushed paths (realpath) inside the root
                         {"name": "adapters", "mountPath": adapter_root, "readOnly": True}]
        + ([{"name": "api-keys", "mountPath": API_KEY_DIR, "readOnly": True}] if px.api_key_secret else []),
        "securityContext": container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    engine_mounts = [
        {"name": "adapters", "mountPath": adapter_root, "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "engine-home", "mountPath": ENGINE_HOME},
        {"name": "engine-tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "adapters", "persistentVolumeClaim": {"claimName": claim_name(pool), "readOnly": True}},
        {"name": "admin-token", "secret": {"secretName": admin_secret_name(name), "defaultMode": 0o440}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        {"name": "engine-home", "emptyDir": {}},
        {"name": "engine-tmp", "emptyDir": {}},
    ]
    if px.api_key_secret:
        volumes.append({"name": "api-keys", "secret": {"secretName": px.api_key_secret, "defaultMode": 0o440}})
    if spec.model.weights:
        engine_mounts.append({"name": "base-weights", "mountPath": BASE_WEIGHTS_MOUNT, "readOnly": True})
        volumes.append({"name": "base-weights",
                        "persistentVolumeClaim": {"claimName": spec.model.weights.claim_name, "readOnly": True}})
    probe_period = 10
    engine = {
        "name": ENGINE_CONTAINER,
        "image": eng.image,
        "imagePullPolicy": eng.image_pull_policy,
        "args": engine_args(spec),
        "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
                {"name": "HOME", "value": ENGINE_HOME}]
        + [{"name": e.name, "value": e.value} for e in eng.env],
        # no container port: the engine is not reachable from outside the pod (ENGINE_HOST)
        "startupProbe": {"exec": {"command": engine_probe_command(eng.port, 5)}, "periodSeconds": probe_period,
                         "timeoutSeconds": 5,
                         "failureThreshold": max(1, -(-eng.startup_timeout_seconds // probe_period))},
        "readinessProbe": {"exec": {"command": engine_probe_command(eng.port, 5)}, "periodSeconds": 5,
                           "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"exec": {"command": engine_probe_command(eng.port, 10)}, "periodSeconds": 15,
                          "timeoutSeconds": 10, "failureThreshold": 4},
        # the engine outlives the proxy's drain (proxy/drain.py): the kubelet sends it SIGTERM only once
        # the proxy has stopped taking requests and finished those in flight
        "lifecycle": {"preStop": {"httpGet": {"path": "/drainz", "port": px.port}}},
        "resources": _resources(eng.resources, eng.gpus),
        "volumeMounts": engine_mounts,
        "securityContext": container_security(eng.security_context.to_wire() if eng.security_context else None),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    sched = spec.scheduling
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # the drain, then the proxy's in-flight requests (PROXY_SHUTDOWN_S), then the engine's own stop
        "terminationGracePeriodSeconds": max(60, px.drain_seconds + PROXY_SHUTDOWN_S + 15),
        # Restricted profile; its fsGroup (the images' gid 65532) is also what lets the proxy read the
        # admin-token Secret (mode 0440, root-owned on a real kubelet: "Permission denied" without it).
        "securityContext": {k: (dict(v) if isinstance(v, dict) else v) for k, v in POD_SECURITY.items()},
        "containers": [proxy, engine],
        "volumes": volumes,
    }
    if sched.node_selector:
        pod_spec["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in sched.tolerations]
    if sched.affinity:
        pod_spec["affinity"] = sched.affinity
    if sched.priority_class_name:
        pod_spec["priorityClassName"] = sched.priority_class_name
    annotations = {A_TOKEN_CHECKSUM: token_hash} if token_hash else {}
    meta: dict[str, Any] = {"labels": pool_labels(name)}
    if annotations:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": pod_spec}


def deployment(pool: Pool, token_hash: str = "", adapter_root: str = ADAPTER_ROOT) -> dict[str, Any]:
    spec, name = pool.spec, pool.name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(pool, deployment_name(name)),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": server_selector(name)},
            # Never fewer ready pods than asked during a rollout; one extra pod at a time.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": spec.rollout.max_unavailable,
                                                                    "maxSurge": spec.rollout.max_surge}},
            "revisionHistoryLimit": 3,
            "template": pod_template(pool, token_hash, adapter_root),
        },
    }


def service(pool: Pool) -> dict[str, Any]:
    spec, name = pool.spec, pool.name
    meta = _meta(pool, service_name(name))
    if spec.service.annotations:
        meta["annotations"] = dict(spec.service.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": spec.service.type,
            "selector": server_selector(name),
            "ports": [{"name": "http", "port": spec.proxy.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def network_policy(pool: Pool, rules: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The pool's NetworkPolicy (operator --network-policy, the chart's `networkPolicy`): its pods admit
    `adminFrom` on the admin port, `httpFrom` (empty: anyone) on the http port, and `extraIngress`;
    every other port is closed (the engine listens on the pod's loopback anyway)."""
    px = pool.spec.proxy
    http: dict[str, Any] = {"ports": [{"port": px.port, "protocol": "TCP"}]}
    if rules.get("httpFrom"):
        http["from"] = list(rules["httpFrom"])
    admin: dict[str, Any] = {"ports": [{"port": px.admin_port, "protocol": "TCP"}],
                             "from": list(rules.get("adminFrom") or [])}
    ingress = [admin, http] if admin["from"] else [http]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(pool, service_name(pool.name)),
        "spec": {"podSelector": {"matchLabels": server_selector(pool.name)}, "policyTypes": ["Ingress"],
                 "ingress": ingress + list(rules.get("extraIngress") or [])},
    }


def endpoint(pool: Pool) -> str:
    return f"http://{service_name(pool.name)}.{pool.namespace}.svc:{pool.spec.proxy.port}/v1"
