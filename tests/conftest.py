"""Shared fixtures. The control plane is real: etcd + kube-apiserver + kube-controller-manager of
Kubernetes (the release pinned in vlmpool/pins.py) as local processes on loopback (see
vlmpool.localcluster.controlplane)."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import pytest
from vlmtest.operator import OperatorProcess, PodProcesses, ensure_node, stop_operators

from vlmpool.controller import rbac
from vlmpool.testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "crds"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    from vlmpool.localcluster.controlplane import ControlPlane

    cp = ControlPlane(workdir=tmp_path_factory.mktemp("control-plane"))
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubectl(control_plane):
    """Run the built kubectl against the test control plane as the admin."""
    return control_plane.kubectl


@pytest.fixture(scope="session")
def crds(control_plane):
    """The CRDs from crds/, applied and Established."""
    from vlmpool.names import ADAPTER_PLURAL, GROUP, POOL_PLURAL

    control_plane.kubectl("apply", "--server-side", "--field-manager=vlmpool-tests", "-f", str(CRD_DIR))
    names = [f"crd/{p.name.split('_', 1)[1].removesuffix('.yaml')}.{GROUP}" for p in sorted(CRD_DIR.glob("*.yaml"))]
    control_plane.wait_crds_established(*names)
    # Discovery must know the new kinds before kubectl can map short names.
    def discovered() -> bool:
        res = control_plane.kubectl("api-resources", f"--api-group={GROUP}", "-o", "name", check=False)
        return f"{POOL_PLURAL}.{GROUP}" in res.stdout and f"{ADAPTER_PLURAL}.{GROUP}" in res.stdout
    wait_for(discovered, 30, interval=0.5, what=f"discovery to know the {GROUP} kinds")
    return names


@pytest.fixture
def namespace(control_plane):
    """A fresh namespace per test, deleted afterwards (without waiting for finalizers)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)



# ------------------------------------------------------------------ the operator on the control plane
# `vlmpool operator` runs as a process under a user bound to the ClusterRole of vlmpool.controller.rbac
# and its leader-election Role (and nothing else), which proves those rules suffice. The tests play the
# kubelet (vlmtest.operator). tests/operator and tests/security share these.

OPERATOR_USER = "vlmpool-operator-test"
OPERATOR_ROLE = "vlmpool-operator-test"


@pytest.fixture(scope="session")
def operator_role(control_plane, crds):
    role = rbac.cluster_role(OPERATOR_ROLE)
    control_plane.kubectl("apply", "--server-side", "--field-manager=vlmpool-tests", "-f", "-",
                          input=json.dumps(role))
    return OPERATOR_ROLE


@pytest.fixture
def operator_user() -> str:
    """The user operator_kubeconfig authenticates as."""
    return OPERATOR_USER


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
async def kube(control_plane):
    """An admin client (the test plays the kubelet and the user); the Node the tests bind pods to exists."""
    from vlmpool.kube.client import KubeClient
    from vlmpool.kube.config import KubeConfig

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
def operator_host_paths() -> list[str]:
    """The --allow-host-path directories of the `operator` fixture: the temp dir, where the tests' file://
    sources live (tests/security overrides it with none, the product's default)."""
    return [tempfile.gettempdir()]


@pytest.fixture
async def operator(operator_kubeconfig, namespace, adapter_root, tmp_path, kube, operator_host_paths):
    """start(resync=3.0, extra_args=(), log_name=None, host_paths=None) starts `vlmpool operator` for the
    test namespace (host_paths None: operator_host_paths) and returns its OperatorProcess once ready; on
    teardown every one started stops and the finalizers of what is left are dropped so the namespace can go."""
    procs: list[OperatorProcess] = []
    log = tmp_path / "operator.log"

    async def start(resync: float = 3.0, extra_args: tuple[str, ...] = (), log_name: str | None = None,
                    host_paths: tuple[str, ...] | None = None) -> OperatorProcess:
        op = OperatorProcess(operator_kubeconfig, namespace, adapter_root, tmp_path / log_name if log_name else log,
                             resync=resync, extra_args=list(extra_args),
                             host_paths=list(operator_host_paths if host_paths is None else host_paths))
        procs.append(op)
        return await op.start()

    start.log = log  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        await stop_operators(procs, kube, namespace)


@pytest.fixture
def pod_processes():
    """The pool pods' processes a test started (vlmtest.operator.start_pod_processes): stopped on teardown."""
    started: list[PodProcesses] = []
    yield started
    for p in started:
        p.stop()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.apiserver)



# With CI set, the suites that need the local cluster must run: a skip there (no root, no unshare,
# no binaries) fails the run instead of leaving it green with the most important tests unrun.
MUST_RUN_IN_CI = ("tests/localcluster/", "tests/e2e/", "tests/routing/")
_ci_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and report.nodeid.startswith(MUST_RUN_IN_CI):
        _ci_skips.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''}")


def pytest_sessionfinish(session, exitstatus):
    import os

    if os.environ.get("CI") and _ci_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    import os

    if os.environ.get("CI") and _ci_skips:
        terminalreporter.section("skipped in CI (fails the run)", red=True)
        for line in _ci_skips:
            terminalreporter.line(line)
