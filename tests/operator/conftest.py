"""Fixtures of the operator tests: the operator runs as `vlmpool operator` under a user bound to the
ClusterRole of vlmpool.controller.rbac and its leader-election Role (and nothing else), which proves
those rules suffice."""

from __future__ import annotations

import json

import pytest
from vlmtest.operator import OperatorProcess, PodProcesses, ensure_node, stop_operators

from vlmpool.controller import rbac
from vlmpool.kube.client import VLMADAPTERS, KubeClient
from vlmpool.kube.config import KubeConfig

OPERATOR_USER = "vlmpool-operator-test"


ROLE = "vlmpool-operator-test"


@pytest.fixture(scope="session")
def operator_role(control_plane, crds):
    role = rbac.cluster_role(ROLE)
    control_plane.kubectl("apply", "--server-side", "--field-manager=vlmpool-tests", "-f", "-",
                          input=json.dumps(role))
    return ROLE


@pytest.fixture
def operator_kubeconfig(control_plane, namespace, operator_role):
    """A kubeconfig for a user whose only rights are the operator's ClusterRole, bound in the test
    namespace (as an operator started with --namespace is deployed), and the leader-election Role in
    that namespace (the Lease of `--leader-elect` lives there)."""
    binding = rbac.role_binding(namespace, [rbac.subject_user(OPERATOR_USER)], role=operator_role)
    le_role = rbac.leader_election_role(namespace)
    le_binding = rbac.leader_election_role_binding(namespace, [rbac.subject_user(OPERATOR_USER)])
    for doc in (binding, le_role, le_binding):
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(doc))
    return control_plane.kubeconfig_for(OPERATOR_USER)


@pytest.fixture
async def other_namespace(control_plane, namespace, operator_role, kube):
    """A second namespace for an operator started with `--namespace <it>` besides the test namespace
    (another tenant): the operator's user is bound in it as in the test namespace. On teardown the
    finalizers of the adapters left in it are dropped and it is deleted."""
    name = f"{namespace}-b"
    control_plane.kubectl("create", "namespace", name)
    binding = rbac.role_binding(name, [rbac.subject_user(OPERATOR_USER)], role=operator_role)
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(binding))
    try:
        yield name
    finally:
        for a in await kube.list(VLMADAPTERS, name):
            if a["metadata"].get("finalizers"):
                await kube.patch(VLMADAPTERS, a["metadata"]["name"], {"metadata": {"finalizers": None}}, name)
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
async def kube(control_plane):
    """An admin client (the test plays the kubelet and the user)."""
    client = KubeClient(KubeConfig.load(control_plane.kubeconfig))
    await ensure_node(client)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def adapter_root(tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    return root


@pytest.fixture
async def operator(operator_kubeconfig, namespace, adapter_root, tmp_path, kube):
    """Start/stop `vlmpool operator` for the test namespace; on teardown the finalizers of what is
    left are dropped so the namespace can go."""
    procs: list[OperatorProcess] = []
    log = tmp_path / "operator.log"

    async def start(resync: float = 3.0, extra_args: tuple[str, ...] = (),
                    log_name: str | None = None) -> OperatorProcess:
        op = OperatorProcess(operator_kubeconfig, namespace, adapter_root, tmp_path / log_name if log_name else log,
                             resync=resync, extra_args=list(extra_args))
        procs.append(op)
        return await op.start()

    start.log = log  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        await stop_operators(procs, kube, namespace)


@pytest.fixture
def pod_processes():
    started: list[PodProcesses] = []
    yield started
    for p in started:
        p.stop()
