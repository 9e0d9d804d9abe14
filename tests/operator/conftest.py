"""Fixtures of the operator tests only; the operator, its user and the admin client are tests/conftest.py's."""

from __future__ import annotations

import json

import pytest

from vlmpool.controller import rbac
from vlmpool.kube.client import VLMADAPTERS


@pytest.fixture
async def other_namespace(control_plane, namespace, operator_role, operator_user, kube):
    """A second namespace for an operator started with `--namespace <it>` besides the test namespace
    (another tenant): the operator's user is bound in it as in the test namespace. On teardown the
    finalizers of the adapters left in it are dropped and it is deleted."""
    name = f"{namespace}-b"
    control_plane.kubectl("create", "namespace", name)
    binding = rbac.role_binding(name, [rbac.subject_user(operator_user)], role=operator_role)
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(binding))
    try:
        yield name
    finally:
        for a in await kube.list(VLMADAPTERS, name):
            if a["metadata"].get("finalizers"):
                await kube.patch(VLMADAPTERS, a["metadata"]["name"], {"metadata": {"finalizers": None}}, name)
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
