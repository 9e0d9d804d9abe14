"""Optional API keys on the public port (spec.proxy.apiKeySecret): the Secret's values are the accepted
bearer tokens, laid out as the kubelet mounts a Secret (files that link through `..data` to a
timestamped directory, swapped atomically on update); health and metrics stay open. The real proxy in
front of the real simulator on loopback, the openai SDK as client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from vlmtest.proxy import BASE, Admin, proxy_config_with, sim  # noqa: F401 - sim: a fixture

from vlmpool.proxy.server import run_proxy
from vlmpool.testing.waiting import wait_until

MSG = [{"role": "user", "content": "hello"}]


def mount_secret(directory: Path, data: dict[str, str], generation: int) -> None:
    """Write `data` the way the kubelet updates a Secret volume: a new `..<ts>` directory, then the
    `..data` link swapped with a rename, and one link per key."""
    directory.mkdir(exist_ok=True)
    ts = directory / f"..2026_11_23_{generation:02d}"
    ts.mkdir()
    for k, v in data.items():
        (ts / k).write_text(v)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.replace(tmp, directory / "..data")
    for k in data:
        link = directory / k
        if not link.is_symlink():
            link.symlink_to(f"..data/{k}")
    for old in directory.iterdir():
        if old.name not in data and not old.name.startswith(".."):
            old.unlink()


async def _status(url: str, path: str, token: str | None = None, **kw) -> tuple[int, Any, Any]:
    headers = {"X-Request-Id": "auth-check"}
    if token is not None:
        headers["Authorization"] = token
    async with aiohttp.ClientSession() as s, s.request(kw.pop("method", "GET"), url + path, headers=headers, **kw) as r:
        body = await r.json(content_type=None) if r.content_type == "application/json" else await r.text()
        return r.status, body, r.headers.copy()


async def test_api_keys_guard_the_public_api_but_not_health_and_metrics(sim, tmp_path):  # noqa: F811 - sim: the imported fixture
    keys = tmp_path / "api-keys"
    mount_secret(keys, {"team-a": "key-aaaa-1111\n", "team-b": "key-bbbb-2222"}, 1)
    async with run_proxy(proxy_config_with(sim.url, api_key_dir=str(keys))) as p:
        assert (await Admin(p.admin_url).put({"generation": 1, "concurrency": 4, "adapters": []}))[0] == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await _status(p.url, path))[0] == 200, path
        chat = {"model": BASE, "messages": MSG, "max_tokens": 2}
        for token in (None, "Bearer", "Bearer wrong", "Basic key-aaaa-1111", "Bearer key-aaaa-111",
                      "Bearer key-aaaa-1111x", "Bearer "):
            for method, path, kw in (("GET", "/v1/models", {}), ("POST", "/v1/chat/completions", {"json": chat})):
                status, body, headers = await _status(p.url, path, token, method=method, **kw)
                assert status == 401, (token, path, status)
                assert body["error"]["code"] == "invalid_api_key" and headers["X-Request-Id"] == "auth-check"
                assert headers["WWW-Authenticate"].startswith("Bearer")
        assert sim.received("/v1/chat/completions") == []
        # unknown paths are not an oracle either: 401 before 404
        assert (await _status(p.url, "/v1/nothing"))[0] == 401
        # clients closed on this loop: one collected later, on another test's loop, logs an error there
        for key in ("key-aaaa-1111", "key-bbbb-2222"):
            async with openai.AsyncOpenAI(base_url=p.url + "/v1", api_key=key, max_retries=0) as c:
                r = await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=2)
                assert r.choices[0].message.content.startswith(f"sim:{BASE}")
                assert [m.id for m in (await c.models.list()).data] == [BASE]
        async with openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="nope", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model=BASE, messages=MSG, max_tokens=2)

        # rotation: the Secret changes in place; the proxy follows without a restart
        mount_secret(keys, {"team-a": "key-aaaa-3333"}, 2)

        async def rotated() -> bool:
            old = (await _status(p.url, "/v1/models", "Bearer key-aaaa-1111"))[0]
            b = (await _status(p.url, "/v1/models", "Bearer key-bbbb-2222"))[0]
            new = (await _status(p.url, "/v1/models", "Bearer key-aaaa-3333"))[0]
            return (old, b, new) == (401, 401, 200)

        await wait_until(rotated, timeout=10, interval=0.2, what="the rotated API keys to apply")

        # an emptied Secret refuses everything (fail closed), health stays open
        mount_secret(keys, {"team-a": "  \n"}, 3)
        await wait_until(_refused(p.url, "Bearer key-aaaa-3333"), timeout=10, interval=0.2,
                         what="every key refused once the Secret is empty")
        assert (await _status(p.url, "/healthz"))[0] == 200


def _refused(url: str, token: str):
    async def check() -> bool:
        return (await _status(url, "/v1/models", token))[0] == 401
    return check


async def test_large_body_without_a_key_is_refused_unread(sim, tmp_path):  # noqa: F811 - sim: the imported fixture
    keys = tmp_path / "api-keys"
    mount_secret(keys, {"k": "the-key"}, 1)
    async with run_proxy(proxy_config_with(sim.url, api_key_dir=str(keys))) as p:
        status, body, _ = await _status(p.url, "/v1/chat/completions", None, method="POST",
                                        data=b'{"model": "' + BASE.encode() + b'", "x": "' + b"a" * 200_000 + b'"}')
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert p.proxy.body_budget.used == 0


def test_proxy_refuses_to_start_with_a_missing_key_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMPOOL_")}
    env["VLMPOOL_ADMIN_TOKEN"] = "t"
    res = subprocess.run([sys.executable, "-m", "vlmpool", "proxy", "--api-key-dir", str(tmp_path / "absent")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "API key directory" in res.stderr
