"""What `spec.routing` renders (manifests/routing.py) is admitted by the real kube-apiserver with the
real InferencePool CRD (server-side dry run, strict field validation: an unknown field fails)."""

from __future__ import annotations

import json
import uuid

from routing_helpers import install_inferencepool_crd

from vlmpool.api.objects import Pool
from vlmpool.manifests import routing as MR
from vlmpool.names import API_VERSION


def test_rendered_routing_objects_are_admitted(control_plane):
    install_inferencepool_crd(control_plane)
    ns = f"r-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", ns)
    try:
        pool = {"apiVersion": API_VERSION, "kind": "VLMPool",
                "metadata": {"name": "vision", "namespace": ns, "uid": str(uuid.uuid4())},
                "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"},
                         "routing": {"failureMode": "FailOpen"}}}
        objs = MR.routing_objects(Pool.parse(pool))
        assert len(objs) == 7
        for obj in objs:
            res = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "--field-manager=t",
                                        "--validate=strict", "-f", "-", input=json.dumps(obj), check=False)
            assert res.returncode == 0, f"{obj['kind']}: {res.stderr}"
        bad = dict(objs[0], spec=dict(objs[0]["spec"], targetPorts=[{"number": 0}]))
        res = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=json.dumps(bad),
                                    check=False)
        # the CRD's own validation is in force: port 0 is refused by the field's minimum
        assert res.returncode != 0 and "spec.targetPorts[0].number" in res.stderr, res.stderr
        assert "should be greater than or equal to 1" in res.stderr, res.stderr
    finally:
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
