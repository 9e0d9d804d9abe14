"""Issue #11 items 2, 3, 9 and 10 on the real control plane (kube-apiserver + kube-controller-manager
v1.35), as a hostile tenant would try them: the operator runs as `vlmpool operator` under exactly the
rules of vlmpool.controller.rbac, tenants are users with their own Roles, and the chart's
ValidatingAdmissionPolicy is the one `helm template` renders."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from vlmpool.api.objects import Adapter, Pool
from vlmpool.controller import rbac
from vlmpool.controller.reconciler import pool_token
from vlmpool.kube.client import EVENTS, JOBS, PODS, SECRETS, VLMADAPTERS, VLMPOOLS
from vlmpool.manifests import adapter as MA
from vlmpool.names import API_VERSION, GROUP
from vlmpool.testing.waiting import wait_for, wait_until

pytestmark = pytest.mark.apiserver

REPO = Path(__file__).resolve().parents[2]
BASE = "Qwen/Qwen2.5-VL-3B-Instruct"
TOKEN_KEY = "vlmpool-operator-tests-token-key"  # the key tests/vlmtest/operator.py gives every operator


def pool_obj(name: str = "vision", **spec) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": name},
            "spec": {"model": {"name": BASE, "family": "qwen2_5_vl"}, **spec}}


def adapter_obj(name: str, uri: str, secret: str | None = None, pool: str = "vision") -> dict:
    source = {"uri": uri, **({"credentialsSecret": {"name": secret}} if secret else {})}
    return {"apiVersion": API_VERSION, "kind": "VLMAdapter", "metadata": {"name": name},
            "spec": {"poolRef": {"name": pool}, "source": source}}


# ------------------------------------------------------------------ item 9: no Secret reads

def test_the_operator_service_account_cannot_read_tenant_secrets(control_plane, crds, namespace):
    control_plane.kubectl("create", "namespace", "vlmpool-system", check=False)
    for docs in rbac.deploy_documents("vlmpool-system").values():
        for doc in docs:
            control_plane.kubectl("apply", "-f", "-", input=json.dumps(doc))
    sa = f"system:serviceaccount:vlmpool-system:{rbac.SERVICE_ACCOUNT}"

    def can(verb: str) -> str:
        res = control_plane.kubectl("auth", "can-i", verb, "secrets", "--as", sa, "-n", namespace, check=False)
        return res.stdout.strip()

    assert [can(v) for v in ("get", "list", "watch")] == ["no", "no", "no"]
    assert [can(v) for v in ("create", "patch")] == ["yes", "yes"]  # the pools' token Secrets


async def test_the_operator_derives_pool_tokens_without_reading_them(operator, kube, namespace):
    await operator()
    pool = await kube.create(pool_obj(replicas=0), namespace)
    secret = await wait_until(lambda: kube.get_or_none(SECRETS, "vision-admin-token", namespace), what="the token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert token == pool_token(TOKEN_KEY.encode(), pool)


# ------------------------------------------------------------------ item 2: file:// sources

async def test_file_sources_are_refused_before_any_job_exists(operator, kube, namespace):
    await operator()
    await kube.create(pool_obj(replicas=0), namespace)
    await kube.create(adapter_obj("kubelet", "file:///var/lib/kubelet"), namespace)

    async def refused():
        a = await kube.get(VLMADAPTERS, "kubelet", namespace)
        st = a.get("status") or {}
        return st if st.get("reason") == "SourceNotAllowed" else None
    st = await wait_until(refused, what="the adapter refused")
    assert st["phase"] == "Failed" and "--allow-host-path" in st["message"]
    assert await kube.list(JOBS, namespace) == [] and await kube.list(PODS, namespace) == []


async def test_a_refused_file_source_is_patched_once_its_directory_is_allowed(operator, kube, namespace,
                                                                                tmp_path):
    allowed = tmp_path / "node-adapters"
    op = await operator()
    await kube.create(pool_obj(replicas=0), namespace)
    await kube.create(adapter_obj("later", f"file://{allowed}/a"), namespace)

    async def reason():
        return ((await kube.get(VLMADAPTERS, "later", namespace)).get("status") or {}).get("reason")
    await wait_until(lambda: _is(reason(), "SourceNotAllowed"), what="the refusal")
    op.stop()
    await operator(host_paths=(str(allowed),))
    jobs = await wait_until(lambda: kube.list(JOBS, namespace), what="the patch Job")
    assert [j["metadata"]["labels"][MA.L_ADAPTER] for j in jobs] == ["later"]
    await wait_until(lambda: _is(reason(), "PatchJobRunning"), what="the adapter patching")


async def _is(coro, want):
    return (await coro) == want


async def test_file_sources_outside_the_allowed_directories_are_refused(operator, kube, namespace, tmp_path):
    allowed = tmp_path / "node-adapters"
    allowed.mkdir()
    await operator(host_paths=(str(allowed),))
    await kube.create(pool_obj(replicas=0), namespace)
    # ('..' is refused by the CRD already.) A sibling directory sharing the allowed prefix:
    await kube.create(adapter_obj("escape", f"file://{allowed}-evil/a"), namespace)
    await kube.create(adapter_obj("ok", f"file://{allowed}/a"), namespace)

    async def job_of_ok():
        jobs = {j["metadata"]["labels"][MA.L_ADAPTER]: j for j in await kube.list(JOBS, namespace)}
        return jobs.get("ok")
    job = await wait_until(job_of_ok, what="the allowed adapter's Job")
    vols = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert vols["source"]["hostPath"]["path"] == f"{allowed}/a"
    st = (await kube.get(VLMADAPTERS, "escape", namespace)).get("status") or {}
    assert st.get("reason") == "SourceNotAllowed"
    assert [j["metadata"]["labels"][MA.L_ADAPTER] for j in await kube.list(JOBS, namespace)] == ["ok"]


# ------------------------------------------------------------------ item 3: credentialsSecret

def _apply_admission_policy(control_plane) -> str:
    helm = control_plane.bin_dir / "helm"
    out = subprocess.run([str(helm), "template", "vlmpool", str(REPO / "charts" / "vlmpool"), "-n", "vlmpool-system",
                          "--show-only", "templates/admissionpolicy.yaml"], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("ValidatingAdmissionPolicy", "vlmpool-operator-credentials-secret"),
        ("ValidatingAdmissionPolicy", "vlmpool-operator-pool-references"),
        ("ValidatingAdmissionPolicyBinding", "vlmpool-operator-credentials-secret"),
        ("ValidatingAdmissionPolicyBinding", "vlmpool-operator-pool-references")]
    for d in docs:
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(d))
    return docs[0]["metadata"]["name"]


def _tenant(control_plane, namespace: str, user: str, read_secrets: bool, kind: str = "vlmadapters") -> Path:
    rules = [{"apiGroups": [GROUP], "resources": [kind],
              "verbs": ["get", "list", "create", "update", "patch", "delete"]}]
    if read_secrets:
        rules.append({"apiGroups": [""], "resources": ["secrets", "persistentvolumeclaims"], "verbs": ["get"]})
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": user, "namespace": namespace}, "rules": rules}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": user, "namespace": namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
               "subjects": [rbac.subject_user(user)]}
    for d in (role, binding):
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(d))
    return control_plane.kubeconfig_for(user, namespace=namespace)


def test_a_tenant_cannot_name_a_secret_they_cannot_read(control_plane, crds, namespace):
    _apply_admission_policy(control_plane)
    control_plane.kubectl("-n", namespace, "create", "secret", "generic", "team-b-hf", "--from-literal=HF_TOKEN=hf_x")
    tenant = _tenant(control_plane, namespace, "tenant-a", read_secrets=False)
    owner = _tenant(control_plane, namespace, "owner-b", read_secrets=True)

    def apply(kc: Path, obj: dict, verb: str = "create") -> subprocess.CompletedProcess:
        return control_plane.kubectl("-n", namespace, verb, "-f", "-", input=json.dumps(obj), kubeconfig=kc,
                                     check=False)

    # The tenant's Role lets them create VLMAdapters and nothing else: the policy is what refuses.
    probe = adapter_obj("probe", "https://example.com/a.tgz", secret="team-b-hf")

    def refused_once_active() -> str | None:
        res = apply(tenant, probe)
        if res.returncode == 0:  # the policy is not active yet: undo and try again
            control_plane.kubectl("-n", namespace, "delete", "vlmadapter", "probe", "--wait=false", check=False)
            return None
        return res.stderr
    err = wait_for(refused_once_active, 30, what="the ValidatingAdmissionPolicy to refuse")
    assert "may not get Secret" in err and f"{namespace}/team-b-hf" in err and "tenant-a" in err, err

    assert apply(tenant, adapter_obj("mine", "https://example.com/a.tgz")).returncode == 0
    res = apply(owner, adapter_obj("theirs", "https://example.com/a.tgz", secret="team-b-hf"))
    assert res.returncode == 0, res.stderr

    # Pointing an adapter that names the Secret at another host needs the right to read it too.
    hijack = {"spec": {"source": {"uri": "https://evil.example.com/a.tgz", "credentialsSecret": {"name": "team-b-hf"}}}}
    res = control_plane.kubectl("-n", namespace, "patch", "vlmadapter", "theirs", "--type=merge", "-p",
                                json.dumps(hijack), kubeconfig=tenant, check=False)
    assert res.returncode != 0 and "may not get Secret" in res.stderr
    # Adding the Secret to one's own adapter likewise.
    res = control_plane.kubectl("-n", namespace, "patch", "vlmadapter", "mine", "--type=merge", "-p",
                                json.dumps(hijack), kubeconfig=tenant, check=False)
    assert res.returncode != 0 and "may not get Secret" in res.stderr
    # Edits that leave the source alone pass (the operator's finalizer/annotation patches are such).
    res = control_plane.kubectl("-n", namespace, "label", "vlmadapter", "theirs", "team=b", kubeconfig=tenant,
                                check=False)
    assert res.returncode == 0, res.stderr


def test_a_tenant_cannot_name_a_secret_or_claim_they_cannot_read_in_a_pool(control_plane, crds, namespace):
    """Issue 23: spec.proxy.apiKeySecret (mounted into pods whose images the pool's author picks),
    spec.adapterVolume.claimName and spec.model.weights.claimName are held to the author's own `get`."""
    _apply_admission_policy(control_plane)
    control_plane.kubectl("-n", namespace, "create", "secret", "generic", "team-b-keys", "--from-literal=k=sk-b")
    tenant = _tenant(control_plane, namespace, "pool-tenant-a", read_secrets=False, kind="vlmpools")
    owner = _tenant(control_plane, namespace, "pool-owner-b", read_secrets=True, kind="vlmpools")

    def create(kc: Path, obj: dict) -> subprocess.CompletedProcess:
        return control_plane.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(obj), kubeconfig=kc,
                                     check=False)

    def patch(kc: Path, name: str, body: dict) -> subprocess.CompletedProcess:
        return control_plane.kubectl("-n", namespace, "patch", "vlmpool", name, "--type=merge", "-p",
                                     json.dumps(body), kubeconfig=kc, check=False)

    keys = pool_obj("keys", replicas=0, proxy={"apiKeySecret": "team-b-keys"})

    def refused_once_active() -> str | None:
        res = create(tenant, keys)
        if res.returncode == 0:  # the policy is not active yet: undo and try again
            control_plane.kubectl("-n", namespace, "delete", "vlmpool", "keys", "--wait=false", check=False)
            return None
        return res.stderr
    err = wait_for(refused_once_active, 30, what="the pool ValidatingAdmissionPolicy to refuse")
    assert "spec.proxy.apiKeySecret" in err and f"may not get Secret {namespace}/team-b-keys" in err, err
    assert "pool-tenant-a" in err
    for spec, field, what in (
            ({"adapterVolume": {"claimName": "team-b-adapters"}}, "spec.adapterVolume.claimName", "team-b-adapters"),
            ({"model": {"name": BASE, "family": "qwen2_5_vl", "weights": {"claimName": "team-b-weights"}}},
             "spec.model.weights.claimName", "team-b-weights")):
        res = create(tenant, pool_obj("claims", replicas=0, **spec))
        assert res.returncode != 0, res.stdout
        assert field in res.stderr and f"may not get PersistentVolumeClaim {namespace}/{what}" in res.stderr, res.stderr

    # One who may read them is admitted; a pool naming nothing is admitted for anyone.
    theirs = pool_obj("theirs", replicas=0, proxy={"apiKeySecret": "team-b-keys"},
                      adapterVolume={"claimName": "team-b-adapters"},
                      model={"name": BASE, "family": "qwen2_5_vl", "weights": {"claimName": "team-b-weights"}})
    res = create(owner, theirs)
    assert res.returncode == 0, res.stderr
    res = create(tenant, pool_obj("plain", replicas=0))
    assert res.returncode == 0, res.stderr

    # Updates that leave the references as they were pass (scaling, labels, the operator's patches) ...
    assert patch(tenant, "theirs", {"spec": {"replicas": 1}}).returncode == 0
    res = control_plane.kubectl("-n", namespace, "label", "vlmpool", "theirs", "team=b", kubeconfig=tenant,
                                check=False)
    assert res.returncode == 0, res.stderr
    # ... changing one, or adding one to one's own pool, needs the right to read it.
    for name in ("theirs", "plain"):
        res = patch(tenant, name, {"spec": {"proxy": {"apiKeySecret": "team-b-other"}}})
        assert res.returncode != 0 and "may not get Secret" in res.stderr, res.stderr
        res = patch(tenant, name, {"spec": {"model": {"weights": {"claimName": "team-b-other"}}}})
        assert res.returncode != 0 and "may not get PersistentVolumeClaim" in res.stderr, res.stderr


# ------------------------------------------------------------------ item 10: Pod Security `restricted`

async def test_pool_and_job_pods_are_admitted_in_a_restricted_namespace(control_plane, operator, kube, namespace):
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                          "pod-security.kubernetes.io/enforce-version=latest", "--overwrite")
    await operator(extra_args=("--source-allow", "10.20.0.0/16"))
    pool = await kube.create(pool_obj(replicas=1), namespace)
    adapter = await kube.create(adapter_obj("inv", "https://example.com/a.tgz"), namespace)
    # cleanup and prune Jobs as the operator builds them (their turn needs running pods; the
    # Jobs controller creating their pods is what the profile judges).
    a, p = Adapter.parse(adapter), Pool.parse(pool)
    for job in (MA.cleanup_job(a, p), MA.prune_job(a, p, "v1")):
        job["metadata"].pop("ownerReferences")
        await kube.create(job, namespace)

    async def pods_by_component():
        pods = await kube.list(PODS, namespace)
        got = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
        return got if {"server", "patch", "cleanup", "prune"} <= got else None
    try:
        await wait_until(pods_by_component, timeout=90, what="pods of the pool and of the three Jobs")
    finally:
        failed = [e["message"] for e in await kube.list(EVENTS, namespace) if e.get("reason") == "FailedCreate"]
        assert failed == [], failed
    patch = next(j for j in await kube.list(JOBS, namespace) if j["metadata"]["labels"].get(
        "app.kubernetes.io/component") == "patch")
    env = patch["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "VLMPOOL_SOURCE_ALLOW", "value": "10.20.0.0/16"} in env
    assert (await kube.get(VLMPOOLS, "vision", namespace))["metadata"]["uid"] == pool["metadata"]["uid"]


# ------------------------------------------------------------------ issue 23: a pool takes over nothing

def _foreign(namespace: str, name: str) -> list[dict]:
    """Team B's objects, named as pool `name`'s Service, admin-token Secret and EPP ConfigMap would be."""
    meta = {"namespace": namespace, "labels": {"team": "b"}}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {**meta, "name": name},
         "spec": {"selector": {"app": "team-b-api"}, "ports": [{"port": 80, "targetPort": 8000}]}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {**meta, "name": f"{name}-admin-token"},
         "data": {"token": base64.b64encode(b"team-b-token").decode(), "other": base64.b64encode(b"kept").decode()}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": f"{name}-epp"},
         "data": {"config.yaml": "team b's config\n"}},
    ]


def _kept(obj: dict) -> tuple:
    """What must not change: resourceVersion, owners, labels, selector/data."""
    meta = obj["metadata"]
    return (meta["resourceVersion"], meta.get("ownerReferences"), meta.get("labels"),
            (obj.get("spec") or {}).get("selector"), obj.get("data"))


async def _condition(kube, name: str, namespace: str, ctype: str) -> dict:
    st = (await kube.get(VLMPOOLS, name, namespace)).get("status") or {}
    return next((c for c in st.get("conditions") or [] if c["type"] == ctype), {})


async def test_a_pool_never_takes_over_or_deletes_another_teams_objects(operator, kube, namespace):
    """Team B's Service, Secret and ConfigMap exist first; a VLMPool whose children would take those
    names is refused (Degraded ChildConflict naming each, a Warning Event) and writes none of its
    children; deleting it leaves team B's objects byte for byte (the garbage collector has run: a
    second pool deleted alongside is gone)."""
    from vlmpool.kube.client import CONFIGMAPS, DEPLOYMENTS, PVCS, SERVICES, resource_for

    foreign = [await kube.create(o, namespace) for o in _foreign(namespace, "shared")]
    before = [_kept(o) for o in foreign]
    # Team B's Deployment of the pool's name even carries the labels the pool's pods get: it is still
    # not the pool's (neither changed nor read as the pool's Deployment for its status).
    from vlmpool.manifests.common import pool_labels, server_selector
    labels = pool_labels("shared")
    their_dep = await kube.create({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "shared", "labels": labels},
        "spec": {"replicas": 0, "selector": {"matchLabels": server_selector("shared")},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "b", "image": "team-b/api:1"}]}}}}, namespace)
    op = await operator()
    pool = await kube.create(pool_obj("shared", replicas=0, routing={}), namespace)
    await kube.create(pool_obj("bystander", replicas=0), namespace)

    async def conflict():
        c = await _condition(kube, "shared", namespace, "Degraded")
        return c if c.get("status") == "True" and c.get("reason") == "ChildConflict" else None
    cond = await wait_until(conflict, what="Degraded ChildConflict on the colliding pool")
    for what in (f"Service {namespace}/shared", f"Secret {namespace}/shared-admin-token",
                 f"ConfigMap {namespace}/shared-epp", f"Deployment {namespace}/shared"):
        assert what in cond["message"], cond
    async def conflict_events():  # posted after the status write, by kopf's event poster
        return [e for e in await kube.list(EVENTS, namespace)
                if e.get("reason") == "ChildConflict" and e["involvedObject"].get("uid") == pool["metadata"]["uid"]]
    events = await wait_until(conflict_events, timeout=30, what="the ChildConflict Warning Event")
    assert events[0]["type"] == "Warning" and "Service" in events[0]["message"], events

    # Nothing of the colliding pool was written, not even the children that had no conflict.
    await wait_until(lambda: kube.get_or_none(DEPLOYMENTS, "bystander", namespace), what="the other pool's children")
    assert await kube.get_or_none(PVCS, "shared-adapters", namespace) is None

    async def status_not_from_their_deployment():  # the resync re-reads the pool's Deployment
        c = await _condition(kube, "shared", namespace, "Ready")
        return c.get("reason") == "DeploymentMissing"
    await wait_until(status_not_from_their_deployment, what="Ready DeploymentMissing (theirs is not the pool's)")
    assert [_kept(await kube.get(resource_for(o), o["metadata"]["name"], namespace)) for o in foreign] == before

    # The pool's retries (every resync) change nothing either.
    async def retried():
        return op.tail(200_000).count("not the pool's own") >= 2
    await wait_until(retried, what="the operator to retry the colliding pool")
    assert [_kept(await kube.get(resource_for(o), o["metadata"]["name"], namespace)) for o in foreign] == before
    await kube.delete(VLMPOOLS, "shared", namespace)
    await kube.delete(VLMPOOLS, "bystander", namespace)

    async def bystander_collected():
        for res, name in ((DEPLOYMENTS, "bystander"), (SERVICES, "bystander"), (SECRETS, "bystander-admin-token")):
            if await kube.get_or_none(res, name, namespace) is not None:
                return False
        return await kube.get_or_none(VLMPOOLS, "shared", namespace) is None
    await wait_until(bystander_collected, timeout=90, what="the garbage collector to remove the other pool's children")
    after = [await kube.get_or_none(resource_for(o), o["metadata"]["name"], namespace) for o in foreign]
    assert all(after), after
    assert [_kept(o) for o in after] == before
    assert base64.b64decode(after[1]["data"]["other"]) == b"kept"
    dep = await kube.get(DEPLOYMENTS, "shared", namespace)
    assert dep["metadata"]["generation"] == their_dep["metadata"]["generation"]
    assert dep["spec"]["template"] == {**their_dep["spec"]["template"], "metadata": dep["spec"]["template"]["metadata"]}
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "team-b/api:1"
    assert not dep["metadata"].get("ownerReferences")
    assert (await kube.get(CONFIGMAPS, "shared-epp", namespace))["data"] == {"config.yaml": "team b's config\n"}


async def test_a_refused_pool_creates_its_child_once_the_other_object_is_gone(operator, kube, namespace):
    """No spec change needed: the retry creates the child once team B's Service is removed; the
    created child's fields belong to the operator's apply, so a field the pool later drops goes."""
    from vlmpool.kube.client import DEPLOYMENTS, SERVICES
    from vlmpool.manifests.common import server_selector

    await kube.create(_foreign(namespace, "late")[0], namespace)
    await operator()
    pool = await kube.create(pool_obj("late", replicas=0, service={"annotations": {"team-a/note": "x"}}), namespace)

    async def conflict():
        return (await _condition(kube, "late", namespace, "Degraded")).get("reason") == "ChildConflict"
    await wait_until(conflict, what="the conflict")
    await kube.delete(SERVICES, "late", namespace)

    async def own_service():
        svc = await kube.get_or_none(SERVICES, "late", namespace)
        refs = (svc or {}).get("metadata", {}).get("ownerReferences") or []
        return svc if refs and refs[0]["uid"] == pool["metadata"]["uid"] else None
    svc = await wait_until(own_service, what="the pool's own Service after the other was removed")
    assert svc["spec"]["selector"] == server_selector("late")
    assert await kube.get(DEPLOYMENTS, "late", namespace)
    mine = [m for m in svc["metadata"]["managedFields"] if m["manager"] == "vlmpool-operator"]
    assert [m["operation"] for m in mine] == ["Apply"], mine

    async def reconciled():
        c = await _condition(kube, "late", namespace, "Degraded")
        return c.get("status") == "False" and c.get("reason") == "Reconciled"
    await wait_until(reconciled, what="Degraded False once the child exists")

    await kube.patch(VLMPOOLS, "late", {"spec": {"service": {"annotations": None}}}, namespace)

    async def annotation_gone():
        svc = await kube.get(SERVICES, "late", namespace)
        return "team-a/note" not in (svc["metadata"].get("annotations") or {})
    await wait_until(annotation_gone, what="the dropped annotation removed by the next apply")


async def test_every_pool_gets_a_network_policy_with_the_charts_rules(operator, kube, namespace):
    """Issue 23: the default install (the chart passes --network-policy) guards each pool's pods in
    whatever namespace: admin port from the operator's pods only, http from anyone, nothing else; the
    apiserver accepts the policy, owned by the pool (it goes with it)."""
    from vlmpool.kube.client import NETWORKPOLICIES
    from vlmpool.manifests.common import server_selector

    operator_peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vlmpool-system"}},
                     "podSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}}}
    await operator(extra_args=("--network-policy", json.dumps({"adminFrom": [operator_peer]})))
    pool = await kube.create(pool_obj("guarded", replicas=0, proxy={"port": 9080, "adminPort": 9081}), namespace)
    policy = await wait_until(lambda: kube.get_or_none(NETWORKPOLICIES, "guarded", namespace), what="the policy")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == pool["metadata"]["uid"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": server_selector("guarded")} and spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == [{"ports": [{"port": 9081, "protocol": "TCP"}], "from": [operator_peer]},
                               {"ports": [{"port": 9080, "protocol": "TCP"}]}]
