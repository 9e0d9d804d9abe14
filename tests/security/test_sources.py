"""Issue #11 item 1, as a hostile tenant would try it: a source URI that redirects a patch Job's fetch to
clear text, to another host (with the tenant's credential), or straight at loopback, cloud metadata
and cluster-internal addresses, also through a resolver that lies (DNS rebinding). Real HTTPS servers
on loopback record what reached them."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from vlmpool.patcher import PatchError, fetch_adapter

TOKEN = "Bearer tenant-secret-token"
CFG, W = "adapter_config.json", "adapter_model.safetensors"
FILES = {CFG: json.dumps({"peft_type": "LORA", "r": 8}).encode(), W: b"\x00" * 256}
LOOPBACK = ["127.0.0.0/8"]  # the test servers live on loopback: allow-list it where the redirect is the point


def tgz(files: dict[str, bytes] = FILES) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def refused(uri: str, tmp_path, reason: str, **kw) -> PatchError:
    with pytest.raises(PatchError) as ei:
        fetch_adapter(uri, tmp_path / "work", **kw)
    assert ei.value.reason == reason, ei.value
    return ei.value


@pytest.fixture
def credential(monkeypatch):
    monkeypatch.setenv("AUTHORIZATION", TOKEN)
    return TOKEN


# ------------------------------------------------------------------ redirects

@pytest.mark.parametrize("target", ["sink", "ftp"])
def test_https_redirect_off_https_is_refused_and_reaches_nothing(origin, sink, credential, tmp_path, target):
    sink.routes["/a.tgz"] = tgz()
    to = f"{sink.url}/a.tgz" if target == "sink" else f"ftp://127.0.0.1:{sink.port}/a.tgz"
    origin.routes["/a.tgz"] = ("redirect", to)
    e = refused(f"{origin.url}/a.tgz", tmp_path, "SourceRedirectRefused", allow=LOOPBACK)
    assert "never leaves https" in e.message
    assert sink.seen == []                          # not even a request without the credential
    assert origin.auth_seen() == [TOKEN]


def test_directory_url_redirect_of_the_weights_to_http_is_refused(origin, sink, credential, tmp_path):
    origin.routes["/dir/" + CFG] = FILES[CFG]
    origin.routes["/dir/" + W] = ("redirect", f"{sink.url}/w", 301)
    sink.routes["/w"] = FILES[W]
    refused(f"{origin.url}/dir/", tmp_path, "SourceRedirectRefused", allow=LOOPBACK)
    assert sink.seen == []


@pytest.mark.parametrize("where", ["other-host", "other-port"])
def test_credentials_never_follow_a_redirect_to_another_origin(origin, other, servers, credential, tmp_path, where):
    dest = other if where == "other-host" else servers("127.0.0.1", "https")
    dest.routes["/a.tgz"] = tgz()
    origin.routes["/a.tgz"] = ("redirect", f"{dest.url}/a.tgz", 307)
    f = fetch_adapter(f"{origin.url}/a.tgz", tmp_path / "work", allow=LOOPBACK)
    assert f.weights_path.read_bytes() == FILES[W]
    assert [s.path for s in dest.seen] == ["/a.tgz"] and dest.auth_seen() == []
    assert origin.auth_seen() == [TOKEN]


def test_same_origin_redirect_keeps_the_credential(origin, credential, tmp_path):
    origin.routes["/old.tgz"] = ("redirect", "/new.tgz")
    origin.routes["/new.tgz"] = tgz()
    fetch_adapter(f"{origin.url}/old.tgz", tmp_path / "work", allow=LOOPBACK)
    assert origin.auth_seen() == [TOKEN, TOKEN]


# ------------------------------------------------------------------ internal destinations

@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "[::1]", "169.254.169.254", "[fd00:ec2::254]",
                                  "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "[fc00::1]",
                                  "[fe80::1]", "0.0.0.0", "[::ffff:127.0.0.1]", "[::ffff:169.254.169.254]",
                                  "[64:ff9b::a9fe:a9fe]", "224.0.0.1"])
def test_internal_addresses_are_refused_by_default(host, tmp_path):
    e = refused(f"https://{host}:1/a.tgz", tmp_path, "SourceAddressRefused")
    assert "--source-allow" in e.message


@pytest.mark.parametrize("name", ["kubernetes.default.svc", "vault.secrets.svc.cluster.local", "localhost",
                                  "metadata.google.internal", "printer.local", "intranet"])
def test_internal_names_are_refused_before_resolution(name, tmp_path, resolver):
    resolver[name] = "127.0.0.1"
    e = refused(f"https://{name}/a.tgz", tmp_path, "SourceAddressRefused")
    assert "cluster-internal or local name" in e.message


def test_loopback_server_is_never_contacted(origin, credential, tmp_path):
    origin.routes["/a.tgz"] = tgz()
    refused(f"{origin.url}/a.tgz", tmp_path, "SourceAddressRefused")
    assert origin.seen == []


def test_dns_rebinding_is_checked_on_the_connected_address(origin, credential, tmp_path, resolver):
    """A public-looking name whose resolver answers loopback: the address actually connected to is
    what counts."""
    origin.routes["/a.tgz"] = tgz()
    resolver["evil.example.com"] = "127.0.0.1"
    e = refused(f"https://evil.example.com:{origin.port}/a.tgz", tmp_path, "SourceAddressRefused")
    assert "evil.example.com at 127.0.0.1 is a loopback address" in e.message
    assert origin.seen == []


def test_allow_list_by_name_admits_an_air_gapped_mirror(origin, credential, tmp_path, resolver, monkeypatch):
    origin.routes["/a.tgz"] = tgz()
    resolver["mirror.example.com"] = "127.0.0.1"
    resolver["evil.example.com"] = "127.0.0.1"
    monkeypatch.setenv("VLMPOOL_SOURCE_ALLOW", "mirror.example.com")
    f = fetch_adapter(f"https://mirror.example.com:{origin.port}/a.tgz", tmp_path / "w1")
    assert f.sha256 == hashlib.sha256(origin.routes["/a.tgz"]).hexdigest()
    # The same address under a name that is not allow-listed stays refused.
    refused(f"https://evil.example.com:{origin.port}/a.tgz", tmp_path, "SourceAddressRefused")


def test_allow_listed_cidr_does_not_open_its_redirect_targets(origin, other, credential, tmp_path):
    other.routes["/a.tgz"] = tgz()
    origin.routes["/a.tgz"] = ("redirect", f"{other.url}/a.tgz")
    refused(f"{origin.url}/a.tgz", tmp_path, "SourceAddressRefused", allow=["127.0.0.1/32"])
    assert other.seen == []


def test_invalid_allow_list_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMPOOL_SOURCE_ALLOW", "mirror.example.com,not a host!")
    refused("https://example.com/a.tgz", tmp_path, "InvalidArguments")


# ------------------------------------------------------------------ hf:// and s3://

def _hf_routes(srv, files: dict[str, bytes], redirect_to: str | None = None) -> None:
    def tree(h):
        entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                   for p, b in files.items()]
        return 200, {"Content-Type": "application/json"}, json.dumps(entries).encode()

    srv.routes["/api/models/org/repo/tree/main"] = tree
    commit = hashlib.sha1(b"main").hexdigest()
    for path, data in files.items():
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        if redirect_to and path == W:
            srv.routes[f"/org/repo/resolve/main/{path}"] = lambda h, etag=etag, data=data: (302, {
                "Location": f"{redirect_to}/{W}", "X-Repo-Commit": commit, "X-Linked-Etag": etag,
                "X-Linked-Size": str(len(data)), "ETag": etag}, b"")
        else:
            srv.routes[f"/org/repo/resolve/main/{path}"] = lambda h, etag=etag, data=data: (200, {
                "X-Repo-Commit": commit, "ETag": etag}, data)


@pytest.fixture
def hf_env(monkeypatch, origin):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_ENDPOINT", origin.url)
    monkeypatch.setenv("HF_TOKEN", "hf_tenant_token")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    import huggingface_hub
    huggingface_hub.close_session()  # its shared client must trust this test's certificate
    return origin


def test_hf_redirect_to_plain_http_is_refused(hf_env, sink, tmp_path):
    sink.routes["/" + W] = FILES[W]
    _hf_routes(hf_env, FILES, redirect_to=sink.url)
    refused("hf://org/repo", tmp_path, "SourceRedirectRefused", allow=LOOPBACK)
    assert sink.seen == []


def test_hf_token_goes_to_the_endpoint_only(hf_env, other, tmp_path):
    other.routes["/" + W] = FILES[W]
    _hf_routes(hf_env, FILES, redirect_to=other.url)
    f = fetch_adapter("hf://org/repo", tmp_path / "work", allow=LOOPBACK)
    assert f.weights_path.read_bytes() == FILES[W]
    assert other.seen and other.auth_seen() == []
    assert "Bearer hf_tenant_token" in hf_env.auth_seen()


def test_hf_token_does_not_follow_a_mirror_to_the_hub(hf_env, servers, resolver, tmp_path):
    """huggingface_hub itself forwards the token to its own Hub origins (https://huggingface.co:443);
    with a mirror as the endpoint, even that is another host."""
    try:
        hub = servers("127.0.0.2", "https", port=443)
    except OSError as e:
        pytest.skip(f"cannot listen on 127.0.0.2:443 here: {e}")
    resolver["huggingface.co"] = "127.0.0.2"
    etag = f'"{hashlib.sha256(FILES[W]).hexdigest()}"'
    hub.routes["/" + W] = lambda h: (200, {"X-Repo-Commit": hashlib.sha1(b"main").hexdigest(), "ETag": etag}, FILES[W])
    _hf_routes(hf_env, FILES, redirect_to="https://huggingface.co")
    fetch_adapter("hf://org/repo", tmp_path / "work", allow=LOOPBACK)
    assert hub.seen and hub.auth_seen() == []


def test_hf_endpoint_on_an_internal_address_is_refused(hf_env, tmp_path):
    _hf_routes(hf_env, FILES)
    refused("hf://org/repo", tmp_path, "SourceAddressRefused")
    assert hf_env.seen == []


def test_s3_endpoint_on_an_internal_address_is_refused(origin, tmp_path, monkeypatch):
    pytest.importorskip("boto3")
    for k, v in {"AWS_ENDPOINT_URL": origin.url, "AWS_ACCESS_KEY_ID": "AKIATENANT", "AWS_SECRET_ACCESS_KEY": "x",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    refused("s3://models/a.tar.gz", tmp_path, "SourceAddressRefused")
    assert origin.seen == []
