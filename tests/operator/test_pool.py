"""A VLMPool on the real control plane: its children with the right fields, status from the
Deployment, and cascading deletion by the garbage collector."""

from __future__ import annotations

import base64
import re

import pytest
from vlmtest.operator import BASE, free_port

from vlmpool.kube.client import DEPLOYMENTS, PODS, PVCS, SECRETS, SERVICES, VLMPOOLS, NotFound
from vlmpool.names import API_VERSION
from vlmpool.testing.waiting import wait_until

pytestmark = pytest.mark.apiserver


def pool_obj(name: str, **spec) -> dict:
    body = {"model": {"name": BASE, "served_name": None, "family": "qwen2_5_vl"}}
    body["model"].pop("served_name")
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": name}, "spec": body}


async def test_pool_creates_children_with_owner_references_and_cascades(kube, namespace, operator):
    op = await operator()
    admin_port = free_port()
    pool = pool_obj("vision", replicas=2,
                    engine={"maxLoras": 8, "maxCpuLoras": 32, "maxLoraRank": 32, "gpus": 1},
                    proxy={"concurrency": 7, "adminPort": admin_port},
                    scheduling={"nodeSelector": {"gpu": "a100"},
                                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                 "effect": "NoSchedule"}]})
    created = await kube.create(pool, namespace)
    uid = created["metadata"]["uid"]

    dep = await wait_until(lambda: kube.get(DEPLOYMENTS, "vision", namespace), what="the Deployment")
    svc = await wait_until(lambda: kube.get(SERVICES, "vision", namespace), what="the Service")  # applied after
    pvc = await kube.get(PVCS, "vision-adapters", namespace)
    secret = await kube.get(SECRETS, "vision-admin-token", namespace)
    for obj in (dep, svc, pvc, secret):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("VLMPool", "vision", uid, True)
        assert any(m["manager"] == "vlmpool-operator" for m in obj["metadata"]["managedFields"])
    assert len(base64.b64decode(secret["data"]["token"])) == 64

    tpl = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert tpl["nodeSelector"] == {"gpu": "a100"}
    assert tpl["tolerations"][0]["key"] == "nvidia.com/gpu"
    engine = next(c for c in tpl["containers"] if c["name"] == "engine")
    proxy = next(c for c in tpl["containers"] if c["name"] == "proxy")
    args = engine["args"]
    assert "--enable-lora" in args
    assert args[args.index("--max-loras") + 1] == "8" and args[args.index("--max-cpu-loras") + 1] == "32"
    assert args[args.index("--max-lora-rank") + 1] == "32" and args[args.index("--model") + 1] == BASE
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in engine["env"]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(engine)
    mount = next(m for m in engine["volumeMounts"] if m["name"] == "adapters")
    assert mount["readOnly"] is True
    vol = next(v for v in tpl["volumes"] if v["name"] == "adapters")
    assert vol["persistentVolumeClaim"] == {"claimName": "vision-adapters", "readOnly": True}
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]}["admin"] == admin_port
    assert "--concurrency" not in proxy["args"]  # pushed at run time, never a rollout
    assert {"readinessProbe", "livenessProbe"} <= set(proxy)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"

    # kube-controller-manager makes the ReplicaSet and the Pods; status follows the Deployment.
    pods = await wait_until(lambda: _len(kube.list(PODS, namespace, label_selector="vlmpool.io/pool=vision"), 2),
                            what="2 pods")
    assert all(p["spec"]["containers"][0]["name"] == "proxy" for p in pods)

    async def status():
        st = (await kube.get(VLMPOOLS, "vision", namespace)).get("status") or {}
        return st if st.get("replicas") == 2 and st.get("ready") == "0/2" and st.get("endpoint") else None
    st = await wait_until(status, what="pool status")
    assert st["endpoint"] == f"http://vision.{namespace}.svc:8080/v1"
    assert st["concurrency"] == 7 and st["observedGeneration"] == 1
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "PodsNotReady"

    # A spec change is applied to the Deployment (server-side apply, same field manager).
    await kube.patch(VLMPOOLS, "vision", {"spec": {"replicas": 1, "proxy": {"concurrency": 3}}}, namespace)
    await wait_until(lambda: _field(kube.get(DEPLOYMENTS, "vision", namespace), ("spec", "replicas"), 1),
                     what="replicas 1")

    # Deleting the pool cascades (garbage collector of kube-controller-manager).
    await kube.delete(VLMPOOLS, "vision", namespace)

    async def gone():
        for res, name in ((DEPLOYMENTS, "vision"), (SERVICES, "vision"), (SECRETS, "vision-admin-token")):
            try:
                await kube.get(res, name, namespace)
                return False
            except NotFound:
                pass
        pvc = await kube.get_or_none(PVCS, "vision-adapters", namespace)
        return pvc is None or bool(pvc["metadata"].get("deletionTimestamp"))
    await wait_until(gone, timeout=90, what="the children to be garbage-collected")
    assert "Traceback" not in op.tail(), op.tail()


async def _len(coro, n):
    items = await coro
    return items if len(items) == n else None


async def _field(coro, path, want):
    obj = await coro
    for k in path:
        obj = obj[k]
    return obj == want


async def test_all_namespaces_under_a_cluster_role_binding(kube, control_plane, namespace, operator_role,
                                                           adapter_root, tmp_path):
    """`--all-namespaces` needs nothing beyond the same ClusterRole, bound cluster-wide."""
    import json

    from vlmtest.operator import OperatorProcess

    from vlmpool.controller import rbac

    user = "vlmpool-operator-clusterwide"
    binding = rbac.cluster_role_binding([rbac.subject_user(user)], name=f"{user}-{namespace}", role=operator_role)
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(binding))
    op = OperatorProcess(control_plane.kubeconfig_for(user), "*", adapter_root, tmp_path / "op.log")
    await op.start()
    try:
        await kube.create(pool_obj("wide"), namespace)
        dep = await wait_until(lambda: kube.get(DEPLOYMENTS, "wide", namespace), what="the Deployment")
        assert dep["metadata"]["ownerReferences"][0]["name"] == "wide"
        st = await wait_until(lambda: _status_with_endpoint(kube, namespace), what="pool status")
        assert st["endpoint"].startswith(f"http://wide.{namespace}.svc")
        await kube.delete(VLMPOOLS, "wide", namespace)
    finally:
        op.stop()
        control_plane.kubectl("delete", "clusterrolebinding", f"{user}-{namespace}", check=False)
    # (Other tests' namespaces may be terminating: only this namespace's lines are checked.)
    mine = [line for line in op.tail(200_000).splitlines() if namespace in line]
    # A 403 as a status ("403", "HTTP403"), not inside a uid or a quoted resourceVersion of a logged body
    denied = re.compile(r"Forbidden|(?:HTTP ?|(?<![\w'-]))403(?![\w'-])")
    assert mine and not [line for line in mine if denied.search(line)], "\n".join(mine[-20:])


async def _status_with_endpoint(kube, ns):
    st = (await kube.get(VLMPOOLS, "wide", ns)).get("status") or {}
    return st if st.get("endpoint") else None


async def test_scale_subresource_drives_the_pool_and_an_hpa_can_target_it(kube, control_plane, namespace, operator):
    """`kubectl scale vlmp` writes the pool's spec.replicas through the scale subresource and the operator
    follows it; the subresource reads back status.replicas and the pods' selector; an autoscaling/v2 HPA
    naming the VLMPool is admitted (scalers target the pool, never the Deployment the operator owns)."""
    import json

    await operator()
    await kube.create(pool_obj("scaled", replicas=1), namespace)
    await wait_until(lambda: _field(kube.get(DEPLOYMENTS, "scaled", namespace), ("spec", "replicas"), 1),
                     what="the Deployment at 1 replica")

    control_plane.kubectl("scale", "vlmp", "scaled", "--replicas=3", "-n", namespace)
    await wait_until(lambda: _field(kube.get(DEPLOYMENTS, "scaled", namespace), ("spec", "replicas"), 3),
                     what="the operator to follow kubectl scale (Deployment at 3)")

    def scale():
        out = control_plane.kubectl("get", "--raw",
                                    f"/apis/{API_VERSION}/namespaces/{namespace}/vlmpools/scaled/scale").stdout
        doc = json.loads(out)
        return doc if doc["status"].get("replicas") == 3 and doc["status"].get("selector") else None

    doc = await wait_until(lambda: _sync(scale), what="the scale subresource to read 3 replicas and a selector")
    assert doc["kind"] == "Scale" and doc["spec"]["replicas"] == 3
    dep = await kube.get(DEPLOYMENTS, "scaled", namespace)
    want = ",".join(f"{k}={v}" for k, v in sorted(dep["spec"]["selector"]["matchLabels"].items()))
    assert ",".join(sorted(doc["status"]["selector"].split(","))) == want  # the pods the pool runs

    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": "scaled", "namespace": namespace},
           "spec": {"scaleTargetRef": {"apiVersion": API_VERSION, "kind": "VLMPool", "name": "scaled"},
                    "minReplicas": 1, "maxReplicas": 4,
                    "metrics": [{"type": "Pods", "pods": {
                        "metric": {"name": "vlmpool_proxy_adapter_queue_depth"},
                        "target": {"type": "AverageValue", "averageValue": "4"}}}]}}
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(hpa))
    got = json.loads(control_plane.kubectl("get", "hpa", "scaled", "-n", namespace, "-o", "json").stdout)
    assert got["spec"]["scaleTargetRef"]["kind"] == "VLMPool"


async def _sync(fn):
    return fn()


async def test_a_spec_only_the_model_refuses_degrades_the_pool_and_creates_no_children(kube, namespace, operator):
    """A spec the CRD admits but the typed model refuses (rollout maxSurge 0 and maxUnavailable 0: the
    roll could never start) fails where the spec is parsed, before anything is applied: the pool ends
    Degraded with reason ValidationError and has no children; once fixed it reconciles."""
    await operator()
    await kube.create(pool_obj("stuck", rollout={"maxSurge": 0, "maxUnavailable": 0}), namespace)

    async def degraded():
        st = (await kube.get(VLMPOOLS, "stuck", namespace)).get("status") or {}
        c = next((c for c in st.get("conditions") or [] if c["type"] == "Degraded"), {})
        return c if c.get("status") == "True" else None

    cond = await wait_until(degraded, what="Degraded True on the refused pool")
    assert cond["reason"] == "ValidationError" and "cannot both be 0" in cond["message"], cond
    for res, name in ((DEPLOYMENTS, "stuck"), (SERVICES, "stuck"), (PVCS, "stuck-adapters"),
                      (SECRETS, "stuck-admin-token")):
        with pytest.raises(NotFound):
            await kube.get(res, name, namespace)

    await kube.patch(VLMPOOLS, "stuck", {"spec": {"rollout": {"maxUnavailable": 1}}}, namespace)

    async def reconciled():
        st = (await kube.get(VLMPOOLS, "stuck", namespace)).get("status") or {}
        c = next((c for c in st.get("conditions") or [] if c["type"] == "Degraded"), {})
        return c if c.get("status") == "False" and c.get("reason") == "Reconciled" else None

    await wait_until(reconciled, what="Degraded False once the spec is valid")
    await kube.get(DEPLOYMENTS, "stuck", namespace)


async def test_children_are_created_when_absent_and_changed_only_when_the_pools_own(kube, namespace, crds):
    """controller/children.py on the real apiserver, the races included: an object that appeared after
    the check (create gets AlreadyExists) or replaced by another's between check and apply is reported,
    never written; the pool's own is applied; an absent one is created with its fields under the
    operator's apply manager."""
    from vlmpool.controller import children as C
    from vlmpool.kube.client import CONFIGMAPS

    pool = await kube.create(pool_obj("owner"), namespace)  # a real owner (the GC deletes orphans)
    ref = {"apiVersion": API_VERSION, "kind": "VLMPool", "name": "owner",
           "uid": pool["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}

    def cm(name: str, value: str, own: bool = True) -> dict:
        meta = {"name": name, "namespace": namespace, **({"ownerReferences": [ref]} if own else {})}
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": value}}

    theirs = await kube.create(cm("taken", "theirs", own=False), namespace)
    with pytest.raises(C.ChildConflict, match=f"ConfigMap {namespace}/taken"):
        await C.claim(kube, pool, [cm("free", "mine"), cm("taken", "mine")])
    assert await kube.get_or_none(CONFIGMAPS, "free", namespace) is None  # nothing written before the check
    # The race: claim() saw no object, someone created theirs before the create.
    with pytest.raises(C.ChildConflict):
        await C.put(kube, pool, C.Child(cm("taken", "mine"), None))
    assert (await kube.get(CONFIGMAPS, "taken", namespace))["metadata"]["resourceVersion"] == \
        theirs["metadata"]["resourceVersion"]

    (free,) = await C.claim(kube, pool, [cm("free", "mine")])
    assert free.uid is None
    made = await C.put(kube, pool, free)
    assert made["data"] == {"k": "mine"} and made["metadata"]["ownerReferences"][0]["uid"] == ref["uid"]
    managers = [(m["manager"], m["operation"]) for m in made["metadata"]["managedFields"]]
    assert managers == [("vlmpool-operator", "Apply")]

    (own,) = await C.claim(kube, pool, [cm("free", "changed")])
    assert own.uid == made["metadata"]["uid"]
    assert (await C.put(kube, pool, own))["data"] == {"k": "changed"}

    # Replaced by another's between the check and the apply: the apply's uid no longer matches.
    await kube.delete(CONFIGMAPS, "free", namespace)
    replaced = await kube.create(cm("free", "theirs", own=False), namespace)
    with pytest.raises(C.ChildConflict):
        await C.put(kube, pool, C.Child(cm("free", "mine"), own.uid))
    got = await kube.get(CONFIGMAPS, "free", namespace)
    assert got["metadata"]["resourceVersion"] == replaced["metadata"]["resourceVersion"]
    assert got["data"] == {"k": "theirs"}
