"""The admin push's bounds (issue #23): `vlmpool proxy` started without --adapter-root confines pushed
paths to its default root (the pods' mount path), and the push's size limits agree on one number,
MAX_ADAPTERS. The real proxy (as a process where its defaults matter) in front of the real simulator."""

from __future__ import annotations

import json

import aiohttp
from vlmtest.proxy import TOKEN, V1, proxy_config_with, proxy_process, sim, stop_process  # noqa: F401

from vlmpool.adminwire import MAX_ADAPTERS, MAX_NAME_CHARS, MAX_PATH_CHARS, MAX_VERSION_CHARS
from vlmpool.proxy.server import run_proxy
from vlmpool.proxy.settings import DEFAULT_ADAPTER_ROOT


async def _put(admin_url: str, body: bytes) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s, s.put(
            admin_url + "/admin/v1/state", data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


def _state(generation: int, adapters: list[dict]) -> bytes:
    # as the operator writes it (json.dumps, default separators)
    return json.dumps({"generation": generation, "concurrency": 4, "load_parallelism": 4,
                       "adapters": adapters}).encode()


async def test_proxy_without_adapter_root_confines_pushed_paths_to_its_default_root(sim):  # noqa: F811 - the fixture
    """Before: without --adapter-root any absolute path was accepted, '..' included."""
    assert DEFAULT_ADAPTER_ROOT == "/var/lib/vlmpool/adapters"
    proc, _, admin_url = await proxy_process(sim.url)  # no --adapter-root, no VLMPOOL_ADAPTER_ROOT
    try:
        hostile = {
            "outside": "/etc/vlmpool/cats",
            "tmp": "/tmp/cats/versions/" + V1,
            "dotdot-out": DEFAULT_ADAPTER_ROOT + "/../../../etc/cats",
            "dotdot-in": DEFAULT_ADAPTER_ROOT + "/ns/other/../cats/versions/" + V1,
            "dot": DEFAULT_ADAPTER_ROOT + "/./cats/versions/" + V1,
            "sibling": DEFAULT_ADAPTER_ROOT + "-other/cats",
            "root-itself": DEFAULT_ADAPTER_ROOT,
        }
        for why, path in hostile.items():
            status, answer = await _put(admin_url, _state(1, [{"name": "cats", "version": V1, "path": path}]))
            assert status == 400 and answer["error"]["code"] == "invalid_path", (why, status, answer)
        assert sim.received("/v1/load_lora_adapter") == []
        # a path under the default root is taken (the engine cannot load it here: it does not exist)
        inside = DEFAULT_ADAPTER_ROOT + "/ns/cats/versions/" + V1
        status, answer = await _put(admin_url, _state(1, [{"name": "cats", "version": V1, "path": inside}]))
        assert status in (200, 202) and answer["generation"] == 1, (status, answer)
    finally:
        stop_process(proc)


def _largest(i: int, root: str) -> dict:
    """An entry of the largest form the push admits: a 253-character name, a 1,024-character path and
    a 128-character version, with every JSON structural byte the name/path character sets allow and a
    version json.dumps writes escaped (6 bytes a character; not of the patcher's form: refused alone)."""
    tag = f"-{i:05d}"
    name = ("a" + ":/-." * 64)[: MAX_NAME_CHARS - len(tag)] + tag
    prefix = f"{root}/{i:05d}/"
    path = prefix + ("{[,:" * MAX_PATH_CHARS)[: MAX_PATH_CHARS - len(prefix)]
    return {"name": name, "version": "\u00e9" * MAX_VERSION_CHARS, "path": path}


async def test_push_size_limit_is_one_number_max_adapters_accepted_one_more_refused(sim, tmp_path):  # noqa: F811
    """Before: the body-size limit refused a state well under the entry limit (10,000 allowed, 9,998
    accepted); entries holding JSON structural bytes in their strings were json_too_complex sooner.
    Now a state of exactly MAX_ADAPTERS entries of the largest form is accepted and one more entry is
    refused with too_many_adapters, nothing else."""
    root = str(tmp_path / "adapters")
    async with run_proxy(proxy_config_with(sim.url, adapter_root=root)) as p:
        entries = [_largest(i, root) for i in range(MAX_ADAPTERS + 1)]
        assert all(len(e["name"]) == MAX_NAME_CHARS and len(e["path"]) == MAX_PATH_CHARS for e in entries)
        body = _state(1, entries[:MAX_ADAPTERS])
        status, answer = await _put(p.admin_url, body)
        assert status in (200, 202), (status, str(answer)[:500])
        assert answer["generation"] == 1 and len(answer["adapters"]) == MAX_ADAPTERS
        assert {a["state"] for a in answer["adapters"]} == {"failed"}  # the versions: refused one by one
        del answer
        status, answer = await _put(p.admin_url, _state(2, entries))
        assert status == 400 and answer["error"]["code"] == "too_many_adapters", (status, str(answer)[:500])
        assert p.proxy.registry.generation == 1
        assert sim.received("/v1/load_lora_adapter") == []
