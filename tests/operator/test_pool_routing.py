"""spec.routing through the operator on the real control plane, the operator running under exactly its
ClusterRole: the pool's InferencePool (the GIE CRD from the pinned module) and its endpoint picker
(ServiceAccount, Role, RoleBinding, ConfigMap, Deployment, Service), owned by the pool; a pool without
`routing` gets none. The Role grants pods and inferencepools reads, which RBAC lets the operator grant
only because its ClusterRole holds them: this test proves the rules suffice."""

from __future__ import annotations

import os

import pytest
from vlmtest.operator import BASE

from vlmpool.kube.client import (
    CONFIGMAPS,
    DEPLOYMENTS,
    INFERENCEPOOLS,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    SERVICES,
    NotFound,
)
from vlmpool.names import API_VERSION
from vlmpool.testing import gie
from vlmpool.testing.waiting import wait_until

pytestmark = pytest.mark.apiserver


@pytest.fixture
def inferencepool_crd(control_plane):
    if reason := gie.missing_reason():
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    control_plane.kubectl("apply", "--server-side", "-f", str(gie.gie_dir() / "crds" / gie.INFERENCEPOOL_CRD))
    control_plane.wait_crds_established("crd/inferencepools.inference.networking.k8s.io")


def pool_obj(name: str, **spec) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": name},
            "spec": {"model": {"name": BASE, "family": "qwen2_5_vl"}, **spec}}


async def test_routing_children(kube, namespace, operator, inferencepool_crd):
    await operator()
    created = await kube.create(pool_obj("vision", engine={"maxLoras": 3}, routing={"failureMode": "FailOpen"}),
                                namespace)
    uid = created["metadata"]["uid"]
    ip = await wait_until(lambda: kube.get(INFERENCEPOOLS, "vision", namespace), what="the InferencePool")
    assert ip["spec"]["targetPorts"] == [{"number": 8080}]  # the proxy's port
    assert ip["spec"]["endpointPickerRef"]["name"] == "vision-epp"
    assert ip["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
    dep = await wait_until(lambda: kube.get(DEPLOYMENTS, "vision", namespace), what="the pool's Deployment")
    assert ip["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    proxy = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "proxy")
    assert proxy["args"][proxy["args"].index("--max-loras") + 1] == "3"  # max_lora in the routing metrics
    for res in (SERVICEACCOUNTS, ROLES, ROLEBINDINGS, CONFIGMAPS, DEPLOYMENTS, SERVICES):
        obj = await wait_until(lambda res=res: kube.get(res, "vision-epp", namespace), what=f"{res} vision-epp")
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"]) == ("VLMPool", uid)

    await kube.create(pool_obj("plain"), namespace)
    await wait_until(lambda: kube.get(SERVICES, "plain", namespace), what="the plain pool's Service")
    with pytest.raises(NotFound):
        await kube.get(INFERENCEPOOLS, "plain", namespace)
