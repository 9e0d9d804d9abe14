"""Manifests of a VLMPool's LoRA-affinity routing (`spec.routing`, docs/routing.md): the Gateway API
Inference Extension's `InferencePool` over the pool's pods and, in GIE's documented standalone shape,
its endpoint picker (EPP): ServiceAccount, Role + RoleBinding, ConfigMap (EndpointPickerConfig),
Deployment and Service, all named `<pool>-epp`.

The InferencePool targets the PROXY port: the EPP scrapes `targetPorts[0]`'s /metrics, where the
proxy exports vLLM's series under served names (proxy/metrics.py), and requests must go through the
proxy anyway. The EPP runs in pool mode (`--pool-name`): v1.5.0's selector-only mode is broken. The
v1.5.0 default profile lacks the lora-affinity-scorer, so the config lists it explicitly.

Pure functions: the pool (api/objects.Pool: the object with its parsed spec) in, dicts for server-side
apply out.
"""

from __future__ import annotations

from typing import Any

import yaml

from vlmpool.api.objects import Pool
from vlmpool.api.pool import RoutingSpec
from vlmpool.manifests.common import L_COMPONENT, L_POOL, owner_reference, pool_labels, server_selector
from vlmpool.pins import GIE_VERSION

INFERENCE_API = "inference.networking.k8s.io/v1"
DEFAULT_EPP_IMAGE = f"registry.k8s.io/gateway-api-inference-extension/epp:v{GIE_VERSION}"
EPP_GRPC_PORT = 9002  # ext_proc
EPP_HEALTH_PORT = 9003  # gRPC health
EPP_METRICS_PORT = 9090
EPP_CONFIG_KEY = "config.yaml"
EPP_CONFIG_DIR = "/config"
COMPONENT_EPP = "endpoint-picker"


def epp_name(pool: str) -> str:
    return f"{pool}-epp"


def epp_config(routing: RoutingSpec) -> dict[str, Any]:
    """The EndpointPickerConfig: GIE's default scorers (queue, KV cache) plus the LoRA-affinity
    scorer at `loraAffinityWeight`; the openai-parser reads the request's `model`."""
    plugins: list[dict[str, Any]] = [
        {"type": "openai-parser"},
        {"type": "queue-scorer"},
        {"type": "kv-cache-utilization-scorer"},
        {"type": "max-score-picker"},
    ]
    weights = [{"pluginRef": "queue-scorer", "weight": 1},
               {"pluginRef": "kv-cache-utilization-scorer", "weight": 1}]
    if routing.lora_affinity_weight > 0:
        plugins.append({"type": "lora-affinity-scorer"})
        weights.append({"pluginRef": "lora-affinity-scorer", "weight": routing.lora_affinity_weight})
    return {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "featureGates": ["enableLegacyMetrics"],
        "plugins": plugins,
        "schedulingProfiles": [{"name": "default",
                                "plugins": [*weights, {"pluginRef": "max-score-picker"}]}],
    }


def _meta(pool: Pool, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": pool.namespace,
            "labels": pool_labels(pool.name, component),
            "ownerReferences": [owner_reference(pool.obj)]}


def inference_pool(pool: Pool) -> dict[str, Any]:
    spec = pool.spec
    routing = spec.routing or RoutingSpec()
    name = pool.name
    return {
        "apiVersion": INFERENCE_API,
        "kind": "InferencePool",
        "metadata": _meta(pool, name, "inference-pool"),
        "spec": {
            "selector": {"matchLabels": server_selector(name)},
            "targetPorts": [{"number": spec.proxy.port}],
            "endpointPickerRef": {"name": epp_name(name), "port": {"number": EPP_GRPC_PORT},
                                  "failureMode": routing.failure_mode},
        },
    }


def epp_objects(pool: Pool) -> list[dict[str, Any]]:
    """The EPP in GIE's standalone shape (config/charts/epplib at v1.5.0), minus metrics auth."""
    routing = pool.spec.routing or RoutingSpec()
    name, ns = pool.name, pool.namespace
    epp = epp_name(name)
    labels = pool_labels(name, COMPONENT_EPP)
    selector = {L_POOL: labels[L_POOL], L_COMPONENT: labels[L_COMPONENT]}
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(pool, epp, COMPONENT_EPP)}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(pool, epp, COMPONENT_EPP),
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                  {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
                   "verbs": ["get", "list", "watch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(pool, epp, COMPONENT_EPP),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": epp},
        "subjects": [{"kind": "ServiceAccount", "name": epp, "namespace": ns}],
    }
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(pool, epp, COMPONENT_EPP),
              "data": {EPP_CONFIG_KEY: yaml.safe_dump(epp_config(routing), sort_keys=False)}}
    env = [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    container = {
        "name": "epp",
        "image": routing.image or DEFAULT_EPP_IMAGE,
        "args": ["--pool-name", name, "--pool-namespace", ns, "--config-file", f"{EPP_CONFIG_DIR}/{EPP_CONFIG_KEY}",
                 "--grpc-port", str(EPP_GRPC_PORT), "--grpc-health-port", str(EPP_HEALTH_PORT),
                 "--metrics-port", str(EPP_METRICS_PORT), "--secure-serving=false"],
        "env": env,
        "ports": [{"name": "grpc", "containerPort": EPP_GRPC_PORT},
                  {"name": "grpc-health", "containerPort": EPP_HEALTH_PORT},
                  {"name": "metrics", "containerPort": EPP_METRICS_PORT}],
        "readinessProbe": {"grpc": {"port": EPP_HEALTH_PORT, "service": "inference-extension"},
                           "periodSeconds": 2},
        "livenessProbe": {"grpc": {"port": EPP_HEALTH_PORT, "service": "inference-extension"},
                          "initialDelaySeconds": 5, "periodSeconds": 10},
        "volumeMounts": [{"name": "config", "mountPath": EPP_CONFIG_DIR, "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(pool, epp, COMPONENT_EPP),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"serviceAccountName": epp, "containers": [container],
                         "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                         "volumes": [{"name": "config", "configMap": {"name": epp}}]},
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(pool, epp, COMPONENT_EPP),
        "spec": {"selector": selector, "ports": [
            {"name": "grpc-ext-proc", "port": EPP_GRPC_PORT, "targetPort": EPP_GRPC_PORT, "protocol": "TCP",
             "appProtocol": "http2"},
            {"name": "http-metrics", "port": EPP_METRICS_PORT, "targetPort": EPP_METRICS_PORT, "protocol": "TCP"}]},
    }
    return [sa, role, binding, config, deployment, service]


def routing_objects(pool: Pool) -> list[dict[str, Any]]:
    """Everything `spec.routing` asks for, in apply order (none when it is unset)."""
    routing = pool.spec.routing
    if routing is None:
        return []
    objs = [inference_pool(pool)]
    if routing.endpoint_picker:
        objs += epp_objects(pool)
    return objs
