"""The chart without a cluster: lint, what it renders for the default and the variant values, the
schema refusing bad values with its message, and what `helm package` ships."""

from __future__ import annotations

import json
import tarfile

import pytest
from helmtest import CHART, KUBE_VERSION, VARIANTS, by_kind, one, variant_args

from vlmpool.names import API_VERSION

PINNED = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("variant", ["default", *VARIANTS])
def test_lint(helm, variant):
    res = helm.run("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *variant_args(variant))
    assert "1 chart(s) linted, 0 chart(s) failed" in res.stdout, res.stdout


def _operator(docs):
    dep = one(docs, "Deployment")
    return dep, dep["spec"]["template"]["spec"], dep["spec"]["template"]["spec"]["containers"][0]


def test_default_render_is_a_cluster_wide_operator_with_exactly_the_operator_rules(helm):
    from vlmpool.controller.rbac import LEADER_ELECTION_RULES, RULES

    docs = helm.template()
    assert sorted(d["kind"] for d in docs) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role",
                                               "RoleBinding", "Secret", "Service", "ServiceAccount",
                                               *["ValidatingAdmissionPolicy"] * 4,
                                               *["ValidatingAdmissionPolicyBinding"] * 4]
    # Leader election (on by default): a Role for the Lease in the release namespace only.
    le_role, le_binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert le_role["metadata"] == {**le_role["metadata"], "name": "vlmpool-operator-leader-election",
                                   "namespace": "vlmpool-system"}
    assert le_role["rules"] == LEADER_ELECTION_RULES
    assert le_binding["metadata"]["namespace"] == "vlmpool-system"
    assert le_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                     "name": "vlmpool-operator-leader-election"}
    assert le_binding["subjects"] == [{"kind": "ServiceAccount", "name": "vlmpool-operator",
                                       "namespace": "vlmpool-system"}]
    role = one(docs, "ClusterRole")
    assert role["rules"] == RULES
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "vlmpool-operator", "namespace": "vlmpool-system"}]

    dep, pod, c = _operator(docs)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert pod["serviceAccountName"] == "vlmpool-operator"
    assert c["image"] == "ghcr.io/vlmpool/vlmpool-operator:0.1.0"
    assert c["command"] == ["vlmpool", "operator"]
    assert c["args"] == ["--all-namespaces", "--metrics-host=0.0.0.0", "--metrics-port=8080", "--resync-seconds=60",
                         "--push-timeout=10", "--push-parallelism=16", "--max-patch-jobs=8",
                         "--adapter-root=/var/lib/vlmpool/adapters",
                         "--log-level=INFO", "--leader-elect", "--leader-election-id=vlmpool-operator",
                         "--lease-duration=15", "--renew-deadline=10", "--retry-period=2",
                         "--token-key-file=/var/run/vlmpool/token-key/key",
                         "--network-policy=" + json.dumps(_network_policy_arg(docs), separators=(",", ":")),
                         "--patch-image=ghcr.io/vlmpool/vlmpool-patcher:0.1.0"]
    # The token key: a kept Secret, mounted read-only; no source allow-list, file:// off.
    key = one(docs, "Secret")
    assert key["metadata"]["name"] == "vlmpool-operator-token-key"
    assert key["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"} and len(key["data"]["key"]) >= 64
    assert {"name": "token-key", "secret": {"secretName": "vlmpool-operator-token-key", "defaultMode": 0o400}} \
        in pod["volumes"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert not by_kind(docs, "PodDisruptionBudget")
    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == 65532
    svc = one(docs, "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


def test_watching_namespaces_grants_roles_there_and_nothing_cluster_wide(helm):
    from vlmpool.controller.rbac import RULES

    docs = [d for d in helm.template(*variant_args("namespaced"))
            if not d["metadata"]["name"].endswith("-leader-election")]
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == RULES for r in roles)
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vlmpool-operator"}
        assert b["subjects"][0]["namespace"] == "vlmpool-system"
    _, _, c = _operator(docs)
    assert c["args"][:3] == ["--namespace=team-a", "--namespace=team-b", "--metrics-host=0.0.0.0"]
    assert "--all-namespaces" not in c["args"]


def _network_policy_arg(docs) -> dict | None:
    import json

    _, _, c = _operator(docs)
    found = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--network-policy=")]
    return json.loads(found[0]) if found else None


def test_network_policy_admits_only_the_operator_on_the_admin_port(helm):
    """The chart hands the operator the rules (--network-policy); the operator gives every pool, in
    whatever namespace, a NetworkPolicy over its pods with them (manifests/pool.py network_policy)."""
    from vlmpool.api.objects import Pool
    from vlmpool.controller.cli import parse_network_policy
    from vlmpool.manifests.pool import network_policy, pod_template

    docs = helm.template(*variant_args("namespaced"))
    assert not by_kind(docs, "NetworkPolicy")  # none of its own: one per pool, by the operator
    rules = _network_policy_arg(docs)
    assert rules is not None and parse_network_policy(json.dumps(rules)) == rules
    op_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    system_ns = {"matchLabels": {"kubernetes.io/metadata.name": "vlmpool-system"}}
    (admin_from,) = rules["adminFrom"]
    assert admin_from["namespaceSelector"] == system_ns
    assert admin_from["podSelector"]["matchLabels"].items() <= op_labels.items()
    pool = Pool.parse({"apiVersion": API_VERSION, "kind": "VLMPool",
                       "metadata": {"name": "p", "namespace": "team-a", "uid": "u"},
                       "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"}}})
    policy = network_policy(pool, rules)
    spec = policy["spec"]
    tpl = pod_template(pool)
    assert spec["podSelector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items()
    assert spec["policyTypes"] == ["Ingress"]
    admin, http, extra = spec["ingress"]
    assert admin == {"ports": [{"port": 8081, "protocol": "TCP"}], "from": [admin_from]}
    assert http["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert http["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "gateway"}
    assert extra["ports"] == [{"port": 9400, "protocol": "TCP"}]
    # Those are the proxy's ports; the engine has none (it listens on the pod's loopback).
    ports = {c["name"]: {p["containerPort"] for p in c.get("ports", [])} for c in tpl["spec"]["containers"]}
    assert ports == {"proxy": {8080, 8081}, "engine": set()}


def test_the_default_install_gives_every_pool_a_network_policy_unless_turned_off(helm):
    rules = _network_policy_arg(helm.template())  # cluster-wide watch: every namespace's pools
    assert rules is not None and rules["httpFrom"] == [] and rules["extraIngress"] == []
    assert _network_policy_arg(helm.template("--set", "networkPolicy.enabled=false")) is None
    assert _network_policy_arg(helm.template(*variant_args("namespaced"), "--set", "networkPolicy.enabled=false")) \
        is None


def test_monitoring_objects(helm):
    docs = helm.template(*variant_args("monitoring"))
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert pm["spec"]["namespaceSelector"] == {"any": True}


def test_pinned_images_and_externally_managed_identity(helm):
    docs = helm.template(*variant_args("pinned"))
    assert sorted(d["kind"] for d in docs) == ["Deployment"]
    _, pod, c = _operator(docs)
    assert pod["volumes"][0]["secret"]["secretName"] == "platform-vlmpool-token-key"
    assert c["image"] == f"registry.example.com:5000/platform/vlmpool-operator@{PINNED}"
    assert c["imagePullPolicy"] == "Always"
    patch = next(a for a in c["args"] if a.startswith("--patch-image="))
    assert patch.startswith("--patch-image=registry.example.com:5000/platform/vlmpool-patcher@sha256:fedcba98")
    assert "--patch-dora-image=registry.example.com:5000/platform/vlmpool-patcher-dora:0.1.0-torch" in c["args"]
    assert pod["serviceAccountName"] == "platform-vlmpool"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["tolerations"][0]["key"] == "node-role.kubernetes.io/control-plane"
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}


def test_extras(helm):
    docs = helm.template(*variant_args("extras"))
    dep, pod, c = _operator(docs)
    assert dep["metadata"]["name"] == "platform-vlmpool-operator" and dep["spec"]["replicas"] == 0
    assert not any(a.startswith("--patch-image") for a in c["args"])  # Jobs use the operator's default
    assert not any(a.startswith("--patch-dora-image") for a in c["args"])
    assert c["args"][-1] == "--push-parallelism=8" and "--adapter-root=/data/adapters" in c["args"]
    assert c["ports"][0]["containerPort"] == 9090
    assert {"name": "VLMPOOL_EXAMPLE", "value": "1"} in c["env"]
    assert c["volumeMounts"][1:] == [{"name": "scratch", "mountPath": "/tmp"}]
    assert pod["volumes"][1:] == [{"name": "scratch", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    tpl_meta = dep["spec"]["template"]["metadata"]
    assert tpl_meta["annotations"]["example.com/team"] == "platform"
    assert tpl_meta["labels"]["example.com/tier"] == "control"
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9090


def test_ha_replicas_with_leader_election_and_a_disruption_budget(helm):
    docs = helm.template(*variant_args("ha"))
    dep, _, c = _operator(docs)
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert c["args"][c["args"].index("--leader-elect"):][:5] == [
        "--leader-elect", "--leader-election-id=vlmpool-operator", "--lease-duration=20", "--renew-deadline=12.5",
        "--retry-period=3"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": dep["spec"]["selector"]}
    assert pdb["metadata"]["namespace"] == "vlmpool-system"
    # Readiness stays /readyz: followers answer ready, so a rolling update proceeds.
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_without_leader_election_one_replica_recreated_and_no_lease_role(helm):
    docs = helm.template("--set", "leaderElection.enabled=false")
    dep, _, c = _operator(docs)
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert not any(a.startswith("--leader") or a.startswith("--lease") for a in c["args"])
    assert not any(e["name"] in ("POD_NAME", "POD_NAMESPACE") for e in c["env"])
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")


def test_inconsistent_lease_timings_are_refused(helm):
    res = helm.run("template", "vlmpool", str(CHART), "--set", "leaderElection.renewDeadlineSeconds=15", check=False)
    assert res.returncode != 0
    assert "leaseDurationSeconds must be greater than renewDeadlineSeconds" in res.stderr


BAD_VALUES = [
    (["--set", "operator.replicas=6"], "/operator/replicas", "maximum"),
    (["--set", "operator.replicas=2", "--set", "leaderElection.enabled=false"], "/operator/replicas",
     "maximum: got 2, want 1"),
    (["--set", "leaderElection.retryPeriodSeconds=0"], "/leaderElection/retryPeriodSeconds", "exclusiveMinimum"),
    (["--set", "leaderElection.leader=true"], "/leaderElection", "leader"),
    (["--set", "operator.logLevel=TRACE"], "/operator/logLevel", "DEBUG"),
    (["--set", "operator.resyncSeconds=0"], "/operator/resyncSeconds", "exclusiveMinimum"),
    (["--set", "operator.metricsPort=70000"], "/operator/metricsPort", "maximum"),
    (["--set", "operator.securityContext.readOnlyRootFilesystem=false"],
     "/operator/securityContext/readOnlyRootFilesystem", "true"),
    (["--set", "operator.securityContext.runAsNonRoot=false"], "/operator/securityContext/runAsNonRoot", "true"),
    (["--set", "watch.namespaces={Team_A}"], "/watch/namespaces/0", "does not match pattern"),
    (["--set", "image.digest=sha256:abc"], "/image/digest", "does not match pattern"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy", "Always"),
    (["--set", "operator.replica=1"], "/operator", "replica"),
    (["--set", "serviceMonitor.interval=soon"], "/serviceMonitor/interval", "does not match pattern"),
]


@pytest.mark.parametrize("args,path,words", BAD_VALUES, ids=[a[1] for a, _, _ in BAD_VALUES])
def test_bad_values_are_refused_with_the_schema_message(helm, args, path, words):
    res = helm.run("template", "vlmpool", str(CHART), *args, check=False)
    assert res.returncode != 0
    assert "values don't meet the specifications of the schema(s)" in res.stderr, res.stderr
    assert path in res.stderr and words in res.stderr, res.stderr


def test_a_missing_service_account_name_is_refused(helm):
    res = helm.run("template", "vlmpool", str(CHART), "--set", "serviceAccount.create=false", check=False)
    assert res.returncode != 0
    assert "serviceAccount.name is required when serviceAccount.create is false" in res.stderr


def test_package_ships_the_crds_and_not_the_generator(helm, tmp_path):
    helm.run("package", str(CHART), "--destination", str(tmp_path))
    with tarfile.open(tmp_path / "vlmpool-0.1.0.tgz") as tar:
        names = set(tar.getnames())
        crds = {n for n in names if n.startswith("vlmpool/crds/")}
        assert crds == {"vlmpool/crds/vlmpool.io_vlmadapters.yaml", "vlmpool/crds/vlmpool.io_vlmpools.yaml"}
        for n in crds:
            assert tar.extractfile(n).read() == (CHART.parent.parent / "crds" / n.rsplit("/", 1)[1]).read_bytes()
        assert not any("/hack/" in n for n in names)
        assert "vlmpool/values.schema.json" in names


def test_the_pod_label_policy_admits_only_the_configured_pod_creators(helm):
    def policy(*args: str) -> dict:
        return next(d for d in helm.template(*args) if d["kind"] == "ValidatingAdmissionPolicy"
                    and d["metadata"]["name"].endswith("-labelled-pods"))

    p = policy()
    assert p["spec"]["matchConstraints"]["resourceRules"][0]["operations"] == ["CREATE", "UPDATE"]
    cond = p["spec"]["matchConditions"][0]["expression"]
    assert "'vlmpool.io/pool' in object.metadata.labels" in cond and "oldObject.metadata.labels" in cond
    check = p["spec"]["validations"][0]["expression"]
    # both identities of the controller manager, with and without --use-service-account-credentials
    for user in ("system:serviceaccount:kube-system:replicaset-controller",
                 "system:serviceaccount:kube-system:job-controller", "system:kube-controller-manager"):
        assert f'"{user}"' in check, check
    # pod templates with the labels: the operator's service account and the Deployment controller
    def templates(*args: str, namespace: str = "vlmpool-system") -> str:
        return next(d for d in helm.template(*args, namespace=namespace) if d["kind"] == "ValidatingAdmissionPolicy"
                    and d["metadata"]["name"].endswith("-labelled-templates"))["spec"]["validations"][0]["expression"]
    check = templates()
    for user in ("system:serviceaccount:vlmpool-system:vlmpool-operator",
                 "system:serviceaccount:kube-system:deployment-controller", "system:kube-controller-manager"):
        assert f'"{user}"' in check, check
    assert "job-controller" not in check and "replicaset-controller" not in check
    assert '"system:serviceaccount:platform:vlmpool"' in templates("--set", "serviceAccount.name=vlmpool",
                                                                    namespace="platform")
    only_ops = templates("--set", "admissionPolicy.operatorUser=ops",
                         "--set-json", "admissionPolicy.workloadCreators=[]")
    assert only_ops == 'request.userInfo.username in ["ops"]'
    p = policy("--set", "admissionPolicy.podCreators={system:kube-controller-manager}")
    want = 'request.userInfo.username in ["system:kube-controller-manager"]'
    assert p["spec"]["validations"][0]["expression"] == want
    assert not [d for d in helm.template("--set", "admissionPolicy.enabled=false")
                if d["kind"].startswith("ValidatingAdmissionPolicy")]
