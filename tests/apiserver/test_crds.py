"""The CRDs on the real kube-apiserver: they install, the examples apply with their defaults filled,
bad manifests are refused at apply with a message naming the field, and `kubectl get` prints the
printer columns."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from vlmpool.names import (
    ADAPTER_PLURAL,
    ADAPTER_SHORT,
    API_VERSION,
    GROUP,
    POOL_PLURAL,
    POOL_SHORT,
    VERSION,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

POOL = {
    "apiVersion": API_VERSION,
    "kind": "VLMPool",
    "metadata": {"name": "pool-a"},
    "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"}},
}
ADAPTER = {
    "apiVersion": API_VERSION,
    "kind": "VLMAdapter",
    "metadata": {"name": "adapter-a"},
    "spec": {"poolRef": {"name": "pool-a"}, "source": {"uri": "file:///adapters/a"}},
}


def _apply(kubectl, namespace, obj, check=False):
    return kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=check)


def _get(kubectl, namespace, kind, name):
    return json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


def test_crds_are_established_with_names_and_categories(kubectl, crds):
    for crd, short in ((f"{POOL_PLURAL}.{GROUP}", POOL_SHORT), (f"{ADAPTER_PLURAL}.{GROUP}", ADAPTER_SHORT)):
        obj = json.loads(kubectl("get", "crd", crd, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
        names = obj["spec"]["names"]
        assert names["shortNames"] == [short]
        assert names["categories"] == ["vlm"]
        version = obj["spec"]["versions"][0]
        scale = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                 "labelSelectorPath": ".status.selector"}  # HPA/KEDA/kubectl scale target the pool
        want = {"status": {}, "scale": scale} if short == POOL_SHORT else {"status": {}}
        assert version["name"] == VERSION and version["subresources"] == want
    res = kubectl("api-resources", f"--api-group={GROUP}", "--categories=vlm", "-o", "name", check=False)
    if res.returncode == 0:  # --categories exists on recent kubectl only
        assert set(res.stdout.split()) == {f"{POOL_PLURAL}.{GROUP}", f"{ADAPTER_PLURAL}.{GROUP}"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_applies(kubectl, crds, namespace, example):
    res = kubectl("apply", "-n", namespace, "-f", str(example), check=False)
    assert res.returncode == 0, res.stderr
    for doc in yaml.safe_load_all(example.read_text()):
        stored = _get(kubectl, namespace, doc["kind"], doc["metadata"]["name"])
        assert stored["spec"]["source" if doc["kind"] == "VLMAdapter" else "model"]


def test_defaults_are_filled_by_the_apiserver(kubectl, crds, namespace):
    _apply(kubectl, namespace, POOL, check=True)
    _apply(kubectl, namespace, ADAPTER, check=True)
    pool = _get(kubectl, namespace, "vlmpool", "pool-a")["spec"]
    assert pool["replicas"] == 1
    assert pool["proxy"]["concurrency"] == 16
    assert pool["proxy"]["port"] == 8080 and pool["proxy"]["adminPort"] == 8081
    assert pool["engine"]["maxLoraRank"] == 64 and pool["engine"]["maxLoras"] == 4
    assert pool["adapterVolume"] == {"accessMode": "ReadWriteMany"}
    adapter = _get(kubectl, namespace, "vlmadapter", "adapter-a")["spec"]
    assert adapter["dora"] == {"policy": "reject"}
    assert adapter["baseModelCheck"] == "strict"


def _with(obj, path, value):
    """A copy of obj with the dotted `path` set to `value` (None deletes the key)."""
    obj = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    cur = obj
    for p in parents:
        cur = cur.setdefault(p, {})
    if value is None:
        cur.pop(leaf, None)
    else:
        cur[leaf] = value
    return obj


INVALID = [
    # (id, manifest, substrings the apiserver's refusal must contain)
    ("adapter-missing-pool", _with(ADAPTER, "spec.poolRef", None), ["spec.poolRef", "Required value"]),
    ("adapter-bad-dora-enum", _with(ADAPTER, "spec.dora", {"policy": "merge"}),
     ["spec.dora.policy", "Unsupported value", '"merge"']),
    ("adapter-svd-without-rank", _with(ADAPTER, "spec.dora", {"policy": "svd"}),
     ["spec.dora.rank", "dora.rank is required when dora.policy is svd"]),
    ("adapter-rank-without-svd", _with(ADAPTER, "spec.dora", {"policy": "strip", "rank": 8}),
     ["spec.dora.rank", "only allowed when dora.policy is svd"]),
    ("adapter-bad-served-name", _with(ADAPTER, "spec.servedName", "my adapter@v2"),
     ["spec.servedName", "should match"]),
    ("adapter-bad-source-scheme", _with(ADAPTER, "spec.source.uri", "ftp://host/adapter.tar"),
     ["spec.source.uri", "should match"]),
    ("adapter-bad-hf-uri", _with(ADAPTER, "spec.source.uri", "hf://just-a-repo"),
     ["spec.source.uri", "hf://<org>/<repo>[@<revision>]"]),
    ("adapter-pvc-without-path", _with(ADAPTER, "spec.source.uri", "pvc://claim-only"),
     ["spec.source.uri", "pvc://<claim>/<path>"]),
    ("adapter-bad-sha256", _with(ADAPTER, "spec.source.sha256", "XYZ"), ["spec.source.sha256", "should match"]),
    ("adapter-bad-base-check", _with(ADAPTER, "spec.baseModelCheck", "lenient"),
     ["spec.baseModelCheck", "Unsupported value"]),
    ("adapter-name-too-long", _with(ADAPTER, "metadata.name", "a" * 49),
     ["metadata.name", "at most 48 characters"]),
    ("pool-negative-replicas", _with(POOL, "spec.replicas", -1),
     ["spec.replicas", "should be greater than or equal to 0"]),
    ("pool-claim-and-size", _with(POOL, "spec.adapterVolume", {"claimName": "shared", "size": "10Gi"}),
     ["spec.adapterVolume.size", "excludes adapterVolume.size"]),
    ("pool-missing-model-name", _with(POOL, "spec.model.name", None), ["spec.model.name", "Required value"]),
    ("pool-bad-family", _with(POOL, "spec.model.family", "llava"), ["spec.model.family", "Unsupported value"]),
    ("pool-bad-served-name", _with(POOL, "spec.model.servedName", "-leading-dash"),
     ["spec.model.servedName", "should match"]),
    ("pool-zero-concurrency", _with(POOL, "spec.proxy", {"concurrency": 0}),
     ["spec.proxy.concurrency", "should be greater than or equal to 1"]),
    ("pool-rank-not-allowed-by-vllm", _with(POOL, "spec.engine", {"maxLoraRank": 48}),
     ["spec.engine.maxLoraRank", "Unsupported value"]),
    ("pool-cpu-loras-below-loras", _with(POOL, "spec.engine", {"maxLoras": 8, "maxCpuLoras": 4}),
     ["spec.engine.maxCpuLoras", "at least engine.maxLoras"]),
    ("pool-admin-port-clash", _with(POOL, "spec.proxy", {"port": 9000, "adminPort": 9000}),
     ["spec.proxy.adminPort", "must differ from proxy.port"]),
    ("pool-engine-port-clash", _with(POOL, "spec.engine", {"port": 8080}),
     ["spec.engine.port", "must differ from proxy.port"]),
    ("pool-bad-quantity", _with(POOL, "spec.adapterVolume", {"size": "ten gigs"}),
     ["spec.adapterVolume.size", "should match"]),
    ("pool-bad-name", _with(POOL, "metadata.name", "1pool"), ["metadata.name", "DNS label"]),
    ("pool-bad-api-key-secret", _with(POOL, "spec.proxy", {"apiKeySecret": "Client_Keys"}),
     ["spec.proxy.apiKeySecret", "should match"]),
    ("pool-unknown-field", _with(POOL, "spec.replica", 2), ['unknown field "spec.replica"']),
    ("pool-min-pixels-above-max", _with(POOL, "spec.model.images", {"minPixels": 9000, "maxPixels": 8000}),
     ["spec.model.images.minPixels", "must not exceed images.maxPixels"]),
    ("pool-pixels-on-gemma3", _with(_with(POOL, "spec.model.family", "gemma3"), "spec.model.images",
                                    {"maxPixels": 8000}),
     ["spec.model.images", "apply only to families whose processor takes a pixel budget"]),
    ("pool-zero-pixels", _with(POOL, "spec.model.images", {"maxPixels": 0}),
     ["spec.model.images.maxPixels", "should be greater than or equal to 1"]),
    ("pool-unknown-reasoning-parser", _with(POOL, "spec.model.reasoning", "qwen4"),
     ["spec.model.reasoning", "Unsupported value"]),
]


@pytest.mark.parametrize("manifest,expected", [(m, e) for _, m, e in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_manifest_is_refused_naming_the_field(kubectl, crds, namespace, manifest, expected):
    res = _apply(kubectl, namespace, manifest)
    assert res.returncode != 0, f"apiserver accepted an invalid manifest: {res.stdout}"
    for text in expected:
        assert text in res.stderr, f"{text!r} not in refusal: {res.stderr}"
    # Nothing was stored.
    got = kubectl("get", manifest["kind"], manifest["metadata"]["name"], "-n", namespace, check=False)
    assert got.returncode != 0 and "NotFound" in got.stderr


def test_pool_ref_is_immutable(kubectl, crds, namespace):
    _apply(kubectl, namespace, ADAPTER, check=True)
    res = _apply(kubectl, namespace, _with(ADAPTER, "spec.poolRef", {"name": "pool-b"}))
    assert res.returncode != 0
    assert "spec.poolRef.name" in res.stderr and "poolRef is immutable" in res.stderr
    # Other fields stay mutable.
    res = _apply(kubectl, namespace, _with(ADAPTER, "spec.baseModelCheck", "warn"))
    assert res.returncode == 0, res.stderr


def test_kubectl_get_prints_the_printer_columns(kubectl, crds, namespace):
    _apply(kubectl, namespace, POOL, check=True)
    _apply(kubectl, namespace, ADAPTER, check=True)
    kubectl("patch", "vlmpool", "pool-a", "-n", namespace, "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"ready": "2/2", "adaptersReady": "1/1", "concurrency": 16,
                                   "replicas": 2, "readyReplicas": 2}}))
    kubectl("patch", "vlmadapter", "adapter-a", "-n", namespace, "--subresource=status", "--type=merge", "-p",
            json.dumps({"status": {"phase": "Ready", "version": "3f9a1c0d2e4b5a69", "loaded": "2/2"}}))
    out = kubectl("get", "vlmp,vlma", "-n", namespace).stdout
    lines = [line.split() for line in out.strip().splitlines() if line.strip()]
    headers = [line for line in lines if line[0] == "NAME"]
    assert headers[0] == ["NAME", "MODEL", "READY", "ADAPTERS", "CONCURRENCY", "AGE"]
    assert headers[1] == ["NAME", "POOL", "PHASE", "VERSION", "LOADED", "AGE"]
    rows = {line[0]: line for line in lines if line[0] != "NAME"}
    assert rows["vlmpool.vlmpool.io/pool-a"][1:5] == ["Qwen/Qwen2.5-VL-3B-Instruct", "2/2", "1/1", "16"]
    assert rows["vlmadapter.vlmpool.io/adapter-a"][1:5] == ["pool-a", "Ready", "3f9a1c0d2e4b5a69", "2/2"]
    # The category groups both kinds.
    out = kubectl("get", "vlm", "-n", namespace, "-o", "name").stdout.split()
    assert set(out) == {"vlmpool.vlmpool.io/pool-a", "vlmadapter.vlmpool.io/adapter-a"}


def test_status_is_a_subresource(kubectl, crds, namespace):
    _apply(kubectl, namespace, ADAPTER, check=True)
    # Status sent through the main resource is ignored...
    kubectl("patch", "vlmadapter", "adapter-a", "-n", namespace, "--type=merge", "-p",
            json.dumps({"status": {"phase": "Ready"}}))
    assert "status" not in _get(kubectl, namespace, "vlmadapter", "adapter-a") or \
        _get(kubectl, namespace, "vlmadapter", "adapter-a")["status"].get("phase") is None
    # ...and validated on the subresource.
    res = kubectl("patch", "vlmadapter", "adapter-a", "-n", namespace, "--subresource=status", "--type=merge",
                  "-p", json.dumps({"status": {"phase": "Exploded"}}), check=False)
    assert res.returncode != 0 and "status.phase" in res.stderr and "Unsupported value" in res.stderr


def test_kubectl_explain_shows_field_descriptions(kubectl, crds):
    out = kubectl("explain", "vlmpool.spec.proxy.concurrency").stdout
    assert "Requests each pod's proxy lets reach vLLM at once" in out
    out = kubectl("explain", "vlmpool.spec.proxy.apiKeySecret").stdout
    assert "are the accepted bearer tokens of the public API" in " ".join(out.split())
    out = kubectl("explain", "vlmadapter.spec.dora.policy").stdout
    assert "svd" in out and "strip" in out
