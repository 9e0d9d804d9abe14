"""Issue #23, trust by label, on the real control plane (kube-apiserver + kube-controller-manager v1.35,
whose ReplicaSet and Job controllers make the pods), with the operator under exactly its RBAC rules:

- a bare pod carrying a pool's server labels, with a real HTTP server behind its IP on the admin port, is
  never pushed to (no token, no state) while the pool's own pods are;
- a pod carrying a patch Job's labels and an ownerReference with the Job's name but another uid, with a
  crafted termination message, sets no version: the adapter gets its Job's real result;
- a version the proxy would refuse fails its own adapter (InvalidVersion) and the pool's other adapters
  are still pushed and loaded;
- the chart's ValidatingAdmissionPolicies refuse a tenant's pod with vlmpool's labels, adding them to a pod,
  and a workload whose pod template carries them, while the operator's Deployment and Jobs and their pods
  are admitted (a pool comes up, a patch Job completes).

The forged pods of the first three are created as the admin, who is not subject to the policy here (no
policy is bound in their namespaces): what the operator does with such a pod is what is tested.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from vlmtest.operator import (
    BASE,
    NODE,
    admin_state,
    after_more,
    counter,
    ensure_node,
    free_port,
    loopback_block,
    report_running,
    report_terminated,
    start_pod_processes,
    wait_job_condition,
    wait_job_pod,
    write_adapter,
)

from vlmpool.controller import rbac
from vlmpool.kube.client import DEPLOYMENTS, EVENTS, JOBS, PODS, REPLICASETS, SECRETS, VLMADAPTERS
from vlmpool.manifests.common import pool_labels, server_label_selector
from vlmpool.names import API_VERSION
from vlmpool.testing.waiting import wait_until

pytestmark = pytest.mark.apiserver

REPO = Path(__file__).resolve().parents[2]
HOLD = "vlmpool.io/test-hold"  # keeps a forged pod listed after the garbage collector deletes it


def pool_obj(name: str, replicas: int, admin_port: int) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": name},
            "spec": {"model": {"name": BASE, "family": "qwen2_5_vl"}, "replicas": replicas,
                     "engine": {"port": free_port(), "gpus": 0},
                     "proxy": {"port": free_port(), "adminPort": admin_port, "concurrency": 4}}}


def adapter_obj(name: str, pool: str) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VLMAdapter", "metadata": {"name": name},
            "spec": {"poolRef": {"name": pool}, "source": {"uri": "https://example.com/a.tgz"}}}


def ok_message(root: Path, adapter: str, version: str) -> str:
    return json.dumps({"ok": True, "version": version, "path": f"{root}/{adapter}/versions/{version}",
                       "tensorsKept": 8, "warnings": []})


@pytest.fixture
def recorder():
    """Real HTTP servers on loopback that record every request (method, path, Authorization) and answer
    404: what a forged pod's proxy would see."""
    servers: list[tuple[ThreadingHTTPServer, list]] = []

    def start(ip: str, port: int) -> list:
        seen: list = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                seen.append((self.command, self.path, self.headers.get("Authorization"), body[:200]))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PUT = do_POST = _any

        srv = ThreadingHTTPServer((ip, port), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append((srv, seen))
        return seen

    yield start
    for srv, _ in servers:
        srv.shutdown()
        srv.server_close()


async def start_pool_pods(kube, ns, pool, n, tmp_path, pod_processes):
    """Play the kubelet for the pool's n pods (made by the real ReplicaSet controller): real processes."""
    async def n_pods():
        pods = await kube.list(PODS, ns, label_selector=server_label_selector(pool))
        return pods if len(pods) == n else None
    pods = await wait_until(n_pods, what=f"{n} pods of {pool}")
    secret = await wait_until(lambda: kube.get(SECRETS, f"{pool}-admin-token", ns), what="the token Secret")
    token = base64.b64decode(secret["data"]["token"]).decode()
    block = loopback_block()
    ips = {}
    for i, pod in enumerate(sorted(pods, key=lambda p: p["metadata"]["name"])):
        ip = f"{block}{i + 2}"
        pod_processes.append(await start_pod_processes(pod, ip, token, tmp_path))
        await report_running(kube, pod, ip)
        ips[pod["metadata"]["name"]] = ip
    return token, ips, block


def chain_reads(op, ns: str, pool: str) -> int:
    """How often the operator read the pool's ReplicaSet chain (one list of the Deployment by name and one of
    the pool's ReplicaSets each), from its DEBUG log."""
    return op.log_path.read_text().count(f"pool {ns}/{pool}: ReplicaSet chain read")


async def patch_job(kube, ns, adapter):
    jobs = await kube.list(JOBS, ns, label_selector=f"vlmpool.io/adapter={adapter}")
    return jobs[0] if jobs else None


async def status(kube, ns, name) -> dict:
    return (await kube.get(VLMADAPTERS, name, ns)).get("status") or {}


async def pushes(op) -> float:
    return counter(await op.metrics(), "vlmpool_operator_pushes_total")


async def test_a_bare_pod_with_a_pools_labels_gets_no_token_and_no_state(operator, kube, namespace, tmp_path,
                                                                         pod_processes, recorder):
    ns = namespace
    root = tmp_path / "adapters"
    await ensure_node(kube)
    op = await operator()
    admin_port = free_port()
    await kube.create(pool_obj("vision", 1, admin_port), ns)
    token, ips, block = await start_pool_pods(kube, ns, "vision", 1, tmp_path, pod_processes)
    real_ip = next(iter(ips.values()))

    # The forged pod: the pool's labels (server labels included), no owner, a proxy that records.
    forged_ip = f"{block}99"
    seen = recorder(forged_ip, admin_port)
    forged = await kube.create({"apiVersion": "v1", "kind": "Pod",
                                "metadata": {"name": "vision-forged", "labels": pool_labels("vision")},
                                "spec": {"containers": [{"name": "proxy", "image": "attacker/proxy:1"}]}}, ns)
    await report_running(kube, forged, forged_ip)
    # Another: the pool's labels, owned by a real ReplicaSet (with the pool's labels) that a Deployment
    # controls, not the pool's (a paused one: it makes no ReplicaSet of its own). The pod is created bound
    # to the node, so that the ReplicaSet keeps it and drops the unscheduled pod it made itself.
    impostor_ip = f"{block}98"
    seen_rs = recorder(impostor_ip, admin_port)
    tpl = {"metadata": {"labels": {"app": "impostor"}},
           "spec": {"containers": [{"name": "proxy", "image": "attacker/proxy:1"}]}}
    fake = await kube.request("POST", DEPLOYMENTS.path(ns), body={
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "vision-fake"},
        "spec": {"paused": True, "replicas": 1, "selector": {"matchLabels": {"app": "impostor"}}, "template": tpl}})
    rs = await kube.request("POST", REPLICASETS.path(ns), body={
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {
            "name": "vision-impostor", "labels": {**pool_labels("vision"), "app": "impostor"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "vision-fake",
                                 "uid": fake["metadata"]["uid"], "controller": True}]},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "impostor"}}, "template": tpl}})
    impostor = await kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "vision-impostor-x", "labels": {**pool_labels("vision"), "app": "impostor"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "vision-impostor",
                             "uid": rs["metadata"]["uid"], "controller": True}]},
        "spec": {"nodeName": NODE, "containers": [{"name": "proxy", "image": "attacker/proxy:1"}]}}, ns)
    await report_running(kube, impostor, impostor_ip)

    await kube.create(adapter_obj("cats", "vision"), ns)
    job = await wait_until(lambda: patch_job(kube, ns, "cats"), what="the patch Job")
    pod = await wait_job_pod(kube, ns, job["metadata"]["name"])
    write_adapter(root / "cats" / "versions" / "0000000a")
    await report_terminated(kube, pod, 0, ok_message(root, "cats", "0000000a"))

    async def pushed_or_leaked():
        st = await status(kube, ns, "cats")
        return seen or seen_rs or (st.get("phase") == "Ready" and st)
    got = await wait_until(pushed_or_leaked, timeout=90, what="cats Ready, or a request at a forged pod")
    assert seen == [], f"the forged pod was sent {seen}"
    assert seen_rs == [], f"the impostor ReplicaSet's pod was sent {seen_rs}"
    assert (await kube.get(PODS, "vision-impostor-x", ns))["metadata"].get("deletionTimestamp") is None
    assert got["loaded"] == "1/1" and [p["pod"] for p in got["pods"]] == list(ips), got

    async def warned():
        events = [e for e in await kube.list(EVENTS, ns) if e.get("reason") == "UntrustedPod"]
        return events if len(events) == 2 else None
    events = await wait_until(warned, what="an UntrustedPod Event per forged pod")
    assert all(e["type"] == "Warning" for e in events), events
    assert any("vision-forged " in e["message"] and "(no controller)" in e["message"] for e in events), events
    assert any("vision-impostor-x " in e["message"] and "ReplicaSet vision-impostor" in e["message"]
               for e in events), events
    # the real pod holds the state (it got the token), the forged one got nothing, now or on a resync
    state = await admin_state(real_ip, admin_port, token)
    assert [a["name"] for a in state["adapters"]] == ["cats"]
    # The chain's cost with a forged pod that names a foreign ReplicaSet: one re-read per resync period
    # (3 s here), however many push rounds run meanwhile (the apiserver's own request counter cannot tell:
    # the namespace controller lists ReplicaSets while it deletes other tests' namespaces).
    lists0, pushes0, t0 = chain_reads(op, ns, "vision"), await pushes(op), time.monotonic()
    await kube.patch(VLMADAPTERS, "cats", {"spec": {"servedName": "acme/cats"}}, ns)

    async def renamed():
        st = await admin_state(real_ip, admin_port, token)
        return [a["name"] for a in st["adapters"]] == ["acme/cats"]
    await wait_until(renamed, what="the renamed adapter pushed to the real pod")
    await after_more(op, "vlmpool_operator_pushes_total", 4)  # a few more rounds (resyncs)
    lists, rounds, elapsed = (chain_reads(op, ns, "vision") - lists0, await pushes(op) - pushes0,
                              time.monotonic() - t0)
    print(f"ReplicaSet chain reads {lists} in {elapsed:.1f} s for {rounds:.0f} push rounds to the 1 pod "
          "(forged pods present)")
    assert lists <= elapsed / 3.0 + 1, (lists, elapsed, rounds)
    assert seen == [] and seen_rs == [], f"the forged pods were sent {seen} {seen_rs}"


async def test_a_forged_patch_pod_sets_no_version_and_a_malformed_version_fails_its_adapter_alone(
        operator, kube, namespace, tmp_path, pod_processes):
    ns = namespace
    root = tmp_path / "adapters"
    await ensure_node(kube)
    op = await operator()
    admin_port = free_port()
    await kube.create(pool_obj("vision", 1, admin_port), ns)
    token, ips, _ = await start_pool_pods(kube, ns, "vision", 1, tmp_path, pod_processes)
    real_ip = next(iter(ips.values()))

    await kube.create(adapter_obj("victim", "vision"), ns)
    job = await wait_until(lambda: patch_job(kube, ns, "victim"), what="victim's patch Job")
    real = await wait_job_pod(kube, ns, job["metadata"]["name"])
    # A pod with the Job's labels and name in a controller ownerReference, another uid, a crafted message.
    meta = real["metadata"]
    forged = await kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{job['metadata']['name']}-forged", "labels": dict(meta["labels"]), "finalizers": [HOLD],
        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                             "uid": str(uuid.uuid4()), "controller": True}]},
        # bound at creation: the garbage collector deletes it at once (no owner of that uid), the hold keeps it
        "spec": {"nodeName": NODE,
                 "containers": [{"name": real["spec"]["containers"][0]["name"], "image": "attacker/patch:1"}]}}, ns)
    try:
        write_adapter(root / "victim" / "versions" / "deadbeef", seed=7)
        await report_terminated(kube, forged, 0, ok_message(root, "victim", "deadbeef"))

        async def decided():
            st = await status(kube, ns, "victim")
            if st.get("version"):
                return ("recorded", st["version"])
            n = counter(await op.metrics(), "vlmpool_operator_errors_total", kind="adapter", reason="UntrustedPatchPod")
            return ("ignored", None) if n >= 1 else None
        assert await wait_until(decided, what="the forged pod handled") == ("ignored", None)
        assert (await kube.get(JOBS, job["metadata"]["name"], ns)).get("status", {}).get("succeeded") in (None, 0)

        # Two more adapters: one whose (real) Job reports a version the proxy would refuse.
        for name in ("good", "bad"):
            await kube.create(adapter_obj(name, "vision"), ns)
        jobs = {n: await wait_until(lambda n=n: patch_job(kube, ns, n), what=f"{n}'s Job") for n in ("good", "bad")}
        pods = {n: await wait_job_pod(kube, ns, j["metadata"]["name"]) for n, j in jobs.items()}
        bad_version = "f" * 200  # past the proxy's length bound: it would refuse the whole state
        await report_terminated(kube, pods["bad"], 0, ok_message(root, "bad", bad_version))
        for name, p, version in (("victim", real, "0000000a"), ("good", pods["good"], "0000000b")):
            write_adapter(root / name / "versions" / version)
            await report_terminated(kube, p, 0, ok_message(root, name, version))

        async def settled():
            sts = {n: await status(kube, ns, n) for n in ("victim", "good", "bad")}
            return sts if all(s.get("phase") in ("Ready", "Failed") for s in sts.values()) else None
        sts = await wait_until(settled, timeout=90, what="every adapter Ready or Failed")
        assert sts["bad"]["phase"] == "Failed" and sts["bad"]["reason"] == "InvalidVersion", sts["bad"]
        assert not sts["bad"].get("version")
        assert sts["victim"]["version"] == "0000000a" and sts["victim"]["phase"] == "Ready", sts["victim"]
        assert sts["good"]["version"] == "0000000b" and sts["good"]["loaded"] == "1/1", sts["good"]
        state = await admin_state(real_ip, admin_port, token)
        assert sorted((a["name"], a["version"]) for a in state["adapters"]) == [("good", "0000000b"),
                                                                               ("victim", "0000000a")]
        await wait_job_condition(kube, ns, job["metadata"]["name"], "Complete")

        # Such a version recorded anyway (an older operator, or whoever may write the status) is left out
        # of the push for its adapter alone: the others are still pushed (a rename arrives).
        await kube.patch(VLMADAPTERS, "bad", {"status": {
            "version": bad_version, "path": f"{root}/bad/versions/{bad_version}"}}, ns, subresource="status")

        async def left_out():
            st = await status(kube, ns, "bad")
            loaded = next((c for c in st.get("conditions") or [] if c["type"] == "Loaded"), {})
            return loaded if loaded.get("reason") == "InvalidVersion" else None
        loaded = await wait_until(left_out, what="bad's recorded version left out of the push")
        assert "is not of the form the patcher publishes" in loaded["message"], loaded
        lists0, pushes0 = chain_reads(op, ns, "vision"), await pushes(op)
        await kube.patch(VLMADAPTERS, "good", {"spec": {"servedName": "acme/good"}}, ns)

        async def renamed():
            st = await admin_state(real_ip, admin_port, token)
            return sorted(a["name"] for a in st["adapters"]) == ["acme/good", "victim"]
        await wait_until(renamed, what="the other adapters still pushed")
        await after_more(op, "vlmpool_operator_pushes_total", 4)
        # the pool's pods name its ReplicaSet, known since the first push: the chain costs no request
        lists, rounds = chain_reads(op, ns, "vision") - lists0, await pushes(op) - pushes0
        print(f"ReplicaSet chain reads {lists} for {rounds:.0f} push rounds to the 1 pod (steady state)")
        assert lists == 0 and rounds >= 4, (lists, rounds)
    finally:
        await kube.patch(PODS, forged["metadata"]["name"], {"metadata": {"finalizers": None}}, ns)


# ------------------------------------------------------------------ the admission policy

def _apply_pod_policy(control_plane, namespace: str, operator_user: str) -> list[tuple[str, str]]:
    """The chart's two policies on labelled pods and pod templates as `helm template` renders them (the
    operator being the suite's operator user), their bindings limited to `namespace` (the suite shares one
    cluster: other tests' namespaces keep their bare labelled pods)."""
    helm = control_plane.bin_dir / "helm"
    out = subprocess.run([str(helm), "template", "vlmpool", str(REPO / "charts" / "vlmpool"), "-n", "vlmpool-system",
                          "--set", f"admissionPolicy.operatorUser={operator_user}",
                          "--show-only", "templates/podlabelpolicy.yaml"], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    # the pods' policy last: once it is seen active (its bindings are watched in order) the other is too
    policies = sorted((d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"),
                      key=lambda d: d["metadata"]["name"].endswith("-labelled-pods"))
    bindings = {d["spec"]["policyName"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"}
    assert len(policies) == 2 and sorted(bindings) == sorted(p["metadata"]["name"] for p in policies), docs
    applied = []
    for policy, binding in ((p, bindings[p["metadata"]["name"]]) for p in policies):
        name = f"{policy['metadata']['name']}-{namespace}"
        policy["metadata"]["name"] = binding["metadata"]["name"] = binding["spec"]["policyName"] = name
        binding["spec"]["matchResources"] = {"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": namespace}}}
        for d in (policy, binding):
            control_plane.kubectl("apply", "-f", "-", input=json.dumps(d))
        applied += [("validatingadmissionpolicybinding", name), ("validatingadmissionpolicy", name)]
    return applied


def _pod_tenant(control_plane, namespace: str, user: str) -> Path:
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": user, "namespace": namespace},
            "rules": [{"apiGroups": ["", "apps", "batch"],
                       "resources": ["pods", "pods/ephemeralcontainers", "deployments", "replicasets", "jobs",
                                     "cronjobs"],
                       "verbs": ["get", "list", "create", "update", "patch", "delete"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": user, "namespace": namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
               "subjects": [rbac.subject_user(user)]}
    for d in (role, binding):
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(d))
    return control_plane.kubeconfig_for(user, namespace=namespace)


async def test_only_the_controllers_may_make_pods_with_vlmpool_labels(control_plane, operator, kube, namespace,
                                                                      tmp_path, operator_user):
    ns = namespace
    policy = _apply_pod_policy(control_plane, ns, operator_user)
    try:
        tenant = _pod_tenant(control_plane, ns, "tenant-pods")

        def pod(name: str, labels: dict) -> str:
            return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                               "spec": {"containers": [{"name": "proxy", "image": "attacker/proxy:1"}]}})

        def as_tenant(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
            return control_plane.kubectl("-n", ns, *args, input=input, kubeconfig=tenant, check=False)

        def refused_once_active() -> str | None:
            res = as_tenant("create", "-f", "-", input=pod("vision-forged", pool_labels("vision")))
            if res.returncode == 0:  # the policy is not active yet: undo and try again
                control_plane.kubectl("-n", ns, "delete", "pod", "vision-forged", "--wait=false", check=False)
                return None
            return res.stderr
        err = await wait_until(lambda: _async(refused_once_active), timeout=30,
                               what="the ValidatingAdmissionPolicy to refuse")
        assert "carries vlmpool labels" in err and f"{ns}/vision-forged" in err and "tenant-pods" in err, err
        assert "only the ReplicaSet and Job controllers" in err
        # Each of the labels alone is refused; a pod without them is the tenant's business.
        for labels in ({"vlmpool.io/pool": "vision", "app.kubernetes.io/component": "server"},
                       {"app.kubernetes.io/managed-by": "vlmpool-operator", "app.kubernetes.io/component": "patch"},
                       {"vlmpool.io/adapter": "cats"}):
            res = as_tenant("create", "-f", "-", input=pod("labelled", labels))
            assert res.returncode != 0 and "carries vlmpool labels" in res.stderr, (labels, res.stderr)
        res = as_tenant("create", "-f", "-", input=pod("plain", {"app": "mine"}))
        assert res.returncode == 0, res.stderr
        # Adding the labels to a pod is refused too.
        for label in ("vlmpool.io/pool=vision", "app.kubernetes.io/managed-by=vlmpool-operator"):
            res = as_tenant("label", "pod", "plain", label)
            assert res.returncode != 0 and "carries vlmpool labels" in res.stderr, (label, res.stderr)

        # Nor may the tenant make a controller create such pods: a workload whose template carries them.
        tpl = {"metadata": {"labels": pool_labels("vision")},
               "spec": {"containers": [{"name": "proxy", "image": "attacker/proxy:1"}]}}
        workloads = [
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "vision-fake"},
             "spec": {"selector": {"matchLabels": pool_labels("vision")}, "template": tpl}},
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "vision-fake"},  # no labels of its own
             "spec": {"selector": {"matchLabels": pool_labels("vision")}, "template": tpl}},
            {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "cats-patch-fake"},
             "spec": {"template": {**tpl, "spec": {**tpl["spec"], "restartPolicy": "Never"}}}},
        ]
        for w in workloads:
            res = as_tenant("create", "-f", "-", input=json.dumps(w))
            assert res.returncode != 0 and "its pod template carries vlmpool labels" in res.stderr, res.stderr
            assert f"{w['kind']} {ns}/{w['metadata']['name']}" in res.stderr and "tenant-pods" in res.stderr

        # The Deployment's and the Job's pods are admitted: the pool comes up, a patch Job completes.
        root = tmp_path / "adapters"
        await operator()
        await kube.create(pool_obj("vision", 1, free_port()), ns)
        await kube.create(adapter_obj("cats", "vision"), ns)
        server = (await wait_until(lambda: kube.list(PODS, ns, label_selector=server_label_selector("vision")),
                                   what="the pool's pod"))[0]
        job = await wait_until(lambda: patch_job(kube, ns, "cats"), what="the patch Job")
        jpod = await wait_job_pod(kube, ns, job["metadata"]["name"])
        write_adapter(root / "cats" / "versions" / "0000000a")
        await report_terminated(kube, jpod, 0, ok_message(root, "cats", "0000000a"))
        # the Job controller removes its tracking finalizer from the pod (an UPDATE it may make)
        await wait_job_condition(kube, ns, job["metadata"]["name"], "Complete")

        async def recorded():
            return (await status(kube, ns, "cats")).get("version") == "0000000a"
        await wait_until(recorded, what="the Job's version recorded")
        # never refused by the policies (a fresh namespace may give other, transient FailedCreates: its
        # default ServiceAccount comes a moment later)
        refused = [e["message"] for e in await kube.list(EVENTS, ns) if e.get("reason") == "FailedCreate"
                   and ("vlmpool labels" in e["message"] or "ValidatingAdmissionPolicy" in e["message"])]
        assert refused == [], refused
        # A tenant may not change the controllers' pods either.
        res = as_tenant("label", "pod", server["metadata"]["name"], "team=a")
        assert res.returncode != 0 and "carries vlmpool labels" in res.stderr, res.stderr
        res = as_tenant("annotate", "pod", jpod["metadata"]["name"], "x=y")
        assert res.returncode != 0 and "carries vlmpool labels" in res.stderr, res.stderr
        # nor add a debug container to one (it could mount the pod's admin token volume)
        res = as_tenant("debug", server["metadata"]["name"], "--image=attacker/debug:1", "--container=dbg")
        assert res.returncode != 0 and "carries vlmpool labels" in res.stderr, res.stderr
        # nor take the labels off one (the ReplicaSet would release it, and it keeps running)
        res = as_tenant("label", "pod", server["metadata"]["name"], "vlmpool.io/pool-", "app.kubernetes.io/managed-by-")
        assert res.returncode != 0 and "carries vlmpool labels" in res.stderr, res.stderr
    finally:
        for kind, name in policy:
            control_plane.kubectl("delete", kind, name, "--wait=false", check=False)


async def _async(fn):
    return fn()
