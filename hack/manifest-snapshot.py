"""Everything vlmpool renders, over the examples and a set of test specs, as one canonical JSON document:
the reference a restructuring must leave byte-identical (issue #24: "manifests byte-identical over the
examples and the test specs").

    .venv/bin/python hack/manifest-snapshot.py > /tmp/before.json     # on the commit before
    .venv/bin/python hack/manifest-snapshot.py > /tmp/after.json      # after
    cmp /tmp/before.json /tmp/after.json

It renders, for every (pool, adapter) pair of examples/ and of the specs below: the Deployment, Service,
admin Secret, adapter claim, NetworkPolicy, routing objects, engine/proxy/model arguments, the patch,
cleanup and prune Jobs, the adapter's patch arguments and spec digest, the desired state pushed to
proxies; plus the generated CRDs. Only public builder functions are called; a builder that moved keeps
its old name importable or this script is updated in the same commit (say so in the message).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from vlmpool.names import API_VERSION
from vlmpool.pins import VLLM_RELEASE

ROOT = Path(__file__).resolve().parents[1]
UID = "00000000-0000-0000-0000-000000000001"

# Test specs beyond the examples: the shapes the suites exercise (weights claim, DoRA policies, sources of
# every scheme, routing, scheduling, security overrides, perPod-free shared volume variants).
EXTRA_POOLS: list[dict[str, Any]] = [
    {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "servedName": "tiny-vl", "family": "qwen2_5_vl",
               "weights": {"claimName": "weights", "path": "/model"},
               "images": {"minPixels": 3136, "maxPixels": 50176}},
     "replicas": 2,
     "engine": {"image": f"ghcr.io/vlmpool/vllm-cpu:{VLLM_RELEASE}", "imagePullPolicy": "IfNotPresent", "gpus": 1,
                "maxLoras": 2, "maxLoraRank": 8, "maxModelLen": 512, "startupTimeoutSeconds": 600,
                "extraArgs": ["--max-num-seqs", "4", "--dtype", "bfloat16"]},
     "proxy": {"concurrency": 4}},
    {"model": {"name": "Qwen/Qwen2.5-VL-7B-Instruct", "family": "qwen2_5_vl"},
     "replicas": 3,
     "engine": {"gpus": 2, "maxLoras": 8, "maxCpuLoras": 32, "maxLoraRank": 64},
     "proxy": {"concurrency": 32},
     "routing": {"failureMode": "FailOpen", "loraAffinityWeight": 8},
     "scheduling": {"nodeSelector": {"gpu": "h100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
]
EXTRA_ADAPTERS: list[dict[str, Any]] = [
    {"source": {"uri": "pvc://sources/v1"}, "servedName": "acme/tiny-ft"},
    {"source": {"uri": "https://example.com/a.tar.gz"}, "dora": {"policy": "svd"}},
    {"source": {"uri": "hf://acme/ft@main"}, "dora": {"policy": "strip"}},
    {"source": {"uri": "s3://bucket/prefix/ft"}},
    {"source": {"uri": "file:///srv/adapters/ft"}},
]


def load_examples() -> tuple[list[dict], list[dict]]:
    pools, adapters = [], []
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            doc.setdefault("metadata", {}).setdefault("namespace", "default")
            doc["metadata"]["uid"] = UID
            doc["metadata"]["_file"] = str(path.relative_to(ROOT))
            if doc.get("kind") == "VLMPool":
                pools.append(doc)
            elif doc.get("kind") == "VLMAdapter":
                adapters.append(doc)
    for i, spec in enumerate(EXTRA_POOLS):
        pools.append({"apiVersion": API_VERSION, "kind": "VLMPool",
                      "metadata": {"name": f"extra-pool-{i}", "namespace": "default", "uid": UID}, "spec": spec})
    for i, spec in enumerate(EXTRA_ADAPTERS):
        adapters.append({"apiVersion": API_VERSION, "kind": "VLMAdapter",
                         "metadata": {"name": f"extra-adapter-{i}", "namespace": "default", "uid": UID},
                         "spec": {"poolRef": {"name": "any"}, **spec}})
    return pools, adapters


def attempt(fn, *a, **kw) -> Any:
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 (a builder's refusal, whatever its type, is part of its behaviour)
        return {"error": type(e).__name__, "message": str(e)}


def main() -> int:
    from vlmpool.api.crdgen import render as render_crds
    from vlmpool.api.objects import Adapter, Pool
    from vlmpool.manifests import adapter as ma
    from vlmpool.manifests import pool as mp
    from vlmpool.manifests import routing as mr

    pools_raw, adapters_raw = load_examples()
    out: dict[str, Any] = {"crds": render_crds(), "pools": {}, "adapters": {}}
    pools = []
    for raw in pools_raw:
        key = raw["metadata"].pop("_file", "") + "#" + raw["metadata"]["name"]
        pool = Pool.parse(raw)
        pools.append(pool)
        out["pools"][key] = {
            "deployment": attempt(mp.deployment, pool, token_hash="abc"),
            "service": attempt(mp.service, pool),
            "admin_secret": attempt(mp.admin_secret, pool, "token"),
            "adapter_pvc": attempt(mp.adapter_pvc, pool),
            "network_policy": attempt(mp.network_policy, pool, {"ingress": [], "egress": []}),
            "routing": attempt(mr.routing_objects, pool),
            "engine_args": attempt(mp.engine_args, pool.spec),
            "model_args": attempt(mp.model_args, pool.spec),
            "proxy_args": attempt(mp.proxy_args, pool.spec),
            "endpoint": attempt(mp.endpoint, pool),
        }
    adapters = []
    for raw in adapters_raw:
        key = raw["metadata"].pop("_file", "") + "#" + raw["metadata"]["name"]
        adapter = Adapter.parse(raw)
        adapters.append(adapter)
        per_pool = {}
        for pool in pools:
            pk = pool.name
            per_pool[pk] = {
                "patch_job": attempt(ma.patch_job, adapter, pool, source_allow=["10.0.0.0/8"]),
                "cleanup_job": attempt(ma.cleanup_job, adapter, pool),
                "prune_job": attempt(ma.prune_job, adapter, pool, "v1-abc"),
                "patch_args": attempt(ma.patch_args, adapter, pool),
                "spec_digest": attempt(ma.spec_digest, adapter, pool),
                "file_refusal": attempt(ma.file_source_refusal, adapter.spec.source.uri, ["/srv/adapters"]),
            }
        out["adapters"][key] = per_pool
    ready = []
    for i, a in enumerate(adapters):
        obj = json.loads(json.dumps(a.obj))
        obj["status"] = {"phase": "Ready", "version": f"v{i}-0123456789ab", "path": f"/var/lib/vlmpool/adapters/x{i}"}
        ready.append(Adapter.parse(obj))
    out["desired_state"] = attempt(ma.desired_state, 16, ready)
    json.dump(out, sys.stdout, indent=1, sort_keys=True, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
