"""VLMAdapter on the real control plane: one patch Job per version, its termination message into
status, the push to real proxy+simulator processes, failure reasons, restarts, and deletion."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from vlmtest.operator import (
    BASE,
    admin_state,
    after_more,
    counter,
    free_port,
    loopback_block,
    report_running,
    report_terminated,
    run_cleanup_pod,
    start_pod_processes,
    wait_job_condition,
    wait_job_pod,
    write_adapter,
)

from vlmpool.kube.client import DEPLOYMENTS, EVENTS, JOBS, PODS, SECRETS, VLMADAPTERS, VLMPOOLS
from vlmpool.names import API_VERSION
from vlmpool.testing.waiting import wait_until

pytestmark = pytest.mark.apiserver


def pool_obj(name: str, replicas: int, admin_port: int, engine_port: int, proxy_port: int) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": name},
            "spec": {"model": {"name": BASE, "family": "qwen2_5_vl"}, "replicas": replicas,
                     "engine": {"port": engine_port, "gpus": 0},
                     "proxy": {"port": proxy_port, "adminPort": admin_port, "concurrency": 5}}}


def adapter_obj(name: str, pool: str, uri: str, served: str | None = None) -> dict:
    spec = {"poolRef": {"name": pool}, "source": {"uri": uri}}
    if served:
        spec["servedName"] = served
    return {"apiVersion": API_VERSION, "kind": "VLMAdapter", "metadata": {"name": name}, "spec": spec}


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
    selector = f"vlmpool.io/pool={pool},app.kubernetes.io/component=server"
    pods = await wait_until(lambda: _n(kube.list(PODS, ns, label_selector=selector), n), what=f"{n} pods")
    secret = await wait_until(lambda: kube.get(SECRETS, f"{pool}-admin-token", ns), what="the token Secret")
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


async def test_adapter_patch_push_swap_and_delete(kube, kubectl, namespace, operator, adapter_root, tmp_path,
                                                  pod_processes):
    ns = namespace
    op = await operator()
    admin_port = free_port()
    await kube.create(pool_obj("pool", 2, admin_port, free_port(), free_port()), ns)
    token, ips = await start_pool_pods(kube, ns, "pool", 2, tmp_path, pod_processes)

    # The operator pushes to the new pods (empty state, concurrency from the spec).
    async def pushed_empty():
        states = [await admin_state(ip, admin_port, token) for ip in ips.values()]
        return states if all(s["generation"] >= 1 and s["concurrency"] == 5 for s in states) else None
    await wait_until(pushed_empty, what="the first push")

    src = tmp_path / "src"
    await kube.create(adapter_obj("ad1", "pool", f"file://{src}", served="acme/invoices"), ns)
    jobs = await wait_until(lambda: patch_jobs(kube, ns, "ad1"), what="the patch Job")
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
    await wait_until(lambda: adapter_status(kube, ns, "ad1", phase="Patching"), what="phase Patching")

    await complete_patch(kube, ns, name, adapter_root, "ad1", "0001aaaa")
    st = await wait_until(lambda: adapter_status(kube, ns, "ad1", phase="Ready"), what="phase Ready")
    assert st["version"] == "0001aaaa" and st["loaded"] == "2/2" and st["loadedPods"] == 2
    assert st["path"] == f"{adapter_root}/ad1/versions/0001aaaa"
    assert st["report"]["tensorsKept"] == 8 and st["report"]["baseCheck"] == "match"
    assert sorted(p["pod"] for p in st["pods"]) == sorted(ips) and {p["state"] for p in st["pods"]} == {"loaded"}
    for ip in ips.values():
        state = await admin_state(ip, admin_port, token)
        (a,) = state["adapters"]
        assert (a["name"], a["version"], a["state"]) == ("acme/invoices", "0001aaaa", "loaded")
        assert a.get("path", st["path"]) == st["path"]
    async def pool_counts():
        st = (await kube.get(VLMPOOLS, "pool", ns))["status"]
        return st if st.get("adaptersReady") == "1/1" else None
    pool_st = await wait_until(pool_counts, what="the pool's adapter counts")  # written after the adapter's
    assert pool_st["adapters"] == {"total": 1, "ready": 1, "failed": 0} and pool_st["desiredStateGeneration"] >= 2
    assert len(await patch_jobs(kube, ns, "ad1")) == 1  # nothing ran twice

    # `kubectl get` shows the printer columns from the status the operator writes.
    table = kubectl("get", "vlma", "ad1", "-n", ns).stdout
    assert "Ready" in table and "0001aaaa" in table and "2/2" in table, table
    table = kubectl("get", "vlmp", "pool", "-n", ns).stdout
    assert "2/2" in table and "1/1" in table, table

    # Concurrency is pushed at run time: every pod gets it, the Deployment does not roll.
    dep_gen = (await kube.get(DEPLOYMENTS, "pool", ns))["metadata"]["generation"]
    await kube.patch(VLMPOOLS, "pool", {"spec": {"proxy": {"concurrency": 9}}}, ns)

    async def concurrency_9():
        states = [await admin_state(ip, admin_port, token) for ip in ips.values()]
        return all(s["concurrency"] == 9 for s in states)
    await wait_until(concurrency_9, what="concurrency 9 on every pod")
    assert (await kube.get(DEPLOYMENTS, "pool", ns))["metadata"]["generation"] == dep_gen

    # A new source is a new spec digest: a second Job; the old version serves until the new is in.
    await kube.patch(VLMADAPTERS, "ad1", {"spec": {"source": {"uri": f"file://{src}-v2"}}}, ns)
    jobs = await wait_until(lambda: _n(patch_jobs(kube, ns, "ad1"), 2), what="the second Job")
    new_job = next(j for j in jobs if j["metadata"]["name"] != name)["metadata"]["name"]
    st = await wait_until(lambda: adapter_status(kube, ns, "ad1", phase="Patching"), what="patching v2")
    assert st["version"] == "0001aaaa"
    await complete_patch(kube, ns, new_job, adapter_root, "ad1", "0002bbbb", seed=1)
    st = await wait_until(lambda: adapter_status(kube, ns, "ad1", phase="Ready", version="0002bbbb", loaded="2/2"),
                          what="v2 Ready")
    for ip in ips.values():
        (a,) = (await admin_state(ip, admin_port, token))["adapters"]
        assert (a["version"], a["state"]) == ("0002bbbb", "loaded")

    # Every pod serves v2 (none serves v1 any more): one prune Job removes v1's directory, under the
    # patcher's lock, keeping the served version and the one `current` points at.
    (adapter_root / "ad1" / "current").symlink_to("versions/0002bbbb")
    (prune,) = await wait_until(lambda: kube.list(JOBS, ns, label_selector="app.kubernetes.io/component=prune"),
                                what="the prune Job")
    assert (adapter_root / "ad1" / "versions" / "0001aaaa").is_dir()
    pod = await wait_job_pod(kube, ns, prune["metadata"]["name"])
    assert await run_cleanup_pod(kube, pod) == 0
    assert sorted(p.name for p in (adapter_root / "ad1" / "versions").iterdir()) == ["0002bbbb"]
    # Later pushes (two more rounds to both pods, resyncs included) do not prune again.
    await after_more(op, "vlmpool_operator_pushes_total", 4, result="ok")
    assert len(await kube.list(JOBS, ns, label_selector="app.kubernetes.io/component=prune")) == 1
    assert counter(await op.metrics(), "vlmpool_operator_jobs_created_total", kind="prune") == 1

    # Deletion: unload from every pod, then the cleanup Job, then the finalizer goes.
    await kube.delete(VLMADAPTERS, "ad1", ns)

    async def unloaded():
        states = [await admin_state(ip, admin_port, token) for ip in ips.values()]
        return all(s["adapters"] == [] for s in states)
    await wait_until(unloaded, what="unload on every pod")
    cleanup = await wait_until(lambda: kube.list(JOBS, ns, label_selector="app.kubernetes.io/component=cleanup"),
                               what="the cleanup Job")
    assert (adapter_root / "ad1" / "versions" / "0002bbbb").is_dir()  # not removed before the unload
    pod = await wait_job_pod(kube, ns, cleanup[0]["metadata"]["name"])
    assert await run_cleanup_pod(kube, pod) == 0
    assert not (adapter_root / "ad1").exists()
    await wait_until(lambda: _missing(kube, ns, "ad1"), what="the adapter to be gone")
    metrics = await op.metrics()
    assert 'vlmpool_operator_jobs_created_total{kind="patch"} 2.0' in metrics
    assert "vlmpool_operator_push_duration_seconds_count" in metrics


async def _missing(kube, ns, name):
    return await kube.get_or_none(VLMADAPTERS, name, ns) is None


async def test_refused_patch_puts_the_reason_in_status_and_is_not_retried(kube, namespace, operator, adapter_root,
                                                                          tmp_path):
    ns = namespace
    op = await operator()
    await kube.create(pool_obj("pool", 0, free_port(), free_port(), free_port()), ns)
    await kube.create(adapter_obj("bad", "pool", f"file://{tmp_path}/bad"), ns)
    (job,) = await wait_until(lambda: patch_jobs(kube, ns, "bad"), what="the patch Job")
    pod = await wait_job_pod(kube, ns, job["metadata"]["name"])
    refusal = {"ok": False, "reason": "RankTooHigh", "message": "rank 128 is over the pool's max LoRA rank 64"}
    await report_terminated(kube, pod, 3, json.dumps(refusal))
    st = await wait_until(lambda: adapter_status(kube, ns, "bad", phase="Failed"), what="phase Failed")
    assert st["reason"] == "RankTooHigh" and "rank 128" in st["message"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Patched"]["status"] == "False" and conds["Ready"]["status"] == "False"
    assert "version" not in st

    # A Job that fails without a summary (crash, deadline): the Job's reason and the log tail.
    await kube.create(adapter_obj("crash", "pool", f"file://{tmp_path}/crash"), ns)
    (job,) = await wait_until(lambda: patch_jobs(kube, ns, "crash"), what="the second patch Job")
    for _ in range(3):  # backoffLimit 2: three failed pods fail the Job
        pod = await wait_job_pod(kube, ns, job["metadata"]["name"])
        await report_terminated(kube, pod, 1, "Traceback (most recent call last):\n  ...\nMemoryError")
    st = await wait_until(lambda: adapter_status(kube, ns, "crash", phase="Failed"), timeout=90,
                          what="phase Failed after the Job failed")
    assert st["reason"] == "PatchJobFailed" and "BackoffLimitExceeded" in st["message"]
    assert "MemoryError" in st["message"]
    # Failed is final for this spec: no second Job for the same digest, also on later resyncs (two
    # more re-checks of each adapter).
    await after_more(op, "vlmpool_operator_reconciles_total", 4, kind="adapter", result="ok")
    assert len(await patch_jobs(kube, ns, "bad")) == 1 and len(await patch_jobs(kube, ns, "crash")) == 1
    assert counter(await op.metrics(), "vlmpool_operator_jobs_created_total", kind="patch") == 2


async def test_a_patch_pod_admission_refuses_is_shown_while_patching(kube, kubectl, namespace, operator, tmp_path):
    """A namespace that enforces restricted Pod Security refuses the hostPath volume a file:// source
    becomes: the Job controller cannot create the patch pod and only records FailedCreate Events. The
    adapter says so while it waits (Patched Unknown PatchPodRefused, with admission's words), instead of
    an unexplained Patching until the Job's deadline."""
    ns = namespace
    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    await operator()
    await kube.create(pool_obj("pool", 0, free_port(), free_port(), free_port()), ns)
    await kube.create(adapter_obj("walled", "pool", f"file://{tmp_path}/walled"), ns)
    (job,) = await wait_until(lambda: patch_jobs(kube, ns, "walled"), what="the patch Job")

    async def refused():
        st = await adapter_status(kube, ns, "walled", phase="Patching")
        cond = next((c for c in (st or {}).get("conditions", []) if c["type"] == "Patched"), None)
        return st if cond and cond["reason"] == "PatchPodRefused" else None
    st = await wait_until(refused, timeout=60, what="Patched PatchPodRefused")
    cond = next(c for c in st["conditions"] if c["type"] == "Patched")
    assert cond["status"] == "Unknown"
    assert job["metadata"]["name"] in cond["message"] and "PodSecurity" in cond["message"], cond
    assert await kube.list(PODS, ns, label_selector=f"batch.kubernetes.io/job-name={job['metadata']['name']}") == []


async def test_missing_pool_is_a_condition_and_is_retried(kube, namespace, operator, tmp_path):
    ns = namespace
    await operator()
    await kube.create(adapter_obj("early", "later-pool", f"file://{tmp_path}/a"), ns)
    st = await wait_until(lambda: adapter_status(kube, ns, "early", phase="Pending"), what="phase Pending")
    assert st["reason"] == "PoolNotFound" and "later-pool" in st["message"]
    assert await patch_jobs(kube, ns, "early") == []
    await kube.create(pool_obj("later-pool", 0, free_port(), free_port(), free_port()), ns)
    (job,) = await wait_until(lambda: patch_jobs(kube, ns, "early"), timeout=60, what="the Job once the pool exists")
    await wait_until(lambda: adapter_status(kube, ns, "early", phase="Patching"), what="phase Patching")

    # Deleted while its Job has not run: the Job is stopped before the cleanup, then the adapter goes.
    await kube.delete(VLMADAPTERS, "early", ns)
    await wait_until(lambda: _job_gone(kube, ns, job["metadata"]["name"]), what="the unfinished Job deleted")
    (cleanup,) = await wait_until(lambda: kube.list(JOBS, ns, label_selector="app.kubernetes.io/component=cleanup"),
                                  what="the cleanup Job")
    pod = await wait_job_pod(kube, ns, cleanup["metadata"]["name"])
    assert await run_cleanup_pod(kube, pod) == 0
    await wait_until(lambda: _missing(kube, ns, "early"), what="the adapter to be gone")


async def _job_gone(kube, ns, name):
    job = await kube.get_or_none(JOBS, name, ns)
    return job is None or bool(job["metadata"].get("deletionTimestamp"))


async def test_operator_restart_mid_way_converges_without_duplicate_jobs(kube, namespace, operator, adapter_root,
                                                                          tmp_path, pod_processes):
    ns = namespace
    op = await operator()
    admin_port = free_port()
    await kube.create(pool_obj("pool", 1, admin_port, free_port(), free_port()), ns)
    for i in range(3):
        await kube.create(adapter_obj(f"a{i}", "pool", f"file://{tmp_path}/src{i}"), ns)
    for i in range(3):
        await wait_until(lambda i=i: patch_jobs(kube, ns, f"a{i}"), what=f"Job of a{i}")
    op.stop()

    # While the operator is down: Jobs finish, a pod starts, and one adapter's spec changes.
    token, ips = await start_pool_pods(kube, ns, "pool", 1, tmp_path, pod_processes)
    for i in range(2):
        (job,) = await patch_jobs(kube, ns, f"a{i}")
        await complete_patch(kube, ns, job["metadata"]["name"], adapter_root, f"a{i}", f"{i:08x}", seed=i)
    await kube.patch(VLMADAPTERS, "a2", {"spec": {"source": {"uri": f"file://{tmp_path}/src2-new"}}}, ns)

    op2 = await operator()
    for i in range(2):
        await wait_until(lambda i=i: adapter_status(kube, ns, f"a{i}", phase="Ready", loaded="1/1"),
                         what=f"a{i} Ready after the restart")
    jobs2 = await wait_until(lambda: _n(patch_jobs(kube, ns, "a2"), 2), what="a2's new Job")
    # Restart again mid-way: the resumed operator must not create any Job twice.
    op2.stop()
    op3 = await operator()
    # The resumed operator re-checked every adapter (its resume, then a resync) and created nothing.
    await after_more(op3, "vlmpool_operator_reconciles_total", 6, kind="adapter", result="ok")
    assert counter(await op3.metrics(), "vlmpool_operator_jobs_created_total") == 0
    for i in range(2):
        assert len(await patch_jobs(kube, ns, f"a{i}")) == 1
    assert len(await patch_jobs(kube, ns, "a2")) == 2
    want = (await kube.get(VLMADAPTERS, "a2", ns))["status"]["specDigest"]
    new = next(j for j in jobs2 if j["metadata"]["annotations"]["vlmpool.io/spec-digest"] == want)
    await complete_patch(kube, ns, new["metadata"]["name"], adapter_root, "a2", "0002eeee", seed=5)
    await wait_until(lambda: adapter_status(kube, ns, "a2", phase="Ready", version="0002eeee", loaded="1/1"),
                     what="a2 Ready")
    (ip,) = ips.values()
    names = sorted(a["name"] for a in (await admin_state(ip, admin_port, token))["adapters"])
    assert names == ["a0", "a1", "a2"]


async def test_pod_restart_gets_the_state_again(kube, namespace, operator, adapter_root, tmp_path, pod_processes):
    ns = namespace
    await operator(resync=600)  # no periodic resync: only the pod's restart can trigger the new push
    admin_port = free_port()
    await kube.create(pool_obj("pool", 1, admin_port, free_port(), free_port()), ns)
    await kube.create(adapter_obj("ad", "pool", f"file://{tmp_path}/src"), ns)
    (job,) = await wait_until(lambda: patch_jobs(kube, ns, "ad"), what="the Job")
    await complete_patch(kube, ns, job["metadata"]["name"], adapter_root, "ad", "00000001")
    token, ips = await start_pool_pods(kube, ns, "pool", 1, tmp_path, pod_processes)
    await wait_until(lambda: adapter_status(kube, ns, "ad", phase="Ready", loaded="1/1"), what="Ready")

    # The pod's containers restart: fresh processes know nothing; the kubelet reports restartCount 1.
    (procs,) = pod_processes
    procs.stop()
    (pod,) = await kube.list(PODS, ns, label_selector="vlmpool.io/pool=pool,app.kubernetes.io/component=server")
    (ip,) = ips.values()
    pod_processes.append(await start_pod_processes(pod, ip, token, tmp_path))
    assert (await admin_state(ip, admin_port, token))["adapters"] == []
    await report_running(kube, pod, ip, restarts=1)

    async def reloaded():
        s = await admin_state(ip, admin_port, token)
        return s if [a["state"] for a in s["adapters"]] == ["loaded"] else None
    await wait_until(reloaded, what="the state pushed again after the restart")

    # A new served name is not a new version (no Job), but it is pushed: served under the new name.
    await kube.patch(VLMADAPTERS, "ad", {"spec": {"servedName": "acme/renamed"}}, ns)

    async def renamed():
        s = await admin_state(ip, admin_port, token)
        return s if [(a["name"], a["state"]) for a in s["adapters"]] == [("acme/renamed", "loaded")] else None
    await wait_until(renamed, what="the adapter served under its new name")
    assert len(await patch_jobs(kube, ns, "ad")) == 1
    await wait_until(lambda: adapter_status(kube, ns, "ad", phase="Ready", servedName="acme/renamed"),
                     what="status with the new name")


async def test_unreachable_pod_degrades_the_pool_and_recovers(kube, namespace, operator, adapter_root, tmp_path,
                                                              pod_processes):
    ns = namespace
    await operator()
    admin_port = free_port()
    await kube.create(pool_obj("pool", 1, admin_port, free_port(), free_port()), ns)
    await kube.create(adapter_obj("ad", "pool", f"file://{tmp_path}/src"), ns)
    (job,) = await wait_until(lambda: patch_jobs(kube, ns, "ad"), what="the Job")
    await complete_patch(kube, ns, job["metadata"]["name"], adapter_root, "ad", "00000001")
    # The pod is reported Running, but nothing listens on its address yet.
    (pod,) = await wait_until(lambda: _n(kube.list(PODS, ns, label_selector="vlmpool.io/pool=pool,"
                                                   "app.kubernetes.io/component=server"), 1), what="the pod")
    ip = f"{loopback_block()}2"
    await report_running(kube, pod, ip)

    async def degraded():
        st = (await kube.get(VLMPOOLS, "pool", ns)).get("status") or {}
        c = next((c for c in st.get("conditions") or [] if c["type"] == "Degraded"), {})
        return st if c.get("status") == "True" and c.get("reason") == "PushFailed" else None
    await wait_until(degraded, what="Degraded/PushFailed")
    st = await wait_until(lambda: adapter_status(kube, ns, "ad", loaded="0/1"), what="0/1 loaded")
    assert st["phase"] == "Registering" and st["pods"][0]["state"] == "pending" and st["pods"][0]["message"]
    # The pool's Events (its Deployment, Service and EndpointSlice share the name "pool").
    events = await kube.list(EVENTS, ns, field_selector="involvedObject.name=pool,involvedObject.kind=VLMPool")
    assert "PushFailed" in {e["reason"] for e in events}
    # The Events name the operator as their source, not kopf.
    assert {(e.get("reportingComponent"), e["source"].get("component")) for e in events} == {
        ("vlmpool-operator", "vlmpool-operator")}

    # The containers come up: the operator's retry (with backoff) reaches them, nothing else needed.
    secret = await kube.get(SECRETS, "pool-admin-token", ns)
    token = base64.b64decode(secret["data"]["token"]).decode()
    pod = await kube.get(PODS, pod["metadata"]["name"], ns)
    pod_processes.append(await start_pod_processes(pod, ip, token, tmp_path))
    await wait_until(lambda: adapter_status(kube, ns, "ad", phase="Ready", loaded="1/1"), what="Ready after recovery")

    async def recovered():
        st = (await kube.get(VLMPOOLS, "pool", ns)).get("status") or {}
        c = next((c for c in st.get("conditions") or [] if c["type"] == "Degraded"), {})
        return c.get("status") == "False"
    await wait_until(recovered, what="Degraded False again")


async def test_more_ready_adapters_than_the_cpu_cache_is_a_condition_and_one_warning(
        kube, namespace, operator, adapter_root, tmp_path, pod_processes):
    """The seed warned when registered adapters passed its threshold: the pool's AdaptersExceedCpuCache is
    True (with a Warning Event, once per transition) while its Ready adapters exceed engine.maxCpuLoras,
    and False again when they fit."""
    ns = namespace
    await operator()
    admin_port = free_port()
    pool = pool_obj("pool", 1, admin_port, free_port(), free_port())
    pool["spec"]["engine"].update(maxLoras=1, maxCpuLoras=1)
    await kube.create(pool, ns)
    await start_pool_pods(kube, ns, "pool", 1, tmp_path, pod_processes)

    async def cache_cond(status):
        st = (await kube.get(VLMPOOLS, "pool", ns)).get("status") or {}
        c = next((c for c in st.get("conditions") or [] if c["type"] == "AdaptersExceedCpuCache"), None)
        return c if c and c["status"] == status else None

    for i, name in enumerate(("ad1", "ad2")):
        await kube.create(adapter_obj(name, "pool", f"file://{tmp_path}/src"), ns)
        (job,) = await wait_until(lambda n=name: patch_jobs(kube, ns, n), what=f"{name}'s Job")
        await complete_patch(kube, ns, job["metadata"]["name"], adapter_root, name, f"{i:04x}aaaa", seed=i)
        await wait_until(lambda n=name: adapter_status(kube, ns, n, phase="Ready"), what=f"{name} Ready")
        if name == "ad1":
            c = await wait_until(lambda: cache_cond("False"), what="one adapter fits maxCpuLoras 1")
            assert c["reason"] == "FitsCpuCache"
    c = await wait_until(lambda: cache_cond("True"), what="two Ready adapters exceed maxCpuLoras 1")
    assert c["reason"] == "MoreAdaptersThanCpuCache" and "2 Ready adapters exceed" in c["message"]
    assert "engine.maxCpuLoras" in c["message"]

    async def warnings():
        evs = await kube.list(EVENTS, ns, field_selector="involvedObject.name=pool,involvedObject.kind=VLMPool")
        got = [e for e in evs if e["reason"] == "MoreAdaptersThanCpuCache"]
        return got or None
    (ev,) = await wait_until(warnings, what="the Warning Event")
    assert ev["type"] == "Warning" and ev.get("count", 1) == 1  # once per transition, not per push round

    await kube.delete(VLMADAPTERS, "ad2", ns)
    await wait_until(lambda: cache_cond("False"), what="the condition cleared")
