"""deploy/rbac/ is generated from vlmpool.controller.rbac (the one place the rules live)."""

from __future__ import annotations

from pathlib import Path

import yaml

from vlmpool.controller import rbac

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_rbac_matches_the_generator():
    for fname, docs in rbac.deploy_documents().items():
        path = REPO / "deploy" / "rbac" / fname
        assert path.read_text() == rbac.render(docs), (
            f"{path} is stale: run `python -m vlmpool.controller.rbac deploy/rbac`")


def test_rules_are_narrow():
    role = yaml.safe_load((REPO / "deploy" / "rbac" / "clusterrole.yaml").read_text())
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "deletecollection" not in rule["verbs"]
        assert "delete" not in rule["verbs"] or rule["resources"] == ["jobs"]
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    # The pools' token Secrets are applied, never read back: no get/list/watch of any Secret.
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch"]}]


def test_bindings():
    rb = rbac.role_binding("ml", [rbac.subject_service_account("op", "ops")])
    assert rb["metadata"]["namespace"] == "ml" and rb["roleRef"]["kind"] == "ClusterRole"
    crb = rbac.cluster_role_binding([rbac.subject_user("alice")])
    assert crb["subjects"] == [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]
