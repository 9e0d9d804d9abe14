"""Credentials through the `kubernetes` package's loader (vlmpool.kube.config), against a real loopback
HTTP server that records the Authorization headers it receives: merged $KUBECONFIG files, token files,
in-cluster rotation, and an exec plugin whose short-lived tokens are renewed before they expire and
after a 401."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time

import pytest
import yaml
from aiohttp import web

from vlmpool.kube.client import NAMESPACES, KubeClient, Unauthorized
from vlmpool.kube.config import KubeConfig, KubeConfigError
from vlmpool.testing.kubeauth import exec_user, runs, write_exec_plugin


def kubeconfig(server: str, user: dict, *, name: str = "c", namespace: str = "ml", cluster: dict | None = None,
               current: bool = True) -> dict:
    doc = {"apiVersion": "v1", "kind": "Config",
           "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
           "clusters": [{"name": name, "cluster": cluster or {"server": server}}],
           "users": [{"name": name, "user": user}]}
    if current:
        doc["current-context"] = name
    return doc


class ApiServer:
    """A loopback server answering GET /api/v1/namespaces/<n> with the header it saw; tokens listed in
    `revoked` get a 401 Status, as the apiserver answers a revoked token."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.revoked: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        self.seen.append(auth)
        if auth and auth.removeprefix("Bearer ") in self.revoked:
            return web.json_response({"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized",
                                      "code": 401}, status=401)
        return web.json_response({"kind": "Namespace", "metadata": {"name": request.match_info["name"]},
                                  "auth": auth})


@pytest.fixture
async def apiserver():
    srv = ApiServer()
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/{name}", srv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.url = f"http://127.0.0.1:{runner.addresses[0][1]}"  # type: ignore[attr-defined]
    yield srv
    await runner.cleanup()


def test_merged_kubeconfig_files(tmp_path, monkeypatch):
    """$KUBECONFIG lists several files: they are merged as kubectl merges them (the first file that
    names an entry wins; current-context from any file), and missing files are skipped."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text(yaml.safe_dump(kubeconfig("https://first:6443", {"token": "from-a"}, current=False)))
    doc_b = kubeconfig("https://second:6443", {"token": "from-b"}, namespace="other")
    doc_b["contexts"].append({"name": "d", "context": {"cluster": "c", "user": "c", "namespace": "dee"}})
    b.write_text(yaml.safe_dump(doc_b))
    monkeypatch.setenv("KUBECONFIG", f"{a}:{tmp_path / 'missing'}:{b}")
    kc = KubeConfig.load()
    assert (kc.server, kc.header, kc.namespace) == ("https://first:6443", "Bearer from-a", "ml")
    assert KubeConfig.load(context="d").namespace == "dee"
    with pytest.raises(KubeConfigError, match="cannot read"):
        KubeConfig.load(tmp_path / "nope")
    with pytest.raises(KubeConfigError, match="nosuch"):
        KubeConfig.load(a, context="nosuch")


def test_token_file_cert_data_and_basic(tmp_path):
    (tmp_path / "tok").write_text("abc\n")
    p = tmp_path / "kc"
    p.write_text(yaml.safe_dump(kubeconfig("http://x:8080", {"tokenFile": "tok"})))
    kc = KubeConfig.load(p)
    assert kc.header == "Bearer abc" and kc.ssl_context() is False and kc.renew_at is None
    ca, cert, key = b"-----BEGIN CERTIFICATE-----\nCA\n", b"CERT", b"KEY"
    p.write_text(yaml.safe_dump(kubeconfig("https://h:6443", {
        "client-certificate-data": base64.b64encode(cert).decode(),
        "client-key-data": base64.b64encode(key).decode()},
        cluster={"server": "https://h:6443", "certificate-authority-data": base64.b64encode(ca).decode()})))
    kc = KubeConfig.load(p)
    assert kc.header is None
    assert [open(f, "rb").read() for f in (kc.ca_file, kc.cert_file, kc.key_file)] == [ca, cert, key]
    p.write_text(yaml.safe_dump(kubeconfig("http://x", {"username": "u", "password": "p"})))
    assert KubeConfig.load(p).header == "Basic " + base64.b64encode(b"u:p").decode()


def test_in_cluster_token_is_reread(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_bytes(b"SACA")
    (tmp_path / "namespace").write_text("vlmpool-system")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    kc = KubeConfig.in_cluster(tmp_path)
    assert (kc.server, kc.namespace, kc.header) == ("https://10.96.0.1:443", "vlmpool-system", "Bearer sa-token")
    assert kc.renew_at is not None and not kc.due()  # projected tokens rotate: re-read every minute
    (tmp_path / "token").write_text("rotated")
    monkeypatch.setattr(kc, "_renew_mono", time.monotonic() - 1)  # the minute has passed
    assert asyncio.run(kc.fresh_header()) == "Bearer rotated"


def test_failing_exec_plugin_is_refused(tmp_path):
    """The loader only logs a failing plugin; vlmpool refuses to go on without credentials."""
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/sh\necho 'no login' >&2\nexit 3\n")
    script.chmod(0o755)
    p = tmp_path / "kc"
    p.write_text(yaml.safe_dump(kubeconfig("http://x", exec_user(script))))
    with pytest.raises(KubeConfigError, match="exec credentials produced no token"):
        KubeConfig.load(p)


async def test_exec_plugin_tokens_renewed_before_expiry_and_after_401(tmp_path, apiserver):
    script, counter = write_exec_plugin(tmp_path / "plugin", lifetime=3)
    p = tmp_path / "kc"
    p.write_text(yaml.safe_dump(kubeconfig(apiserver.url, exec_user(script))))
    kc = KubeConfig.load(p)
    assert runs(counter) == 1 and kc.header == "Bearer exec-token-1"
    info = await kc.kopf_connection_info()
    assert (info.scheme, info.token, info.expiration) == ("Bearer", "exec-token-1", kc.renew_at)
    assert info.expiration is not None and info.expiration > dt.datetime.now(dt.UTC)
    async with KubeClient(kc) as kube:
        # Requests for a while: the plugin runs again before each token expires, never per request.
        deadline = time.monotonic() + 7
        n = 0
        while time.monotonic() < deadline:
            await kube.get(NAMESPACES, "x")
            n += 1
            await asyncio.sleep(0.05)
        seen = [h for h in apiserver.seen]
        assert runs(counter) in (3, 4, 5) and n > 20, (runs(counter), n)
        assert seen[0] == "Bearer exec-token-1" and seen[-1] == f"Bearer exec-token-{runs(counter)}"
        assert seen == sorted(seen, key=lambda h: int(h.rsplit("-", 1)[1]))  # never back to an old token
        # A revoked token: the 401 renews the credentials once and the request succeeds.
        before = runs(counter)
        apiserver.revoked.add(f"exec-token-{before}")
        out = await kube.get(NAMESPACES, "y")
        assert out["auth"] == f"Bearer exec-token-{before + 1}" and runs(counter) == before + 1
        # kopf's second login (after its own 401) renews too, unless the credentials are brand new.
        info = await kc.kopf_connection_info(renew_older_than=5.0)
        assert info.token == f"exec-token-{before + 1}" and runs(counter) == before + 1
        # Every token refused: one renewal, then the 401 is the caller's.
        apiserver.revoked.update(f"exec-token-{i}" for i in range(1, 100))
        with pytest.raises(Unauthorized):
            await kube.get(NAMESPACES, "z")
        assert runs(counter) == before + 2
