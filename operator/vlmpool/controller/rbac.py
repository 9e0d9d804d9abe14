"""The operator's RBAC rules: the one place they are written.

`deploy/rbac/` holds the YAML generated from here (`python -m vlmpool.controller.rbac deploy/rbac`),
the Helm chart renders the same rules, and the apiserver tests run the operator under a user bound to
exactly this ClusterRole, which proves the rules suffice. A unit test keeps the checked-in YAML equal
to the generated YAML.

Why each rule is needed:
- vlmpools, vlmadapters: kopf lists/watches them and patches metadata (finalizer, progress and
  diff-base annotations); their status subresources carry what the operator reports.
- */finalizers update: owner references with blockOwnerDeletion need it where the
  OwnerReferencesPermissionEnforcement admission plugin is on (e.g. OpenShift).
- deployments: server-side apply (patch, plus create: an apply that creates is authorized as
  create too) and list/watch to copy replica counts into the pool's status.
- services, persistentvolumeclaims: server-side apply only (create, patch).
- secrets: the pools' admin-token Secrets are server-side applied (create, patch). The operator
  reads no Secret: each token is an HMAC of the pool's namespace/name/uid under a key the operator
  gets as a file (--token-key-file; the chart mounts it), so it never needs get/list/watch on
  secrets, and a tenant's credentials Secret is never read (patch Jobs reference it by name).
- pods: list/watch to push state when a pod starts or restarts and to read patch Jobs' termination
  messages.
- jobs: create the patch and cleanup Jobs (get after an AlreadyExists), watch them for completion,
  delete an unfinished patch Job of an adapter being deleted (so it cannot publish after the cleanup).
- replicasets list: a push goes only to pods of the pool's own ReplicaSet chain (pod -> ReplicaSet ->
  Deployment -> VLMPool, uids matching); the ReplicaSets are listed when a pod names one not known yet.
- events: kopf and the operator post Kubernetes Events (create); the operator lists a patch Job's
  FailedCreate Events to say why its pod cannot be created (list).
- networkpolicies: a pool's NetworkPolicy (--network-policy; the chart sets it), create and patch.
- Every child above is checked before it is written (controller/children.py) with a JSON patch of
  `test` operations, which needs patch only: no get on any child kind, so still no Secret read.
- inferencepools, serviceaccounts, configmaps, roles, rolebindings: server-side apply of a pool's
  `spec.routing` children (manifests/routing.py); inferencepools also get/list/watch and pods get,
  because the EPP's Role grants exactly those and RBAC lets a user grant only what it holds.

Leader election (`vlmpool operator --leader-elect`, more than one replica) needs more, and only in
the namespace of the Lease: LEADER_ELECTION_RULES, in a namespaced Role (`leader_election_role`)
bound by `leader_election_role_binding`. leases get/create/update: read the Lease, create it when
absent, take it over or renew it with an optimistic-concurrency PUT (no list/watch/delete/patch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from vlmpool.names import ADAPTER_PLURAL, GROUP, POOL_PLURAL

CLUSTER_ROLE = "vlmpool-operator"
SERVICE_ACCOUNT = "vlmpool-operator"
LEADER_ELECTION_ROLE = "vlmpool-operator-leader-election"

RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": [POOL_PLURAL, ADAPTER_PLURAL],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{POOL_PLURAL}/status", f"{ADAPTER_PLURAL}/status"],
     "verbs": ["patch"]},
    {"apiGroups": [GROUP], "resources": [f"{POOL_PLURAL}/finalizers", f"{ADAPTER_PLURAL}/finalizers"],
     "verbs": ["update"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services", "persistentvolumeclaims"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "patch"]},
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["serviceaccounts", "configmaps"], "verbs": ["create", "patch"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list"]},
]

LEADER_ELECTION_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
]


def cluster_role(name: str = CLUSTER_ROLE, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": labels or {"app.kubernetes.io/name": "vlmpool",
                                                         "app.kubernetes.io/component": "operator"}},
        "rules": [dict(r) for r in RULES],
    }


def subject_service_account(name: str, namespace: str) -> dict[str, str]:
    return {"kind": "ServiceAccount", "name": name, "namespace": namespace}


def subject_user(name: str) -> dict[str, str]:
    return {"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"}


def cluster_role_binding(subjects: list[dict[str, str]], name: str = CLUSTER_ROLE,
                         role: str = CLUSTER_ROLE) -> dict[str, Any]:
    """For `vlmpool operator --all-namespaces`."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": subjects,
    }


def role_binding(namespace: str, subjects: list[dict[str, str]], name: str = CLUSTER_ROLE,
                 role: str = CLUSTER_ROLE) -> dict[str, Any]:
    """For an operator watching given namespaces: one RoleBinding of the ClusterRole per namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": subjects,
    }


def leader_election_role(namespace: str, name: str = LEADER_ELECTION_ROLE,
                         labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The Role for the Lease of leader election, in the Lease's namespace only."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": labels or {"app.kubernetes.io/name": "vlmpool",
                                          "app.kubernetes.io/component": "operator"}},
        "rules": [dict(r) for r in LEADER_ELECTION_RULES],
    }


def leader_election_role_binding(namespace: str, subjects: list[dict[str, str]],
                                 name: str = LEADER_ELECTION_ROLE, role: str = LEADER_ELECTION_ROLE) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": subjects,
    }


def deploy_documents(namespace: str = "vlmpool-system") -> dict[str, list[dict[str, Any]]]:
    """The files of deploy/rbac/: file name -> documents."""
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, "namespace": namespace}}
    return {
        "clusterrole.yaml": [cluster_role()],
        "serviceaccount.yaml": [sa],
        "clusterrolebinding.yaml": [cluster_role_binding([subject_service_account(SERVICE_ACCOUNT, namespace)])],
        "leader-election-role.yaml": [leader_election_role(namespace)],
        "leader-election-rolebinding.yaml": [
            leader_election_role_binding(namespace, [subject_service_account(SERVICE_ACCOUNT, namespace)])],
    }


HEADER = "# Generated from operator/vlmpool/controller/rbac.py; do not edit by hand.\n"


def render(docs: list[dict[str, Any]]) -> str:
    return HEADER + "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, docs in deploy_documents().items():
        p = out_dir / fname
        p.write_text(render(docs))
        written.append(p)
    return written


if __name__ == "__main__":  # pragma: no cover
    for p in write(Path(sys.argv[1] if len(sys.argv) > 1 else "deploy/rbac")):
        print(p)
