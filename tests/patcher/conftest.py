"""Fixtures of the patcher tests: tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models (real transformers
classes, configs with the real layouts shrunk, random init, nothing downloaded), real PEFT adapters
saved from them, and loopback servers speaking HTTPS, the Hugging Face Hub API and S3."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from patcher_testlib import FAMILIES, LANG_TARGETS, VISION_TARGETS, make_adapter, tiny_model

from vlmpool.testing.tls import self_signed


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory) -> dict[str, Path]:
    """Base weights of each tiny family, saved with save_pretrained (safetensors)."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for fam in FAMILIES:
        d = root / fam
        tiny_model(fam).save_pretrained(d)
        out[fam] = d
    return out


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory) -> dict[str, Path]:
    """A plain LoRA adapter per family (language layers), with an untrained vision-tower LoRA too."""
    root = tmp_path_factory.mktemp("loras")
    return {fam: make_adapter(fam, root / fam, targets=LANG_TARGETS + VISION_TARGETS[fam]) for fam in FAMILIES}


@pytest.fixture(scope="session")
def dora_dir(tmp_path_factory) -> Path:
    """A trained DoRA adapter on Qwen2-VL (rank 8, all language projections, untrained vision LoRA)."""
    return make_adapter("qwen2_vl", tmp_path_factory.mktemp("dora") / "a", dora=True,
                        targets=LANG_TARGETS + VISION_TARGETS["qwen2_vl"])


@pytest.fixture
def lora(lora_dirs, copy_adapter) -> Path:
    """A fresh copy of the Qwen2-VL LoRA of lora_dirs, to edit."""
    return copy_adapter(lora_dirs["qwen2_vl"])


@pytest.fixture
def copy_adapter(tmp_path) -> Callable[[Path], Path]:
    import shutil

    def copy(src: Path) -> Path:
        dst = tmp_path / f"src-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, dst)
        return dst
    return copy


# ------------------------------------------------------------------ loopback servers

class LoopbackServer:
    """An aiohttp app on 127.0.0.1:<ephemeral> in a background thread."""

    def __init__(self, app, ssl_context=None):
        self.app, self.ssl_context = app, ssl_context
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = None
        self.requests: list[str] = []

    def start(self):
        from aiohttp import web

        self.thread.start()

        async def up():
            self.runner = web.AppRunner(self.app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
            await site.start()
            return site._server.sockets[0].getsockname()[1]
        self.port = asyncio.run_coroutine_threadsafe(up(), self.loop).result(30)
        return self

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    return self_signed(tmp, "127.0.0.1")


@pytest.fixture
def https_server(tmp_path, monkeypatch):
    """HTTPS on loopback with a self-signed certificate trusted through SSL_CERT_FILE. Serve bytes by
    putting them in `.files[path]`; `.headers[path]` overrides response headers."""
    from aiohttp import web

    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    files: dict[str, bytes] = {}
    headers: dict[str, dict[str, str]] = {}
    seen_auth: list[str | None] = []

    async def handle(request):
        seen_auth.append(request.headers.get("Authorization"))
        srv.requests.append(request.path)
        data = files.get(request.path)
        if data is None:
            return web.Response(status=404, text="not found")
        extra = dict(headers.get(request.path, {}))
        chunked = extra.pop("Transfer-Encoding", None) == "chunked"
        resp = web.StreamResponse(headers=extra)
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data)
        return resp

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    srv = LoopbackServer(app, ctx).start()
    srv.files, srv.headers, srv.seen_auth = files, headers, seen_auth
    srv.url = f"https://127.0.0.1:{srv.port}"
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("VLMPOOL_SOURCE_ALLOW", "127.0.0.1")  # loopback is refused unless allow-listed
    yield srv
    srv.stop()


@pytest.fixture
def hf_server(monkeypatch):
    """The parts of the Hugging Face Hub HTTP API that huggingface_hub uses to list a repository's tree
    and download files: /api/models/<repo>/tree/<rev> and /<repo>/resolve/<rev>/<path>.
    `.repos[(repo, rev)] = {path: bytes}`."""
    pytest.importorskip("huggingface_hub", reason="hf:// sources need the [hf] extra")
    from aiohttp import web

    repos: dict[tuple[str, str], dict[str, bytes]] = {}

    def lookup(request):
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        rev = request.match_info["rev"]
        if not any(k[0] == repo for k in repos):
            return None, web.Response(status=404, headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")
        files = repos.get((repo, rev))
        if files is None:
            return None, web.Response(status=404, headers={"X-Error-Code": "RevisionNotFound"}, text="Invalid rev id")
        return files, None

    async def tree(request):
        srv.requests.append(request.path_qs)
        files, err = lookup(request)
        if err:
            return err
        entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                   for p, b in sorted(files.items())]
        return web.json_response(entries)

    async def resolve(request):
        srv.requests.append(f"{request.method} {request.path}")
        files, err = lookup(request)
        if err:
            return err
        data = files.get(request.match_info["path"])
        if data is None:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"}, text="Entry not found")
        h = {"X-Repo-Commit": hashlib.sha1(request.match_info["rev"].encode()).hexdigest(),
             "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return web.Response(status=200, headers=h)
        return web.Response(status=200, body=data, headers={k: v for k, v in h.items() if k != "Content-Length"})

    app = web.Application()
    app.router.add_get("/api/models/{org}/{name}/tree/{rev}", tree)
    app.router.add_get("/{org}/{name}/resolve/{rev}/{path:.+}", resolve)  # answers HEAD too
    srv = LoopbackServer(app).start()
    srv.repos = repos
    srv.url = f"http://127.0.0.1:{srv.port}"
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("VLMPOOL_SOURCE_ALLOW", "127.0.0.1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield srv
    srv.stop()


@pytest.fixture
def s3_server(monkeypatch):
    """The S3 REST calls boto3 makes to list a prefix and get objects (ListObjectsV2, GetObject),
    path-style on loopback. `.buckets[bucket][key] = bytes`. Signatures are not checked."""
    pytest.importorskip("boto3", reason="s3:// sources need the [s3] extra")
    from aiohttp import web

    buckets: dict[str, dict[str, bytes]] = {}

    def no_such(code: str, status: int = 404):
        body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code}</Message></Error>'
        return web.Response(status=status, body=body.encode(), content_type="application/xml")

    async def bucket_get(request):
        srv.requests.append(request.path_qs)
        b = buckets.get(request.match_info["bucket"])
        if b is None:
            return no_such("NoSuchBucket")
        prefix = request.query.get("prefix", "")
        keys = sorted(k for k in b if k.startswith(prefix))
        items = "".join(f"<Contents><Key>{escape(k)}</Key><Size>{len(b[k])}</Size>"
                        f"<ETag>\"{hashlib.md5(b[k]).hexdigest()}\"</ETag>"
                        "<LastModified>2026-01-01T00:00:00.000Z</LastModified><StorageClass>STANDARD</StorageClass></Contents>"
                        for k in keys)
        body = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{escape(request.match_info['bucket'])}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(keys)}</KeyCount>"
                f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{items}</ListBucketResult>")
        return web.Response(body=body.encode(), content_type="application/xml")

    async def object_get(request):
        srv.requests.append(request.path_qs)
        b = buckets.get(request.match_info["bucket"])
        if b is None:
            return no_such("NoSuchBucket")
        data = b.get(request.match_info["key"])
        if data is None:
            return no_such("NoSuchKey")
        return web.Response(body=data, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'},
                            content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{bucket}", bucket_get)
    app.router.add_get("/{bucket}/", bucket_get)
    app.router.add_get("/{bucket}/{key:.+}", object_get)
    srv = LoopbackServer(app).start()
    srv.buckets = buckets
    srv.url = f"http://127.0.0.1:{srv.port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", srv.url)
    monkeypatch.setenv("VLMPOOL_SOURCE_ALLOW", "127.0.0.1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    yield srv
    srv.stop()
