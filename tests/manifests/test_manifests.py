"""The manifest builders are pure functions: the typed views (api/objects.py) in, dict out. Tested
without a cluster."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from vlmtest.objects import BASE, adapter, adapter_obj, pool

import vlmpool
from vlmpool.api.objects import Adapter, Pool
from vlmpool.manifests import adapter as MA
from vlmpool.manifests import pool as MP
from vlmpool.manifests.common import ADAPTER_ROOT, API_KEY_DIR, patch_job_name
from vlmpool.names import API_VERSION

VLMPOOL = str(Path(sys.executable).parent / "vlmpool")

def container(obj: dict, name: str) -> dict:
    spec = obj["spec"]["template"]["spec"]  # a Deployment's and a Job's pod spec sit at the same path
    return next(c for c in spec["containers"] if c["name"] == name)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ---- pool ------------------------------------------------------------------------------------------
def test_deployment_defaults():
    dep = MP.deployment(pool())
    assert dep["metadata"]["ownerReferences"] == [{"apiVersion": API_VERSION, "kind": "VLMPool",
                                                   "name": "vision", "uid": "pool-uid", "controller": True,
                                                   "blockOwnerDeletion": True}]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}  # spec.rollout defaults
    sel = dep["spec"]["selector"]["matchLabels"]
    assert all(dep["spec"]["template"]["metadata"]["labels"][k] == v for k, v in sel.items())
    eng = container(dep, "engine")
    assert eng["args"] == ["--model", BASE, "--served-model-name", BASE, "--host", "127.0.0.1", "--port", "8000",
                           "--enable-lora",
                           "--max-loras", "4", "--max-lora-rank", "64",
                           # the family's image budget (qwen2_5_vl: 4·28² … 1280·28², tests/api/test_family_table.py)
                           "--mm-processor-kwargs", '{"size":{"shortest_edge":3136,"longest_edge":1003520}}']
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in eng["env"]
    assert eng["resources"] == {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}
    # Startup probe covers the model's load time (1800 s default at a 10 s period).
    assert eng["startupProbe"]["periodSeconds"] * eng["startupProbe"]["failureThreshold"] >= 1800
    # The engine listens on the pod's loopback only (issue 23): no container port, and its probes run
    # inside the container against 127.0.0.1 (a kubelet httpGet would reach the pod IP, where nothing listens).
    assert "ports" not in eng
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(eng[kind]) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"exec"}, eng[kind]
        cmd = eng[kind]["exec"]["command"]
        assert cmd[:2] == ["python3", "-c"] and "'http://127.0.0.1:8000/health'" in cmd[2]
    assert {"name": "adapters", "mountPath": ADAPTER_ROOT, "readOnly": True} in eng["volumeMounts"]
    px = container(dep, "proxy")
    assert px["command"] == ["vlmpool"] and px["args"][0] == "proxy"
    assert flag(px["args"], "--engine-url") == "http://127.0.0.1:8000"
    assert flag(px["args"], "--admin-port") == "8081" and "--concurrency" not in px["args"]
    assert flag(px["args"], "--queue-limit") == "128" and flag(px["args"], "--request-timeout") == "120"
    assert {p["name"]: p["containerPort"] for p in px["ports"]} == {"http": 8080, "admin": 8081}
    assert px["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert px["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "resources" in px
    # the proxy sees the adapter volume read-only, to confine pushed paths to it (realpath, no symlinks)
    assert {"name": "adapters", "mountPath": ADAPTER_ROOT, "readOnly": True} in px["volumeMounts"]
    assert flag(px["args"], "--adapter-root") == ADAPTER_ROOT
    assert "--api-key-dir" not in px["args"] and not any(m["name"] == "api-keys" for m in px["volumeMounts"])
    tpl = dep["spec"]["template"]["spec"]
    assert tpl["automountServiceAccountToken"] is False
    vols = {v["name"]: v for v in tpl["volumes"]}
    assert vols["adapters"]["persistentVolumeClaim"] == {"claimName": "vision-adapters", "readOnly": True}
    assert vols["admin-token"]["secret"]["secretName"] == "vision-admin-token"
    assert "nodeSelector" not in tpl and "tolerations" not in tpl


def test_deployment_api_key_secret_is_mounted_whole_and_passed():
    dep = MP.deployment(pool(proxy={"apiKeySecret": "vision-clients"}), adapter_root="/srv/adapters")
    px = container(dep, "proxy")
    assert flag(px["args"], "--api-key-dir") == API_KEY_DIR
    assert flag(px["args"], "--adapter-root") == "/srv/adapters"
    # mounted as a whole directory (no subPath): the kubelet updates it in place, the proxy re-reads it
    assert {"name": "api-keys", "mountPath": API_KEY_DIR, "readOnly": True} in px["volumeMounts"]
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["api-keys"] == {"name": "api-keys", "secret": {"secretName": "vision-clients", "defaultMode": 0o440}}
    eng = container(dep, "engine")
    assert not any(m["name"] == "api-keys" for m in eng["volumeMounts"])


def test_deployment_engine_settings_and_scheduling():
    p = pool(replicas=3,
             model={"name": BASE, "servedName": "qwen-vl", "family": "qwen2_5_vl",
                    "weights": {"claimName": "models", "path": "/qwen/3b"}},
             engine={"gpus": 2, "maxLoras": 8, "maxCpuLoras": 64, "maxLoraRank": 128, "maxModelLen": 8192,
                     "gpuMemoryUtilization": 0.85, "extraArgs": ["--enforce-eager"], "port": 9000,
                     "env": [{"name": "HF_HOME", "value": "/tmp"}],
                     "resources": {"requests": {"cpu": "4", "memory": "32Gi"}}},
             proxy={"concurrency": 32, "adminPort": 9100, "port": 9090,
                    "resources": {"limits": {"memory": "1Gi"}}},
             scheduling={"nodeSelector": {"gpu": "h100"},
                         "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                         "affinity": {"podAntiAffinity": {}}, "priorityClassName": "inference"})
    dep = MP.deployment(p, token_hash="abc")
    eng = container(dep, "engine")
    a = eng["args"]
    assert flag(a, "--model") == "/var/lib/vlmpool/base/qwen/3b" and flag(a, "--served-model-name") == "qwen-vl"
    assert flag(a, "--max-cpu-loras") == "64" and flag(a, "--tensor-parallel-size") == "2"
    assert flag(a, "--max-model-len") == "8192" and flag(a, "--gpu-memory-utilization") == "0.85"
    assert flag(a, "--max-lora-rank") == "128" and flag(a, "--port") == "9000" and a[-1] == "--enforce-eager"
    assert {"name": "HF_HOME", "value": "/tmp"} in eng["env"]
    assert eng["resources"]["requests"] == {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert {"name": "base-weights", "mountPath": "/var/lib/vlmpool/base", "readOnly": True} in eng["volumeMounts"]
    px = container(dep, "proxy")
    assert flag(px["args"], "--engine-url") == "http://127.0.0.1:9000" and flag(px["args"], "--base-model") == "qwen-vl"
    assert px["resources"] == {"limits": {"memory": "1Gi"}}
    tpl = dep["spec"]["template"]
    assert tpl["metadata"]["annotations"] == {"vlmpool.io/admin-token-hash": "abc"}
    assert tpl["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert tpl["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert tpl["spec"]["affinity"] == {"podAntiAffinity": {}} and tpl["spec"]["priorityClassName"] == "inference"
    assert dep["spec"]["replicas"] == 3
    svc = MP.service(p)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 9090, "targetPort": "http", "protocol": "TCP"}]
    assert MP.endpoint(p) == "http://vision.ml.svc:9090/v1"


def test_adapter_volume_created_or_existing():
    pvc = MP.adapter_pvc(pool(adapterVolume={"size": "50Gi", "storageClassName": "nfs", "accessMode": "ReadWriteOnce"}))
    assert pvc["metadata"]["name"] == "vision-adapters"
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}},
                           "storageClassName": "nfs"}
    existing = pool(adapterVolume={"claimName": "shared-adapters"})
    assert MP.adapter_pvc(existing) is None
    vols = {v["name"]: v for v in MP.deployment(existing)["spec"]["template"]["spec"]["volumes"]}
    assert vols["adapters"]["persistentVolumeClaim"]["claimName"] == "shared-adapters"
    job = MA.patch_job(adapter(), existing)
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "shared-adapters"}


def test_service_and_secret():
    svc = MP.service(pool(service={"type": "LoadBalancer", "annotations": {"a": "b"}}))
    assert svc["spec"]["type"] == "LoadBalancer" and svc["metadata"]["annotations"] == {"a": "b"}
    assert svc["spec"]["selector"] == {"vlmpool.io/pool": "vision", "app.kubernetes.io/component": "server"}
    sec = MP.admin_secret(pool(), "t0k3n")
    assert sec["data"] == {"token": "dDBrM24="} and sec["metadata"]["ownerReferences"][0]["uid"] == "pool-uid"


def test_concurrency_change_does_not_touch_the_pod_template():
    assert MP.deployment(pool(proxy={"concurrency": 3})) == MP.deployment(pool(proxy={"concurrency": 64}))


def test_builders_are_pure():
    p = pool(engine={"extraArgs": ["--x"]})
    before = copy.deepcopy(p)
    assert MP.deployment(p) == MP.deployment(p)
    assert MA.patch_job(adapter(), p) == MA.patch_job(adapter(), p)
    assert p.obj == before.obj and p.spec == before.spec


# ---- adapter -----------------------------------------------------------------------------------------
def test_patch_job_shape():
    job = MA.patch_job(adapter(), pool())
    digest = MA.spec_digest(adapter(), pool())
    assert job["metadata"]["name"] == f"invoices-patch-{digest[:8]}" == patch_job_name("invoices", digest)
    assert job["metadata"]["annotations"]["vlmpool.io/spec-digest"] == digest
    assert job["metadata"]["ownerReferences"][0]["kind"] == "VLMAdapter"
    spec = job["spec"]
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    c = pod["containers"][0]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == flag(c["args"], "--termination-log")
    assert c["args"][:3] == ["patch", "--source", "hf://acme/invoices@v3"]
    assert flag(c["args"], "--adapter") == "invoices" and flag(c["args"], "--root") == ADAPTER_ROOT
    assert flag(c["args"], "--pool-base") == BASE and flag(c["args"], "--family") == "qwen2_5_vl"
    assert flag(c["args"], "--max-rank") == "64" and flag(c["args"], "--dora-policy") == "reject"
    assert flag(c["args"], "--base-check") == "strict"
    assert "--base-weights" not in c["args"] and "--sha256" not in c["args"]
    assert c["volumeMounts"] == [{"name": "adapters", "mountPath": ADAPTER_ROOT},  # read-write
                                 {"name": "tmp", "mountPath": "/tmp"}]  # the root filesystem is read-only
    assert pod["volumes"] == [{"name": "adapters", "persistentVolumeClaim": {"claimName": "vision-adapters"}},
                              {"name": "tmp", "emptyDir": {"sizeLimit": "9Gi"}}]
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "patch"


def test_patch_job_is_bounded_by_the_patchers_own_limits():
    """Memory, ephemeral storage and scratch have limits derived from --max-file-bytes (a download and
    the extracted files on disk, the weights and the patched weights in memory); a fetch ends at half
    the Job's deadline, and the patcher's own parser takes the flag."""
    import argparse

    from vlmpool.patcher import cli as patcher_cli
    from vlmpool.patcher.fetch import DEFAULT_MAX_FILE_BYTES

    job = MA.patch_job(adapter(), pool())
    c = job["spec"]["template"]["spec"]["containers"][0]
    gib = 1024**3
    assert DEFAULT_MAX_FILE_BYTES == 4 * gib
    assert c["resources"]["limits"] == {"memory": "9Gi", "ephemeral-storage": "10Gi"}
    assert c["resources"]["requests"]["memory"] == "1Gi" and c["resources"]["requests"]["ephemeral-storage"]
    tmp = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"]["sizeLimit"] == "9Gi"
    assert float(flag(c["args"], "--fetch-timeout")) == job["spec"]["activeDeadlineSeconds"] / 2
    parser = argparse.ArgumentParser()
    patcher_cli.configure(parser)
    assert parser.parse_args(c["args"][1:]).fetch_timeout == job["spec"]["activeDeadlineSeconds"] / 2
    for j in (MA.cleanup_job(adapter(), pool()), MA.prune_job(adapter(), pool(), "00000001")):
        limits = j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["memory"] and limits["ephemeral-storage"]


def test_jobs_never_run_the_pools_image():
    """Without --patch-image the Jobs run this release's patcher image, never the pool's proxy image
    (which the pool's author, a tenant, chooses)."""
    p = pool(proxy={"image": "tenant.example.com/anything:1", "imagePullPolicy": "Always"})
    for job in (MA.patch_job(adapter(), p), MA.cleanup_job(adapter(), p), MA.prune_job(adapter(), p, "00000001")):
        c = job["spec"]["template"]["spec"]["containers"][0]
        assert c["image"] == MA.DEFAULT_PATCH_IMAGE == f"ghcr.io/vlmpool/vlmpool-patcher:{vlmpool.__version__}"
        assert c["imagePullPolicy"] == "IfNotPresent"
    assert MA.patch_job(adapter(), p, image="reg/patcher:2")["spec"]["template"]["spec"]["containers"][0][
        "image"] == "reg/patcher:2"


def test_svd_job_mounts_base_weights_read_only():
    p = pool(model={"name": BASE, "family": "qwen2_5_vl", "weights": {"claimName": "models", "path": "/qwen"}})
    a = adapter(dora={"policy": "svd", "rank": 16}, source={"uri": "https://example.com/a.tgz", "sha256": "a" * 64,
                                                            "credentialsSecret": {"name": "creds"}})
    job = MA.patch_job(a, p, image="reg/vlmpool:1", adapter_root="/data/adapters")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "reg/vlmpool:1"
    assert flag(c["args"], "--svd-rank") == "16" and flag(c["args"], "--base-weights") == "/var/lib/vlmpool/base/qwen"
    assert flag(c["args"], "--sha256") == "a" * 64 and flag(c["args"], "--root") == "/data/adapters"
    assert {"name": "base-weights", "mountPath": "/var/lib/vlmpool/base", "readOnly": True} in c["volumeMounts"]
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert vols["base-weights"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    # Only the credential keys, one by one (a Secret cannot set anything else in the container).
    assert "envFrom" not in c
    assert {"name": "AUTHORIZATION", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "AUTHORIZATION",
                                                                    "optional": True}}} in c["env"]


def test_dora_max_error_reaches_the_patcher_only_for_strip_and_svd():
    p = pool()
    def args(dora):
        job = MA.patch_job(adapter(dora=dora), p, image="reg/vlmpool:1", adapter_root="/data/adapters")
        return job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag(args({"policy": "strip", "maxError": 0.05}), "--dora-max-error") == "0.05"
    assert "--dora-max-error" not in args({"policy": "strip"})
    assert "--dora-max-error" not in args({"policy": "reject", "maxError": 0.05})  # nothing to measure


def test_declared_base_reaches_the_patcher_as_its_advisory_variant():
    job = MA.patch_job(adapter(declaredBase="qwen2.5-vl-3b-instruct-peft"), pool(), image="i", adapter_root="/r")
    assert flag(job["spec"]["template"]["spec"]["containers"][0]["args"], "--declared-variant") == \
        "qwen2.5-vl-3b-instruct-peft"
    job = MA.patch_job(adapter(), pool(), image="i", adapter_root="/r")
    assert "--declared-variant" not in job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_pvc_and_file_sources_are_mounted_read_only():
    job = MA.patch_job(adapter(source={"uri": "pvc://uploads/team-a/invoices"}), pool())
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert flag(c["args"], "--pvc-root") == "/mnt/sources"
    assert {"name": "source", "mountPath": "/mnt/sources/uploads", "readOnly": True} in c["volumeMounts"]
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert vols["source"]["persistentVolumeClaim"] == {"claimName": "uploads", "readOnly": True}
    job = MA.patch_job(adapter(source={"uri": "file:///srv/adapters/a"}), pool())
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "source", "mountPath": "/srv/adapters/a", "readOnly": True} in c["volumeMounts"]


def test_spec_digest_covers_patch_inputs_only():
    d = MA.spec_digest(adapter(), pool())
    assert MA.spec_digest(adapter(), pool()) == d
    # Not a patch input: the served name, the pool's replicas, concurrency, images.
    assert MA.spec_digest(adapter(servedName="other"), pool(replicas=5, proxy={"concurrency": 2})) == d
    changed = [
        MA.spec_digest(adapter(source={"uri": "hf://acme/invoices@v4"}), pool()),
        MA.spec_digest(adapter(dora={"policy": "strip"}), pool()),
        MA.spec_digest(adapter(baseModelCheck="warn"), pool()),
        MA.spec_digest(adapter(source={"uri": "hf://acme/invoices@v3", "sha256": "b" * 64}), pool()),
        MA.spec_digest(adapter(), pool(engine={"maxLoraRank": 128})),
        MA.spec_digest(adapter(), pool(model={"name": "Qwen/Qwen2-VL-2B-Instruct", "family": "qwen2_vl"})),
        MA.spec_digest(adapter("invoices2"), pool()),
    ]
    assert d not in changed and len(set(changed)) == len(changed)


def test_job_names_fit_a_label_value():
    long = "a" * 60 + ".b-c"
    job = MA.patch_job(adapter(long), pool())
    assert len(job["metadata"]["name"]) <= 63 and not job["metadata"]["name"].startswith("-")
    cj = MA.cleanup_job(adapter(long), pool())
    assert len(cj["metadata"]["name"]) <= 63 and cj["metadata"]["name"].endswith("-cleanup-0f1e2d3c")
    assert all(len(v) <= 63 for v in job["metadata"]["labels"].values())


def test_desired_state_uses_versions_paths_sorted_without_deleting_or_unpatched():
    def ready(name, version, served=None, ts="2026-01-01T00:00:00Z", deleting=False):
        a = adapter_obj(name, **({"servedName": served} if served else {}))
        a["metadata"]["creationTimestamp"] = ts
        if deleting:
            a["metadata"]["deletionTimestamp"] = "2026-02-01T00:00:00Z"
        if version:
            a["status"] = {"version": version, "path": f"{ADAPTER_ROOT}/{name}/versions/{version}"}
        return Adapter.parse(a)
    state, conflicts = MA.desired_state(7, [
        ready("zeta", "v1"), ready("alpha", "v2"), ready("pending", None), ready("gone", "v3", deleting=True),
        ready("dup-new", "v4", served="zeta", ts="2026-03-01T00:00:00Z"),
    ])
    assert state == {"concurrency": 7, "adapters": [
        {"name": "alpha", "version": "v2", "path": f"{ADAPTER_ROOT}/alpha/versions/v2"},
        {"name": "zeta", "version": "v1", "path": f"{ADAPTER_ROOT}/zeta/versions/v1"}]}
    assert conflicts == ["dup-new"]


def test_cleanup_job_removes_only_the_adapter_directory(tmp_path):
    job = MA.cleanup_job(adapter("inv"), pool(), adapter_root=str(tmp_path))
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["volumeMounts"] == [{"name": "adapters", "mountPath": str(tmp_path)}]
    (tmp_path / "inv" / "versions" / "v1").mkdir(parents=True)
    (tmp_path / "inv" / "versions" / "v1" / "adapter_config.json").write_text("{}")
    (tmp_path / "other" / "versions").mkdir(parents=True)
    assert c["command"] == ["vlmpool"] and c["args"][:2] == ["patch", "cleanup"]
    cmd = [VLMPOOL, *c["args"]]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "inv").exists() and (tmp_path / "other" / "versions").is_dir()
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0  # idempotent
    for bad in ("..", ".staging", "a/b"):
        res = subprocess.run([VLMPOOL, "patch", "cleanup", "--root", str(tmp_path), "--adapter", bad],
                             capture_output=True, text=True)
        assert res.returncode == 1 and "InvalidAdapterName" in res.stderr
    assert (tmp_path / "other").is_dir()


@pytest.mark.parametrize("bad", [{"source": {"uri": "ftp://x/y"}}, {"poolRef": {}}])
def test_invalid_spec_is_refused_by_the_model(bad):
    with pytest.raises(ValidationError):
        Adapter.parse(adapter_obj(**bad))


def test_prune_job_keeps_the_served_and_current_versions(tmp_path):
    job = MA.prune_job(adapter("inv"), pool(), "v3", adapter_root=str(tmp_path))
    assert job["metadata"]["name"].startswith("inv-prune-") and len(job["metadata"]["name"]) <= 63
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "prune"
    assert MA.prune_job(adapter("inv"), pool(), "v3")["metadata"]["name"] == job["metadata"]["name"]
    assert MA.prune_job(adapter("inv"), pool(), "v4")["metadata"]["name"] != job["metadata"]["name"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["vlmpool"] and c["args"][:2] == ["patch", "prune"]
    cmd = [VLMPOOL, *c["args"]]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0  # nothing there yet: no-op
    versions = tmp_path / "inv" / "versions"
    for v in ("v1", "v2", "v3", "v4"):
        (versions / v).mkdir(parents=True)
        (versions / v / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "inv" / "current").symlink_to("versions/v4")  # a newer publish, not pushed yet
    (tmp_path / "other" / "versions" / "v1").mkdir(parents=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in versions.iterdir()) == ["v3", "v4"]
    assert (tmp_path / "other" / "versions" / "v1").is_dir()


def test_every_job_pod_gives_the_patcher_uid_group_access_to_the_volume():
    """The patcher image runs as uid/gid 65532: fsGroup lets it write root-owned adapter volumes."""
    jobs = [MA.patch_job(adapter(), pool()), MA.cleanup_job(adapter(), pool()),
            MA.prune_job(adapter(), pool(), "v3")]
    for job in jobs:
        sc = job["spec"]["template"]["spec"]["securityContext"]
        assert sc["fsGroup"] == 65532 and sc["seccompProfile"] == {"type": "RuntimeDefault"}, job["metadata"]["name"]


@pytest.mark.parametrize("policy,dora_image,want", [
    ("reject", "reg/patcher-dora:1", "reg/patcher:1"),   # plain LoRA: the torch-free image
    ("svd", "reg/patcher-dora:1", "reg/patcher-dora:1"),  # DoRA maths: the torch image
    ("strip", "reg/patcher-dora:1", "reg/patcher-dora:1"),  # strip measures its error with torch
    ("svd", None, "reg/patcher:1"),  # none configured: the default image (svd refused there as NeedsTorch)
])
def test_dora_adapters_get_the_torch_patcher_image(policy, dora_image, want):
    dora = {"policy": policy, **({"rank": 8} if policy == "svd" else {})}
    a = adapter(dora=dora)
    image = MA.patch_image_for(a.spec, "reg/patcher:1", dora_image)
    assert image == want
    job = MA.patch_job(a, pool(), image=image)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == want


def test_pool_pods_give_the_images_uid_group_access_to_the_admin_token():
    """The proxy runs as uid/gid 65532 and reads the admin token Secret (0440, root-owned on a real
    kubelet) through fsGroup."""
    spec = MP.deployment(pool())["spec"]["template"]["spec"]
    assert spec["securityContext"]["fsGroup"] == 65532
    token = next(v for v in spec["volumes"] if v["name"] == "admin-token")
    assert token["secret"]["defaultMode"] == 0o440


def test_proxy_args_crop_describe_and_thinking(monkeypatch):
    """spec.proxy.cropDescribe and the family's thinking switch reach the proxy's command line, which the
    proxy's own CLI accepts."""
    import argparse

    from vlmpool.proxy import cli as proxy_cli

    def parsed(obj: Pool):
        px = container(MP.deployment(obj), "proxy")
        parser = argparse.ArgumentParser()
        proxy_cli.configure(parser)
        monkeypatch.setenv("VLMPOOL_ADMIN_TOKEN", "t" * 32)
        return px["args"], proxy_cli.build_config(parser.parse_args(px["args"][1:]))

    args, cfg = parsed(pool())
    assert flag(args, "--thinking") == "none" and "--no-crop-describe" not in args
    assert cfg.crop_describe is True and cfg.thinking == "none"
    args, cfg = parsed(pool(proxy={"cropDescribe": False}))
    assert "--no-crop-describe" in args and cfg.crop_describe is False
    args, cfg = parsed(pool(model={"name": "Qwen/Qwen3.5-2B", "family": "qwen3_5"}))  # the table's thinking_switch
    assert flag(args, "--thinking") == "switch" and cfg.thinking == "switch"


def test_rollout_defaults_work_on_a_full_cluster_and_are_settable():
    """Default maxSurge 0 / maxUnavailable 1: with every GPU taken a surge pod would stay Pending for good."""
    ru = MP.deployment(pool())["spec"]["strategy"]["rollingUpdate"]
    assert ru == {"maxUnavailable": 1, "maxSurge": 0}
    ru = MP.deployment(pool(rollout={"maxSurge": "25%", "maxUnavailable": 0}))["spec"]["strategy"]["rollingUpdate"]
    assert ru == {"maxUnavailable": 0, "maxSurge": "25%"}
    assert MP.deployment(pool(rollout={"maxUnavailable": "2"}))["spec"]["strategy"]["rollingUpdate"][
        "maxUnavailable"] == 2  # a digit string is a count, as Kubernetes reads it
    for bad in ({"maxUnavailable": 0, "maxSurge": 0}, {"maxUnavailable": "0%", "maxSurge": "0"},
                {"maxSurge": "150%"}, {"maxSurge": "abc"}, {"maxUnavailable": -1}, {"maxSurge": True}):
        with pytest.raises(ValueError):
            pool(rollout=bad)  # Pool.parse refuses it: no Deployment is ever built
