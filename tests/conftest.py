"""Shared fixtures. The control plane is real: etcd + kube-apiserver + kube-controller-manager of
Kubernetes v1.35.4 as local processes on loopback (see vlmpool.localcluster.controlplane)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

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
    control_plane.kubectl("apply", "--server-side", "--field-manager=vlmpool-tests", "-f", str(CRD_DIR))
    names = [f"crd/{p.name.split('_', 1)[1].removesuffix('.yaml')}.vlmpool.io" for p in sorted(CRD_DIR.glob("*.yaml"))]
    control_plane.wait_crds_established(*names)
    # Discovery must know the new kinds before kubectl can map short names.
    def discovered() -> bool:
        res = control_plane.kubectl("api-resources", "--api-group=vlmpool.io", "-o", "name", check=False)
        return "vlmpools.vlmpool.io" in res.stdout and "vlmadapters.vlmpool.io" in res.stdout
    wait_for(discovered, 30, interval=0.5, what="discovery to know the vlmpool.io kinds")
    return names


@pytest.fixture
def namespace(control_plane):
    """A fresh namespace per test, deleted afterwards (without waiting for finalizers)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


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
