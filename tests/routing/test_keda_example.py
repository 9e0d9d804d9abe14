"""examples/routing/keda-scaledobject.yaml is admitted by the real apiserver with the real KEDA ScaledObject CRD
(v2.17.0, from the Go module proxy; tests/routing/fixtures), strict field validation: a renamed or
removed KEDA field would fail here."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

HERE = Path(__file__).parent
EXAMPLE = HERE.parents[1] / "examples" / "routing" / "keda-scaledobject.yaml"


def test_keda_example_is_admitted(control_plane):
    control_plane.kubectl("apply", "--server-side", "-f", str(HERE / "fixtures" / "keda.sh_scaledobjects.yaml"))
    control_plane.wait_crds_established("crd/scaledobjects.keda.sh")
    obj = yaml.safe_load(EXAMPLE.read_text())
    assert obj["spec"]["scaleTargetRef"]["kind"] == "VLMPool"  # the pool, not the operator's Deployment
    control_plane.kubectl("create", "namespace", obj["metadata"]["namespace"], check=False)
    res = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "--validate=strict", "-f", "-",
                                input=json.dumps(obj), check=False)
    assert res.returncode == 0, res.stderr
    bad = json.loads(json.dumps(obj))
    bad["spec"]["triggers"][0]["metricName"] = "removed-in-keda-2.12"
    res = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "--validate=strict", "-f", "-",
                                input=json.dumps(bad), check=False)
    # strict validation is in force: the field KEDA 2.12 removed is refused by name
    assert res.returncode != 0 and ".spec.triggers[0].metricName: field not declared in schema" in res.stderr, \
        res.stderr
