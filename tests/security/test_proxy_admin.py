"""Hostile input to the admin API (paths out of the adapter root, unbounded generations, nested JSON),
the admin listener's address, and adapters an earlier proxy process left in the engine. The real
proxy in front of the real simulator on loopback; the admin token is assumed stolen where it matters:
what it can still not do is the point."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from vlmtest.proxy import BASE, TOKEN, V1, Admin, proxy_config, proxy_config_with, sim, write_adapter  # noqa: F401

from vlmpool.proxy.server import run_proxy
from vlmpool.testing.waiting import wait_until


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "adapters"
    r.mkdir()
    return r


def state(generation: int, *adapters: tuple[str, str, str]) -> dict:
    return {"generation": generation, "concurrency": 4,
            "adapters": [{"name": n, "version": v, "path": p} for n, v, p in adapters]}


async def raw_put(url: str, body: bytes, request_id: str) -> tuple[int, dict, str | None]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "X-Request-Id": request_id}
    async with aiohttp.ClientSession() as s, s.put(url + "/admin/v1/state", data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None), r.headers.get("X-Request-Id")


async def test_adapter_paths_must_resolve_inside_the_adapter_root(sim, root, tmp_path):  # noqa: F811 - sim: the imported fixture
    good = write_adapter(root / "cats" / "versions" / V1, seed=1)
    outside = write_adapter(tmp_path / "elsewhere" / V1, seed=2)  # a real, loadable adapter
    (root / "cats" / "current").symlink_to("versions/v1")  # a moving pointer inside the root
    (root / "evil").symlink_to(tmp_path / "elsewhere")  # a link out of the root
    hostile = {
        "dotdot": f"{root}/cats/../../elsewhere/v1",
        "outside": str(outside),
        "link-out": f"{root}/evil/v1",
        "link-in": f"{root}/cats/current",
        "relative": "cats/versions/v1",
        "root-itself": str(root),
        "prefix-sibling": f"{root}-other/x",
    }
    async with run_proxy(proxy_config_with(sim.url, adapter_root=str(root))) as p:
        admin = Admin(p.admin_url)
        for i, (why, path) in enumerate(hostile.items()):
            body = json.dumps(state(1, ("cats", V1, path))).encode()
            status, answer, rid = await raw_put(p.admin_url, body, f"path-{i}")
            assert status == 400 and answer["error"]["code"] == "invalid_path", (why, status, answer)
            assert rid == f"path-{i}" and "cats" in answer["error"]["message"]
        assert sim.received("/v1/load_lora_adapter") == []  # the engine was never asked
        assert p.proxy.registry.generation is None  # nothing applied
        status, answer = await admin.put(state(1, ("cats", V1, str(good))))
        assert status == 200 and answer["adapters"] == [{"name": "cats", "version": V1, "state": "loaded"}]


async def test_generation_is_an_int64_and_a_huge_one_cannot_wedge_the_proxy(sim):  # noqa: F811 - sim: the imported fixture
    async with run_proxy(proxy_config(sim.url)) as p:
        admin = Admin(p.admin_url)
        for g in (10**26, 2**63, -1):
            status, body = await admin.put(state(g))
            assert status == 400 and body["error"]["code"] == "invalid_state", (g, body)
        assert p.proxy.registry.generation is None
        assert (await admin.put(state(2**63 - 1)))[0] == 200
        assert (await admin.put(state(2**63 - 2)))[0] == 409  # older: refused, as any older one


HOSTILE_STATES = {
    "deep-100k": b'{"generation": 1, "concurrency": 4, "adapters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep-5k": b'{"generation": 1, "concurrency": 4, "adapters": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    "deep-50": b'{"generation": 1, "concurrency": 4, "adapters": [' + b'{"x":' * 50 + b"1" + b"}" * 50 + b"]}",
    "wide-200k": b'{"generation": 1, "concurrency": 4, "adapters": [' + b"{}," * 200_000 + b"{}]}",
    "not-utf8": b"\xff\xfe not json",
    "not-an-object": b"[1, 2, 3]",
}


async def test_malformed_or_nested_state_is_400_never_500(sim):  # noqa: F811 - sim: the imported fixture
    """Before: nesting deeper than Python's recursion limit answered 500."""
    async with run_proxy(proxy_config(sim.url)) as p:
        for i, (why, body) in enumerate(HOSTILE_STATES.items()):
            status, answer, rid = await raw_put(p.admin_url, body, f"hostile-{i}")
            assert status == 400, (why, status, answer)
            assert answer["error"]["code"] in ("json_too_deep", "json_too_complex", "invalid_json", "invalid_state",
                                               "too_many_adapters")
            assert rid == f"hostile-{i}"
        assert p.proxy.registry.generation is None
        assert (await Admin(p.admin_url).put(state(1)))[0] == 200  # and it still takes a good push


async def test_admin_listener_binds_where_asked_and_the_log_says_so():
    with socket.socket() as s1, socket.socket() as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        port, admin_port = s1.getsockname()[1], s2.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLMPOOL_")}
    env.update(VLMPOOL_ADMIN_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmpool", "proxy", "--host", "0.0.0.0", "--admin-host", "127.0.0.2",
         "--port", str(port), "--admin-port", str(admin_port), "--engine-url", "http://127.0.0.1:9",
         "--base-model", BASE], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        async def admin_up() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            try:
                async with aiohttp.ClientSession() as s, s.get(
                        f"http://127.0.0.2:{admin_port}/admin/v1/state",
                        headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(admin_up, timeout=60, interval=0.1, what="the admin API on 127.0.0.2")
        with pytest.raises(aiohttp.ClientConnectorError):  # not on the public address
            async with aiohttp.ClientSession() as s:
                await s.get(f"http://127.0.0.1:{admin_port}/admin/v1/state")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines = [json.loads(x) for x in proc.stderr.read().splitlines() if x.startswith("{")]
        listening = next(x for x in lines if x["msg"] == "proxy listening")
        assert listening["bind"] == f"0.0.0.0:{port}" and listening["admin_bind"] == f"127.0.0.2:{admin_port}"
        assert "127.0.0.1" not in json.dumps(listening).replace("http://127.0.0.1:9", "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_first_push_after_a_restart_unloads_leftovers_and_nothing_else(sim, root):  # noqa: F811 - sim: the imported fixture
    cats = str(write_adapter(root / "cats" / "versions" / V1, seed=1))
    dogs = str(write_adapter(root / "dogs" / "versions" / V1, seed=2))
    manual = str(write_adapter(root / "manual", seed=3))
    # someone else's adapter in the engine (no `<name>@<version>` form): never vlmpool's to unload
    async with aiohttp.ClientSession() as s, s.post(sim.url + "/v1/load_lora_adapter",
                                                    json={"lora_name": "manual", "lora_path": manual}) as r:
        assert r.status == 200, await r.text()
    cfg = proxy_config_with(sim.url, adapter_root=str(root))
    async with run_proxy(cfg) as first:
        status, body = await Admin(first.admin_url).put(state(3, ("cats", V1, cats), ("dogs", V1, dogs)))
        assert status == 200 and [a["state"] for a in body["adapters"]] == ["loaded", "loaded"]
    # the proxy process restarted; the engine did not: it still holds both
    assert sorted((await sim.stats())["loaded_adapters"]) == ["cats@00000001", "dogs@00000001", "manual"]
    async with run_proxy(cfg) as second:
        status, body = await Admin(second.admin_url).put(state(4, ("cats", V1, cats)), request_id="push-4")
        # cats was already loaded: vLLM's "already been loaded" is success, and it serves
        assert status == 200 and body["adapters"] == [{"name": "cats", "version": V1, "state": "loaded"}]
        assert sorted((await sim.stats())["loaded_adapters"]) == ["cats@00000001", "manual"]
        unloads = sim.received("/v1/unload_lora_adapter")
        assert [u["json"] for u in unloads] == [{"lora_name": "dogs@00000001"}]
        assert unloads[0]["headers"]["x-request-id"] == "push-4"
        # only on the first push: later pushes (each lists the engine's adapters to find what is missing)
        # leave what is not vlmpool's and unload nothing more
        n_lists = len(sim.received("/v1/models"))
        assert (await Admin(second.admin_url).put(state(5, ("cats", V1, cats))))[0] == 200
        assert len(sim.received("/v1/models")) == n_lists + 1
        assert len(sim.received("/v1/unload_lora_adapter")) == 1
        assert sorted((await sim.stats())["loaded_adapters"]) == ["cats@00000001", "manual"]
