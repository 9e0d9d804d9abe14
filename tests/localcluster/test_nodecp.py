"""The real node's control plane (vlmpool.localcluster.nodecp, run by hack/node.sh): bound to and
advertising the node's address, so that the `kubernetes` Service leads pods there; credentials for the
scheduler and kube-proxy under the users Kubernetes' default RBAC binds; a clean stop on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from vlmpool.localcluster.controlplane import find_binaries, free_port
from vlmpool.testing.waiting import wait_for

ADDRESS = "127.0.0.2"  # not the default 127.0.0.1: the option must reach bind, advertise and the certificate


def test_nodecp_serves_on_the_node_address_and_stops_on_sigterm(tmp_path):
    port = free_port(ADDRESS)
    proc = subprocess.Popen([sys.executable, "-m", "vlmpool.localcluster.nodecp", "--workdir", str(tmp_path),
                             "--address", ADDRESS, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    kubectl = str(find_binaries() / "kubectl")

    def k(kubeconfig: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([kubectl, f"--kubeconfig={tmp_path / kubeconfig}", *args], capture_output=True,
                              text=True, timeout=60)
    try:
        wait_for(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, 180, what="nodecp ready")
        assert proc.poll() is None, proc.stdout.read()
        assert (tmp_path / "ready").read_text().strip() == f"https://{ADDRESS}:{port}"
        # kubectl verified the serving certificate for this address. The apiserver advertises it (the
        # `kubernetes` Service's endpoint; a loopback one is left out of EndpointSlices, so read the flags).
        assert k("admin.kubeconfig", "get", "--raw", "/readyz").stdout == "ok"
        argv = _cmdline_of("kube-apiserver", str(tmp_path))
        assert f"--advertise-address={ADDRESS}" in argv and f"--bind-address={ADDRESS}" in argv
        assert "--kubelet-preferred-address-types=InternalIP" in argv
        # The components' users have their default roles, and no more.
        can_bind = k("kube-scheduler.kubeconfig", "auth", "can-i", "create", "pods", "--subresource=binding")
        assert can_bind.stdout.strip() == "yes"
        assert k("kube-proxy.kubeconfig", "auth", "can-i", "list", "endpointslices").stdout.strip() == "yes"
        assert k("kube-proxy.kubeconfig", "auth", "can-i", "create", "pods").stdout.strip() == "no"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert not (tmp_path / "ready").exists()


def _cmdline_of(binary: str, mentioning: str) -> list[str]:
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and argv[0].endswith("/" + binary) and any(mentioning in a for a in argv):
            return argv
    raise AssertionError(f"no {binary} process mentioning {mentioning}")
