"""VLMAdapter on the real control plane: one patch Job per version, its termination message into
status, the push to real proxy+simulator processes, failure reasons, restarts, and deletion."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from helpers import (
    BASE,
    admin_state,
    eventually,
    free_port,
    job_pods,
    loopback_block,
    report_running,
    report_terminated,
    run_cleanup_pod,
    start_pod_processes,
    wait_job_condition,
    wait_job_pod,
    write_adapter,
)

from vlmpool.kube.client import JOBS, PODS, SECRETS, VLMADAPTERS, VLMPOOLS

pytestmark = pytest.mark.apiserver


def pool_obj(name: str, replicas: int, admin_port: int, engine_port: int, proxy_port: int) -> dict:
    return {"apiVersion": "vlmpool.io/v1alpha1", "kind": "VLMPool", "metadata": {"name": name},
            "spec": {"model": {"name": BASE, "family": "qwen2_5_vl"}, "replicas": replicas,
                     "engine": {"port": engine_port, "gpus": 0},
                     "proxy": {"port": proxy_port, "adminPort": admin_port, "concurrency": 5}}}


def adapter_obj(name: str, pool: str, uri: str, served: str | None = None) -> dict:
    spec = {"poolRef": {"name": pool}, "source": {"uri": uri}}
    if served:
        spec["servedName"] = served
    return {"apiVersion": "vlmpool.io/v1alpha1", "kind": "VLMAdapter", "metadata": {"name": name}, "spec": spec}


def ok_message(root: Path, adapter: str, version: str, **extra) -> str:
    msg = {"ok": True, "version": version, "path": f"{root}/{adapter}/versions/{version}", "tensorsKept": 8,
           "tensorsRemapped": 8, "tensorsDropped": 0, "rank": 8, "doraPolicy": "none", "doraError": None,
           "declaredBase": BASE, "poolBase": BASE, "baseCheck": "match", "warnings": []}
    msg.update(extra)
    return json.dumps(msg)


async def patch_jobs(kube, ns, adapter):
    return await kube.list(JOBS, ns, label_selector=f"vlmpool.io/adapter={adapter}")


async def adapter_status(kube, ns, name, **want):
    st = (await kube.get(VLMADAPTERS, name, ns)).get("status") or {}
    return st if all(st.get(k) == v for k, v in want.items()) else None


async def complete_patch(kube, ns, job_name, root, adapter, version, seed=0):
    """Play the patch Job's pod: publish the version directory, exit 0 with the summary."""
    pod = await wait_job_pod(kube, ns, job_name)
    write_adapter(root / adapter / "versions" / version, seed=seed)
    await report_terminated(kube, pod, 0, ok_message(root, adapter, version))
    await wait_job_condition(kube, ns, job_name, "Complete")


async def start_pool_pods(kube, ns, pool, n, tmp_path, pod_processes):
    """Play the kubelet for the pool's pods: real processes per pod, then report them Running."""
    pods = await eventually(lambda: _n(kube.list(PODS, ns, label_selector=f"vlmpool.io/pool={pool}"), n),
                            what=f"{n} pods")
    secret = await eventually(lambda: kube.get(SECRETS, f"{pool}-admin-token", ns), what="the token Secret")
    token = base64.b64decode(secret["data"]["token"]).decode()
    block = loopback_block()
    ips = {}
    for i, pod in enumerate(sorted(pods, key=lambda p: p["metadata"]["name"])):
        ip = f"{block}{i + 2}"
        pod_processes.append(await start_pod_processes(pod, ip, token, tmp_path))
        await report_running(kube, pod, ip)
        ips[pod["metadata"]["name"]] = ip
    return token, ips


async def _n(coro, n):
    items = await coro
    return items if len(items) == n else None


async def test_adapter_patch_push_swap_and_delete(kube, namespace, operator, adapter_root, tmp_path, pod_processes):
    ns = namespace
    op = await operator()
    admin_port = free_port()
    await kube.create(pool_obj("pool", 2, admin_port, free_port(), free_port()), ns)
    token, ips = await start_pool_pods(kube, ns, "pool", 2, tmp_path, pod_processes)

    # The operator pushes to the new pods (empty state, concurrency from the spec).
    async def pushed_empty():
        states = [await admin_state(ip, admin_port, token) for ip in ips.values()]
        return states if all(s["generation"] >= 1 and s["concurrency"] == 5 for s in states) else None
    await eventually(pushed_empty, what="the first push")

    src = tmp_path / "src"
    await kube.create(adapter_obj("ad1", "pool", f"file://{src}", served="acme/invoices"), ns)
    jobs = await eventually(lambda: patch_jobs(kube, ns, "ad1"), what="the patch Job")
    assert len(jobs) == 1
    job = jobs[0]
    name = job["metadata"]["name"]
    assert name.startswith("ad1-patch-") and len(name) == len("ad1-patch-") + 8
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["patch", "--source"] and c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["args"][c["args"].index("--root") + 1] == str(adapter_root)
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["activeDeadlineSeconds"] > 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["metadata"]["ownerReferences"][0]["kind"] == "VLMAdapter"
    await eventually(lambda: adapter_status(kube, ns, "ad1", phase="Patching"), what="phase Patching")

    await complete_patch(kube, ns, name, adapter_root, "ad1", "v1aaaa")
    st = await eventually(lambda: adapter_status(kube, ns, "ad1", phase="Ready"), what="phase Ready")
    assert st["version"] == "v1aaaa" and st["loaded"] == "2/2" and st["loadedPods"] == 2
    assert st["path"] == f"{adapter_root}/ad1/versions/v1aaaa"
    assert st["report"]["tensorsKept"] == 8 and st["report"]["baseCheck"] == "match"
    assert sorted(p["pod"] for p in st["pods"]) == sorted(ips) and {p["state"] for p in st["pods"]} == {"loaded"}
    for ip in ips.values():
        state = await admin_state(ip, admin_port, token)
        (a,) = state["adapters"]
        assert (a["name"], a["version"], a["state"]) == ("acme/invoices", "v1aaaa", "loaded")
        assert a.get("path", st["path"]) == st["path"]
    pool_st = (await kube.get(VLMPOOLS, "pool", ns))["status"]
    assert pool_st["adaptersReady"] == "1/1" and pool_st["desiredStateGeneration"] >= 2
    assert len(await patch_jobs(kube, ns, "ad1")) == 1  # nothing ran twice

    # A new source is a new spec digest: a second Job; the old version serves until the new is in.
    await kube.patch(VLMADAPTERS, "ad1", {"spec": {"source": {"uri": f"file://{src}-v2"}}}, ns)
    jobs = await eventually(lambda: _n(patch_jobs(kube, ns, "ad1"), 2), what="the second Job")
    new_job = next(j for j in jobs if j["metadata"]["name"] != name)["metadata"]["name"]
    st = await eventually(lambda: adapter_status(kube, ns, "ad1", phase="Patching"), what="patching v2")
    assert st["version"] == "v1aaaa"
    await complete_patch(kube, ns, new_job, adapter_root, "ad1", "v2bbbb", seed=1)
    st = await eventually(lambda: adapter_status(kube, ns, "ad1", phase="Ready", version="v2bbbb", loaded="2/2"),
                          what="v2 Ready")
    for ip in ips.values():
        (a,) = (await admin_state(ip, admin_port, token))["adapters"]
        assert (a["version"], a["state"]) == ("v2bbbb", "loaded")

    # Deletion: unload from every pod, then the cleanup Job, then the finalizer goes.
    await kube.delete(VLMADAPTERS, "ad1", ns)

    async def unloaded():
        states = [await admin_state(ip, admin_port, token) for ip in ips.values()]
        return all(s["adapters"] == [] for s in states)
    await eventually(unloaded, what="unload on every pod")
    cleanup = await eventually(lambda: kube.list(JOBS, ns, label_selector="app.kubernetes.io/component=cleanup"),
                               what="the cleanup Job")
    assert (adapter_root / "ad1" / "versions" / "v2bbbb").is_dir()  # not removed before the unload
    pod = await wait_job_pod(kube, ns, cleanup[0]["metadata"]["name"])
    assert await run_cleanup_pod(kube, pod) == 0
    assert not (adapter_root / "ad1").exists()
    await eventually(lambda: _missing(kube, ns, "ad1"), what="the adapter to be gone")
    metrics = await op.metrics()
    assert 'vlmpool_operator_jobs_created_total{kind="patch"} 2.0' in metrics
    assert "vlmpool_operator_push_duration_seconds_count" in metrics


async def _missing(kube, ns, name):
    return await kube.get_or_none(VLMADAPTERS, name, ns) is None
