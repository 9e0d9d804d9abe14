"""spec.routing's manifests (manifests/routing.py): pure functions, tested without a cluster. The real
apiserver with the real InferencePool CRD admits them in tests/routing."""

from __future__ import annotations

import yaml

from vlmpool.api.objects import Pool
from vlmpool.manifests import routing as MR
from vlmpool.manifests.common import server_selector
from vlmpool.names import API_VERSION


def pool(**spec) -> Pool:
    body = {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"}, "proxy": {"port": 8090}}
    body.update(spec)
    return Pool.parse({"apiVersion": API_VERSION, "kind": "VLMPool",
                       "metadata": {"name": "vision", "namespace": "ml", "uid": "pool-uid"}, "spec": body})


def test_unset_renders_nothing():
    p = pool()
    assert MR.routing_objects(p) == []


def test_inference_pool_targets_the_proxy_and_the_epp():
    p = pool(routing={"failureMode": "FailOpen"})
    objs = MR.routing_objects(p)
    assert [o["kind"] for o in objs] == ["InferencePool", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                                         "Deployment", "Service"]
    ip = objs[0]
    assert ip["apiVersion"] == "inference.networking.k8s.io/v1" and ip["metadata"]["name"] == "vision"
    assert ip["spec"]["selector"]["matchLabels"] == server_selector("vision")
    assert ip["spec"]["targetPorts"] == [{"number": 8090}]  # the proxy's port: its /metrics, its routing
    assert ip["spec"]["endpointPickerRef"] == {"name": "vision-epp", "port": {"number": 9002},
                                               "failureMode": "FailOpen"}
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == "pool-uid" for o in objs)
    dep = objs[5]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["--pool-name", "vision", "--pool-namespace", "ml"]  # pool mode
    assert dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] != "server"


def test_epp_config_lists_lora_affinity():
    p = pool(routing={"loraAffinityWeight": 7})
    cm = next(o for o in MR.routing_objects(p) if o["kind"] == "ConfigMap")
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert {"type": "lora-affinity-scorer"} in cfg["plugins"]
    assert {"pluginRef": "lora-affinity-scorer", "weight": 7} in cfg["schedulingProfiles"][0]["plugins"]
    p = pool(routing={"loraAffinityWeight": 0, "endpointPicker": False})
    assert [o["kind"] for o in MR.routing_objects(p)] == ["InferencePool"]
    assert "lora-affinity-scorer" not in yaml.safe_dump(MR.epp_config(p.spec.routing))
