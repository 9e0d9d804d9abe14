"""The asynchronous push contract (issue 12): a push is accepted at once (202) and converged in the
background with a bounded load parallelism; GET reports per-adapter progress; a push arriving during a
slow convergence supersedes it without losing or repeating loads; a proxy restarted mid-convergence
converges after the next push. The simulator with slow loads (`lora_load_ms`) is the engine; its
request log counts every load call (and the ones running at once). Not timed."""

from __future__ import annotations

import aiohttp
from vlmtest.proxy import Admin, proxy_config, start_sim

from vlmpool.proxy.server import run_proxy
from vlmpool.testing.waiting import wait_until


def state(generation: int, adapters: list[tuple[str, str]], path: str, **extra) -> dict:
    return {"generation": generation, "concurrency": 8, **extra,
            "adapters": [{"name": n, "version": v, "path": path} for n, v in adapters]}


def internals(adapters: list[tuple[str, str]]) -> list[str]:
    return sorted(f"{n}@{v}" for n, v in adapters)


async def slow_sim(load_ms: float):
    return await start_sim(lora_load_ms=load_ms, max_cpu_loras=256, max_loras=8)


async def test_many_adapters_answer_at_once_and_report_progress(adapters):
    path = adapters("shared", "00000001")
    wanted = [(f"a{i:02d}", "00000001") for i in range(24)]
    sim, runner = await slow_sim(150)
    try:
        async with run_proxy(proxy_config(sim.url)) as p:
            admin = Admin(p.admin_url)
            status, body = await admin.put(state(1, wanted, path, load_parallelism=3), wait=None)
            # accepted before any load could finish (24 loads of 150 ms, 3 at a time, take > 1 s)
            assert status == 202, body
            assert body["generation"] == 1 and body["converged"] is False and body["converged_generation"] is None
            assert body["counts"]["loaded"] == 0 and body["load_parallelism"] == 3
            assert [a["name"] for a in body["adapters"]] == [n for n, _ in wanted]  # push order
            assert {a["state"] for a in body["adapters"]} <= {"pending", "loading"}

            seen: list[dict] = []

            async def partly_loaded():
                _, st = await admin.get()
                seen.append(st["counts"])
                return st if 0 < st["counts"]["loaded"] < len(wanted) else None

            mid = await wait_until(partly_loaded, timeout=30, interval=0.05, what="a partly loaded state")
            assert mid["converged"] is False
            assert sum(mid["counts"].values()) == len(wanted)
            assert 1 <= mid["counts"]["loading"] <= 3
            by_state = {a["state"] for a in mid["adapters"]}
            assert {"loaded", "pending"} <= by_state, mid["adapters"]

            # the long poll answers when generation 1 converged
            _, done = await admin.get(wait=30, generation=1)
            assert done["converged"] is True and done["converged_generation"] == 1
            assert done["counts"] == {"pending": 0, "loading": 0, "loaded": len(wanted), "failed": 0}
            assert p.proxy.registry.converged()
        assert sim.load_peak == 3  # the bound was used and never passed
        assert sim.load_counts() == {i: 1 for i in internals(wanted)}
        assert sorted((await sim.stats())["loaded_adapters"]) == internals(wanted)
    finally:
        await runner.cleanup()


async def test_a_push_during_a_slow_convergence_supersedes_it(adapters):
    """gen 1 wants a00..a11, two loads at a time. While a02 and a03 load, gen 2 keeps a00..a02 and
    a04..a05, a07, drops a03 (loading) and a08..a11 (queued), changes a06's version (queued) and adds
    b0..b2. Nothing is loaded twice, never two loads of one name at once, a03 is unloaded after its
    load, the dropped queued ones and a06@00000001 are never loaded, and all of gen 2 loads."""
    path = adapters("shared", "00000001")
    gen1 = [(f"a{i:02d}", "00000001") for i in range(12)]
    gen2 = ([(f"a{i:02d}", "00000001") for i in (0, 1, 2, 4, 5, 7)] + [("a06", "00000002")]
            + [(f"b{i}", "00000001") for i in range(3)])
    sim, runner = await slow_sim(300)
    try:
        async with run_proxy(proxy_config(sim.url)) as p:
            admin = Admin(p.admin_url)
            assert (await admin.put(state(1, gen1, path, load_parallelism=2), wait=None))[0] == 202

            async def two_loading():
                _, st = await admin.get()
                states = {a["name"]: a["state"] for a in st["adapters"]}
                return st if states["a02"] == states["a03"] == "loading" else None

            await wait_until(two_loading, timeout=30, interval=0.01, what="a02 and a03 loading")
            status, body = await admin.put(state(2, gen2, path, load_parallelism=2), wait=None)
            assert status == 202 and body["generation"] == 2 and not body["converged"]
            assert [a["name"] for a in body["adapters"]] == [n for n, _ in gen2]
            assert {a["name"]: a["state"] for a in body["adapters"]}["a02"] == "loading"

            _, done = await admin.get(wait=60, generation=2)
            assert done["converged"] and done["converged_generation"] == 2, done
            assert {a["name"]: (a["version"], a["state"]) for a in done["adapters"]} == {
                n: (v, "loaded") for n, v in gen2}
            await p.proxy.registry.drain_background()
        counts = sim.load_counts()
        assert counts == {i: 1 for i in internals(gen2) + ["a03@00000001"]}, counts  # once each; none lost
        assert sim.same_name_peak == 1 and sim.load_peak == 2
        unloads = [r["json"]["lora_name"] for r in sim.received("/v1/unload_lora_adapter")]
        assert unloads == ["a03@00000001"]  # loaded while it stopped being wanted: unloaded after
        assert sorted((await sim.stats())["loaded_adapters"]) == internals(gen2)
    finally:
        await runner.cleanup()


async def test_a_proxy_restarted_mid_convergence_converges_after_the_next_push(adapters):
    """The restarted proxy reports no generation (so the operator pushes again); the re-push loads
    only what the engine does not hold yet, each adapter once."""
    path = adapters("shared", "00000001")
    wanted = [(f"a{i:02d}", "00000001") for i in range(10)]
    sim, runner = await slow_sim(200)
    try:
        cfg = proxy_config(sim.url)
        async with run_proxy(cfg) as first:
            admin = Admin(first.admin_url)
            assert (await admin.put(state(3, wanted, path, load_parallelism=2), wait=None))[0] == 202

            async def some_loaded():
                _, st = await admin.get()
                return st if 2 <= st["counts"]["loaded"] < len(wanted) else None

            await wait_until(some_loaded, timeout=30, interval=0.02, what="a partly converged proxy")
        async with run_proxy(proxy_config(sim.url)) as second:
            admin = Admin(second.admin_url)
            _, fresh = await admin.get()
            assert fresh["generation"] is None and fresh["applied"] is False and not fresh["converged"]
            status, done = await admin.put(state(3, wanted, path, load_parallelism=2), wait=60)
            assert status == 200 and done["converged"], done
            assert done["counts"]["loaded"] == len(wanted)
        assert sorted((await sim.stats())["loaded_adapters"]) == internals(wanted)
        disk = (await sim.stats())["adapter_disk_loads"]
        assert disk == {i: 1 for i in internals(wanted)}, disk  # the engine read each adapter once
    finally:
        await runner.cleanup()


async def test_a_re_push_of_a_converged_state_loads_nothing(sim, proxy, admin, adapters):
    path = adapters("shared", "00000001")
    wanted = [(f"a{i}", "00000001") for i in range(5)]
    assert (await admin.put(state(1, wanted, path)))[0] == 200
    n = len(sim.received("/v1/load_lora_adapter"))
    status, body = await admin.put(state(1, wanted, path))
    assert status == 200 and body["converged"] and body["counts"]["loaded"] == 5
    assert len(sim.received("/v1/load_lora_adapter")) == n
    # the engine forgot them (it restarted): the same generation again loads them again
    await sim.call("POST", "/sim/forget")
    status, body = await admin.put(state(1, wanted, path))
    assert status == 200 and body["counts"]["loaded"] == 5
    assert len(sim.received("/v1/load_lora_adapter")) == n + 5


async def test_bad_wait_is_refused(proxy, admin):
    status, body = await admin.put(state(1, [], "/x"), wait=600)
    assert status == 400 and body["error"]["code"] == "invalid_query"
    status, body = await admin.get(wait=-1)
    assert status == 400 and body["error"]["code"] == "invalid_query"
    status, body = await admin.put({**state(1, [], "/x"), "load_parallelism": 0}, wait=None)
    assert status == 400 and body["error"]["code"] == "invalid_state"


async def test_a_push_while_the_engine_is_down_loads_everything_once_it_is_back(adapters):
    """An engine restart the operator sees (the pod's restartCount) is re-pushed at the same generation,
    often while the new engine is not listening yet: the proxy must not take its own record of loaded
    adapters for the engine's (the restarted engine forgot them), so it converges only once the engine
    is back and holds every adapter again (the scale bench's engine-restart phase found it declaring
    "converged" at once and waiting for the next resync)."""
    from urllib.parse import urlsplit

    path = adapters("shared", "00000001")
    wanted = [(f"a{i}", "00000001") for i in range(4)]
    sim, runner = await start_sim()
    port = urlsplit(sim.url).port
    try:
        async with run_proxy(proxy_config(sim.url, retry_interval=0.2)) as p:
            admin = Admin(p.admin_url)
            assert (await admin.put(state(1, wanted, path)))[0] == 200
            await runner.cleanup()  # the engine dies: it forgets everything
            status, _ = await admin.put(state(1, wanted, path), wait=None)  # the operator's re-push
            assert status == 202
            _, st = await admin.get(wait=0.5, generation=1)
            assert st["converged"] is False, st  # nothing is loaded on an engine that does not answer
            sim, runner = await start_sim(port=port)  # the restarted engine, empty
            _, done = await admin.get(wait=30, generation=1)
            assert done["converged"] is True and done["counts"]["loaded"] == len(wanted), done
            assert sorted((await sim.stats())["loaded_adapters"]) == internals(wanted)
    finally:
        await runner.cleanup()


async def readyz(p) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(p.url + "/readyz") as r:
        return r.status, await r.json()


async def test_a_new_pod_is_ready_only_once_it_holds_the_pools_adapters(adapters):
    """A rolling pod must not take traffic while it would answer 404 for adapters the pool serves: /readyz
    stays 503 (saying how far the loading got) until the first pushed state converged; a later push that
    adds a slow adapter keeps it Ready (it serves what it holds); a refused adapter does not block it."""
    path = adapters("shared", "00000001")
    wanted = [(f"a{i:02d}", "00000001") for i in range(6)]
    sim, runner = await slow_sim(200)
    try:
        async with run_proxy(proxy_config(sim.url)) as p:
            status, body = await readyz(p)
            assert status == 503 and body["reasons"] == ["no state received from the operator yet"], body
            admin = Admin(p.admin_url)
            broken = [("bad", "00000001")]
            st = state(1, wanted, path, load_parallelism=2)
            st["adapters"].append({"name": "bad", "version": "00000001", "path": "/nonexistent/adapter"})
            code, _ = await admin.put(st, wait=None)
            assert code == 202
            status, body = await readyz(p)
            assert status == 503 and body["reasons"][0].startswith("loading the pool's adapters: "), body
            assert body["reasons"][0].endswith(f"of {len(wanted) + len(broken)}"), body
            _, done = await admin.get(wait=30, generation=1)
            assert done["converged"] and done["counts"]["failed"] == 1, done["counts"]
            status, body = await readyz(p)
            assert status == 200 and body["generation"] == 1, body

            # generation 2 adds a slow adapter: the pod stays Ready while it loads
            code, _ = await admin.put(state(2, [*wanted, ("late", "00000001")], path), wait=None)
            assert code == 202 and not p.proxy.registry.converged()
            status, body = await readyz(p)
            assert status == 200 and body["generation"] == 2, body
    finally:
        await runner.cleanup()
