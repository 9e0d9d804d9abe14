"""An adapter version that loads (200) and whose first request kills the engine (an exception inside the
model step: the simulator's kill_engine_on_adapter fault). vLLM 0.32 no longer does this for tensors that
do not fit the model — it refuses those at load, tests/vllm/test_sim_vs_vllm.py — but an engine can still die
in a step that runs a new adapter, and the proxy keeps its guard: the request gets a clear 502
adapter_failed, the proxy's state (which the operator copies into the adapter's per-pod status) says why,
and the version is never routed to or loaded again; a new version clears it."""

from __future__ import annotations

import openai
import pytest
from vlmtest.proxy import V1, V2, Admin, proxy_config, start_sim, write_adapter

from vlmpool.proxy.server import run_proxy
from vlmpool.sim.config import Faults

MSG = [{"role": "user", "content": "hi"}]


def spec(name: str, version: str, path: str) -> dict:
    return {"name": name, "version": version, "path": path}


@pytest.fixture
async def first_use_sim():
    s, runner = await start_sim(faults=Faults(kill_engine_on_adapter=f"dogs@{V1}"))
    try:
        yield s
    finally:
        await runner.cleanup()


async def test_first_use_failure_is_reported_and_never_retried(first_use_sim, tmp_path):
    sim = first_use_sim
    good = str(write_adapter(tmp_path / "cats" / V1))
    bad = str(write_adapter(tmp_path / "dogs" / V1, seed=1))
    fixed = str(write_adapter(tmp_path / "dogs" / V2, seed=2))
    async with run_proxy(proxy_config(sim.url)) as proxy:
        admin = Admin(proxy.admin_url)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        state = {"generation": 1, "concurrency": 16, "adapters": [spec("cats", V1, good), spec("dogs", V1, bad)]}
        status, body = await admin.put(state)
        assert status == 200 and [a["state"] for a in body["adapters"]] == ["loaded", "loaded"]  # vLLM: 200
        assert (await client.chat.completions.create(model="cats", messages=MSG, max_tokens=2)).choices

        with pytest.raises(openai.APIStatusError) as ei:
            await client.chat.completions.create(model="dogs", messages=MSG, max_tokens=2)
        assert ei.value.status_code == 502 and ei.value.body["code"] == "adapter_failed"
        assert "first request that used version 00000001" in ei.value.body["message"]
        assert (await sim.stats())["engine_dead"]

        _, st = await admin.get()
        dogs = next(a for a in st["adapters"] if a["name"] == "dogs")
        assert dogs["state"] == "failed" and "first request that used version 00000001" in dogs["reason"]

        # the engine restarts (its adapters are gone); the operator pushes again: dogs@00000001 is not re-loaded
        await sim.call("POST", "/sim/forget")
        loads_before = [r["json"]["lora_name"] for r in sim.received("/v1/load_lora_adapter")]
        status, body = await admin.put({**state, "generation": 2})
        loads = [r["json"]["lora_name"] for r in sim.received("/v1/load_lora_adapter")][len(loads_before):]
        assert loads == ["cats@00000001"]
        assert [a["state"] for a in body["adapters"]] == ["loaded", "failed"]
        chats = len(sim.received("/v1/chat/completions"))
        with pytest.raises(openai.APIStatusError) as ei:
            await client.chat.completions.create(model="dogs", messages=MSG, max_tokens=2)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "adapter_unavailable"
        assert "first request" in ei.value.body["message"]
        assert len(sim.received("/v1/chat/completions")) == chats  # not sent to the engine
        assert (await client.chat.completions.create(model="cats", messages=MSG, max_tokens=2)).choices

        # a new version is loaded and served
        status, body = await admin.put({"generation": 3, "concurrency": 16,
                                        "adapters": [spec("cats", V1, good), spec("dogs", V2, fixed)]})
        assert [a["state"] for a in body["adapters"]] == ["loaded", "loaded"]
        r = await client.chat.completions.create(model="dogs", messages=MSG, max_tokens=2)
        assert r.choices[0].message.content.startswith("sim:dogs@00000002")


async def test_an_ordinary_500_on_a_new_version_is_not_a_first_use_failure(first_use_sim, tmp_path):
    sim = first_use_sim
    path = str(write_adapter(tmp_path / "cats" / V1))
    async with run_proxy(proxy_config(sim.url)) as proxy:
        admin = Admin(proxy.admin_url)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert (await admin.put({"generation": 1, "concurrency": 16, "adapters": [spec("cats", V1, path)]}))[0] == 200
        await sim.faults(fail_next_requests=1)
        with pytest.raises(openai.APIStatusError) as ei:
            await client.chat.completions.create(model="cats", messages=MSG, max_tokens=2)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "engine_error"
        assert (await client.chat.completions.create(model="cats", messages=MSG, max_tokens=2)).choices
        _, st = await admin.get()
        assert st["adapters"][0]["state"] == "loaded"
