"""The chart against the real kube-apiserver (the pinned Kubernetes) of the test control plane: every object the
default and the variant values render is accepted by a server-side dry run (strict field validation,
the real CRD schemas of the Prometheus Operator for the monitors), `helm install` refuses bad values
before touching the cluster, and the installed RBAC grants the operator's service account exactly the
operator's rules: in the watched namespaces only, or cluster-wide."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from helmtest import CHART, FIXTURES, VARIANTS, variant_args

from vlmpool.names import GROUP, POOL_PLURAL

RELEASE_NS = "vlmpool-system"
VARIANT_NAMESPACES = ["vlmpool-system", "team-a", "team-b"]


@pytest.fixture(scope="module")
def cluster(control_plane):
    for ns in VARIANT_NAMESPACES:
        control_plane.kubectl("create", "namespace", ns, check=False)
    control_plane.kubectl("apply", "--server-side", "--field-manager=vlmpool-tests", "-f", str(FIXTURES))
    control_plane.wait_crds_established("crd/servicemonitors.monitoring.coreos.com",
                                        "crd/podmonitors.monitoring.coreos.com")
    return control_plane


@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_every_rendered_object_is_accepted_by_the_apiserver(helm, cluster, variant):
    docs = helm.template(*variant_args(variant), namespace=RELEASE_NS, crds=True)
    kinds = {d["kind"] for d in docs}
    assert "CustomResourceDefinition" in kinds and "Deployment" in kinds
    res = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--field-manager=helm-chart-test",
                          "--force-conflicts", "--validate=strict", "-f", "-",
                          input="---\n".join(yaml.safe_dump(d) for d in docs), check=False)
    assert res.returncode == 0, res.stderr
    applied = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(applied) == len(docs), res.stdout


def test_the_apiserver_would_refuse_what_the_schema_lets_through_only_if_valid(helm, cluster):
    """The dry run is not a rubber stamp: a rendered Deployment with a bad field is refused."""
    docs = helm.template(namespace=RELEASE_NS)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    res = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--validate=strict", "-f", "-",
                          input=yaml.safe_dump(dep), check=False)
    assert res.returncode != 0 and "readinesProbe" in res.stderr, res.stderr


def _helm_in(helm, cluster, *args, check=True):
    return helm.run(*args, "--kubeconfig", str(cluster.kubeconfig), check=check)


def test_install_refuses_bad_values_before_touching_the_cluster(helm, cluster):
    ns = f"h-{uuid.uuid4().hex[:8]}"
    res = _helm_in(helm, cluster, "install", "bad", str(CHART), "-n", ns, "--create-namespace",
                   "--set", "operator.replicas=6", "--set", "watch.namespaces={UPPER}", check=False)
    assert res.returncode != 0
    assert "values don't meet the specifications of the schema(s)" in res.stderr
    assert "at '/operator/replicas': maximum: got 6, want 5" in res.stderr
    assert "/watch/namespaces/0" in res.stderr
    gone = cluster.kubectl("get", "namespace", ns, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr, gone.stderr  # nothing was created
    assert "bad" not in _helm_in(helm, cluster, "list", "-A", "-q").stdout.split()


def _can(cluster, sa_ns, verb, resource, ns=None):
    """A SubjectAccessReview for the chart's service account; resource is `plural.group[/subresource]`.
    (Not `kubectl auth can-i`: it resolves `plural.group` through discovery, so a grant on a CRD that this
    apiserver does not serve, e.g. the Gateway API Inference Extension's InferencePool, reads as no.)"""
    resource, _, sub = resource.partition("/")
    plural, _, group = resource.partition(".")
    attrs = {"verb": verb, "group": group, "resource": plural}
    if sub:
        attrs["subresource"] = sub
    if ns:
        attrs["namespace"] = ns
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": f"system:serviceaccount:{sa_ns}:vlmpool-operator",
                       "groups": ["system:serviceaccounts", f"system:serviceaccounts:{sa_ns}", "system:authenticated"],
                       "resourceAttributes": attrs}}
    res = cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review))
    return bool(json.loads(res.stdout)["status"].get("allowed"))


def _grants(rule):
    """(verb, `plural.group[/subresource]`) for every grant of an RBAC rule."""
    for group in rule["apiGroups"]:
        for res in rule["resources"]:
            plural, _, sub = res.partition("/")
            name = f"{plural}.{group}" if group else plural
            for verb in rule["verbs"]:
                yield verb, f"{name}/{sub}" if sub else name


def test_installed_rbac_grants_exactly_the_rules_where_the_operator_watches(helm, cluster):
    from vlmpool.controller.rbac import RULES

    tag = uuid.uuid4().hex[:6]
    release_ns, watched, other = f"op-{tag}", [f"wa-{tag}", f"wb-{tag}"], f"other-{tag}"
    for ns in [*watched, other]:
        cluster.kubectl("create", "namespace", ns)
    try:
        out = _helm_in(helm, cluster, "install", "vlmpool", str(CHART), "-n", release_ns, "--create-namespace",
                       "--set", f"watch.namespaces={{{','.join(watched)}}}").stdout
        assert f"The operator watches the namespaces {', '.join(watched)}." in out, out
        assert "WARNING" not in out
        # No NetworkPolicy of the chart's own: the operator makes one per pool (--network-policy).
        policies = json.loads(cluster.kubectl("get", "networkpolicy", "-A", "-l", "app.kubernetes.io/instance=vlmpool",
                                              "-o", "json").stdout)["items"]
        assert policies == []
        grants = [g for r in RULES for g in _grants(r)]
        assert grants
        for verb, resource in grants:
            for ns in watched:
                assert _can(cluster, release_ns, verb, resource, ns), (verb, resource, ns)
            assert not _can(cluster, release_ns, verb, resource, other), (verb, resource, other)
            assert not _can(cluster, release_ns, verb, resource), (verb, resource, "cluster-wide")
        # Leader election: the Lease in the release namespace only.
        for verb in ("get", "create", "update"):
            assert _can(cluster, release_ns, verb, "leases.coordination.k8s.io", release_ns), verb
            assert not _can(cluster, release_ns, verb, "leases.coordination.k8s.io", watched[0]), verb
            assert not _can(cluster, release_ns, verb, "leases.coordination.k8s.io"), verb
        assert not _can(cluster, release_ns, "delete", "leases.coordination.k8s.io", release_ns)
        for verb, resource in [("list", "secrets"), ("delete", "deployments.apps"),
                               ("escalate", "roles.rbac.authorization.k8s.io"),
                               ("bind", "roles.rbac.authorization.k8s.io"), ("update", f"{POOL_PLURAL}.{GROUP}")]:
            assert not _can(cluster, release_ns, verb, resource, watched[0]), (verb, resource)
        dep = json.loads(
            cluster.kubectl("get", "deployment", "vlmpool-operator", "-n", release_ns, "-o", "json").stdout)
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert [a for a in args if a.startswith("--namespace=")] == [f"--namespace={n}" for n in watched]

        # Upgrading to a cluster-wide watch swaps the Roles for a ClusterRole.
        out = _helm_in(helm, cluster, "upgrade", "vlmpool", str(CHART), "-n", release_ns,
                       "--set", "watch.namespaces=null").stdout
        assert "The operator watches every namespace." in out and "no NetworkPolicy guards" not in out, out
        for verb, resource in grants:
            assert _can(cluster, release_ns, verb, resource, other), (verb, resource)
            assert _can(cluster, release_ns, verb, resource), (verb, resource, "cluster-wide")
        no_role = cluster.kubectl("get", "role", "vlmpool-operator", "-n", watched[0], check=False)
        assert no_role.returncode != 0 and "NotFound" in no_role.stderr, no_role.stderr
        role = json.loads(cluster.kubectl("get", "clusterrole", "vlmpool-operator", "-o", "json").stdout)
        assert role["rules"] == [{k: v for k, v in r.items()} for r in RULES]
    finally:
        _helm_in(helm, cluster, "uninstall", "vlmpool", "-n", release_ns, "--wait", check=False)
        for ns in [*watched, other, release_ns]:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    no_role = cluster.kubectl("get", "clusterrole", "vlmpool-operator", check=False)
    assert no_role.returncode != 0 and "NotFound" in no_role.stderr, no_role.stderr
