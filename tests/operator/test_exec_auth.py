"""`vlmpool operator` through a kubeconfig whose user is an exec credential plugin, on the real
apiserver: the plugin hands out real ServiceAccount tokens with a short expirationTimestamp, runs again
before each expires, and the operator (its own client and kopf's watches and patches) keeps working
after the older tokens are revoked on the server."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from test_adapter import adapter_obj, adapter_status, patch_jobs, pool_obj
from vlmtest.operator import OperatorProcess, free_port

from vlmpool.controller import rbac
from vlmpool.testing.kubeauth import exec_user, runs, write_exec_plugin
from vlmpool.testing.waiting import wait_until

pytestmark = pytest.mark.apiserver

SA = "vlmpool-exec"
TOKENS = 12
LIFETIME = 8  # seconds, as the plugin announces it (the apiserver honours each token for 10 minutes)


def mint_tokens(control_plane, ns: str, out) -> None:
    """Token i is bound to Secret tok-i: deleting the Secret revokes the token on the apiserver."""
    out.mkdir()
    secrets = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"tok-{i}", "namespace": ns}}
               for i in range(1, TOKENS + 1)]
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": secrets}))
    for i in range(1, TOKENS + 1):
        tok = control_plane.kubectl("create", "token", SA, "-n", ns, "--duration=10m", "--bound-object-kind=Secret",
                                    f"--bound-object-name=tok-{i}").stdout.strip()
        (out / str(i)).write_text(tok)


async def test_operator_renews_exec_plugin_tokens(control_plane, kube, namespace, operator_role, adapter_root,
                                                  tmp_path):
    ns = namespace
    control_plane.kubectl("create", "serviceaccount", SA, "-n", ns)
    binding = rbac.role_binding(ns, [rbac.subject_service_account(SA, ns)], role=operator_role)
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(binding))
    mint_tokens(control_plane, ns, tmp_path / "tokens")
    script, counter = write_exec_plugin(tmp_path / "plugin", lifetime=LIFETIME, tokens=tmp_path / "tokens")
    kubeconfig = tmp_path / "exec.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "exec",
        "clusters": [{"name": "local", "cluster": {"server": control_plane.server,
                                                   "certificate-authority-data": _b64(control_plane.ca_pem)}}],
        "users": [{"name": "plugin", "user": exec_user(script)}],
        "contexts": [{"name": "exec", "context": {"cluster": "local", "user": "plugin", "namespace": ns}}]}))

    op = await OperatorProcess(kubeconfig, ns, adapter_root, tmp_path / "operator.log", resync=2.0).start()
    try:
        await kube.create(pool_obj("pool", 0, free_port(), free_port(), free_port()), ns)
        await kube.create(adapter_obj("first", "pool", f"file://{tmp_path}/first"), ns)
        await wait_until(lambda: patch_jobs(kube, ns, "first"), what="the first adapter's Job")
        # The tokens expire (client-side) every LIFETIME seconds: the plugin runs again, on time.
        t0, first = time.monotonic(), runs(counter)
        await wait_until(lambda: _ge(runs(counter), first + 2), timeout=4 * LIFETIME,
                         what="two renewals by the exec plugin")
        assert time.monotonic() - t0 > LIFETIME * 0.8  # not per request: once per lifetime
        # Revoke every token but the newest on the apiserver: only renewed credentials work now.
        current = runs(counter)
        control_plane.kubectl("delete", "secret", "-n", ns, *[f"tok-{i}" for i in range(1, current)])
        await kube.create(adapter_obj("second", "pool", f"file://{tmp_path}/second"), ns)
        await wait_until(lambda: patch_jobs(kube, ns, "second"), what="the second adapter's Job")
        await wait_until(lambda: adapter_status(kube, ns, "second", phase="Patching"), what="second Patching")
        await wait_until(lambda: _ge(runs(counter), current + 1), timeout=2 * LIFETIME, what="one more renewal")
        await kube.create(adapter_obj("third", "pool", f"file://{tmp_path}/third"), ns)
        await wait_until(lambda: adapter_status(kube, ns, "third", phase="Patching"), what="third Patching")
        log = op.tail(200_000)
        # kopf logged in again on each expiration (not only after a 401) and never ran out of credentials.
        assert log.count("Re-authentication has been initiated") >= 2, log[-3000:]
        assert "Ran out of valid credentials" not in log and "renewing the kubernetes credentials failed" not in log
        assert "kubernetes credentials renewed" in log
    finally:
        op.stop()
    assert runs(counter) <= TOKENS


async def _ge(a: int, b: int) -> bool:
    return a >= b


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
