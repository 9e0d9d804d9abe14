"""The admin API and the adapter registry under load: concurrency at the engine, resizes, version
swaps, self-heal, auth, stale generations, load failures. Real HTTP on loopback throughout."""

from __future__ import annotations

import asyncio

import openai
from vlmtest.proxy import BASE, TOKEN, V1, V2, Admin, proxy_config, start_sim

from vlmpool.proxy.server import run_proxy
from vlmpool.testing.waiting import wait_until

MSG = [{"role": "user", "content": "describe"}]


def spec(name, version, path):
    return {"name": name, "version": version, "path": path}


async def load(client, model, n, results, *, max_tokens=4, stop: asyncio.Event | None = None, workers=8):
    """Closed-loop load: `workers` clients send until `n` requests are done (or `stop` is set). Every
    outcome lands in `results` as ("ok", text) or ("error", exception)."""
    sent = 0

    async def worker():
        nonlocal sent
        while (stop is None and sent < n) or (stop is not None and not stop.is_set()):
            sent += 1
            try:
                r = await client.chat.completions.create(model=model, messages=MSG, max_tokens=max_tokens)
                results.append(("ok", r.choices[0].message.content))
            except Exception as e:  # every failure is a finding
                results.append(("error", e))

    await asyncio.gather(*(worker() for _ in range(workers)))


async def _running(sim, ok) -> bool:
    return ok((await sim.stats())["running"])


async def _stats_when(sim, ok) -> dict | None:
    st = await sim.stats()
    return st if ok(st) else None


async def test_limiter_caps_requests_at_the_engine(adapters):
    sim, runner = await start_sim(ttft_ms=40.0, tpot_ms=5.0)
    try:
        async with run_proxy(proxy_config(sim.url, concurrency=64)) as p:
            admin = Admin(p.admin_url)
            status, body = await admin.put({"generation": 1, "concurrency": 4,
                                            "adapters": [spec("cats", V1, adapters("cats", V1))]})
            assert status == 200 and body["concurrency"] == 4
            c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            results: list = []
            await asyncio.gather(load(c, "cats", 30, results, workers=15), load(c, BASE, 30, results, workers=15))
            assert len(results) == 60 and all(kind == "ok" for kind, _ in results), results
            st = await sim.stats()
            assert st["peak_running"] == 4, st["peak_running"]  # reached the limit, never above it
            assert p.proxy.limiter.peak == 4  # the excess waited in the proxy's queue
    finally:
        await runner.cleanup()


async def test_resize_under_load_fails_nothing_and_respects_new_limit():
    sim, runner = await start_sim(ttft_ms=60.0, tpot_ms=5.0)
    try:
        async with run_proxy(proxy_config(sim.url)) as p:
            admin = Admin(p.admin_url)
            assert (await admin.put({"generation": 1, "concurrency": 8, "adapters": []}))[0] == 200
            c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            results: list = []
            stop = asyncio.Event()
            task = asyncio.create_task(load(c, BASE, 0, results, stop=stop, workers=24))
            await wait_until(lambda: _running(sim, lambda n: n >= 8), timeout=30, what="8 requests running")
            # shrink under load: in-flight requests finish, then at most 3 at a time
            assert (await admin.put({"generation": 2, "concurrency": 3, "adapters": []}))[0] == 200
            await wait_until(lambda: _running(sim, lambda n: n <= 3), timeout=30, what="at most 3 running")
            await sim.call("POST", "/sim/stats/reset")  # peak restarts from what runs now (<= 3)
            # 12 requests served at the new limit (whatever the machine's speed): never more than 3 at once
            st = await wait_until(lambda: _stats_when(sim, lambda s: s["requests_total"] >= 12), timeout=30,
                                  what="12 requests at concurrency 3")
            assert st["peak_running"] <= 3, st
            # grow under load: the 24 clients' waiters are admitted up to the new limit, never above it
            assert (await admin.put({"generation": 3, "concurrency": 12, "adapters": []}))[0] == 200
            await sim.call("POST", "/sim/stats/reset")
            def grown(s: dict) -> bool:
                return s["peak_running"] >= 12 and s["requests_total"] >= 24
            st = await wait_until(lambda: _stats_when(sim, grown), timeout=30, what="12 running at once after the grow")
            assert st["peak_running"] == 12, st
            stop.set()
            await task
            errors = [e for kind, e in results if kind == "error"]
            assert errors == [] and len(results) > 30
            assert p.proxy.limiter.active == 0 and p.proxy.limiter.waiting == 0
    finally:
        await runner.cleanup()


async def test_version_swap_under_load_fails_nothing(adapters):
    sim, runner = await start_sim(ttft_ms=30.0, tpot_ms=5.0)
    try:
        async with run_proxy(proxy_config(sim.url)) as p:
            admin = Admin(p.admin_url)
            v1, v2 = adapters("cats", V1), adapters("cats", V2)
            pushed = await admin.put({"generation": 1, "concurrency": 16, "adapters": [spec("cats", V1, v1)]})
            assert pushed[0] == 200
            c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            results: list = []
            stop = asyncio.Event()
            task = asyncio.create_task(load(c, "cats", 0, results, stop=stop, workers=12, max_tokens=64))
            await wait_until(lambda: len(results) >= 20, timeout=30, what="20 answers before the swap")
            status, body = await admin.put({"generation": 2, "concurrency": 16, "adapters": [spec("cats", V2, v2)]})
            assert status == 200 and body["adapters"] == [{"name": "cats", "version": V2, "state": "loaded"}]
            n_at_swap = len(results)
            await wait_until(lambda: len(results) >= n_at_swap + 40, timeout=30, what="40 answers after the swap")
            stop.set()
            await task
            errors = [e for kind, e in results if kind == "error"]
            assert errors == []
            texts = [t for _, t in results]
            old = [t for t in texts if t.startswith(f"sim:cats@00000001 path={v1}")]
            new = [t for t in texts if t.startswith(f"sim:cats@00000002 path={v2}")]
            assert len(old) + len(new) == len(texts)  # every answer from exactly one of the two versions
            assert old and new
            assert all(t.startswith("sim:cats@00000002") for t in texts[-12:])  # after the flip: only v2
            # the old version was unloaded once drained, and only then
            await p.proxy.registry.drain_background()
            st = await sim.stats()
            assert st["loaded_adapters"] == ["cats@00000002"]
            unloads = sim.received("/v1/unload_lora_adapter")
            assert [u["json"] for u in unloads] == [{"lora_name": "cats@00000001"}]
            i_unload = sim.log.index(unloads[0])
            assert not any(x["path"] == "/v1/chat/completions" and x["json"]["model"] == "cats@00000001"
                           for x in sim.log[i_unload:])
    finally:
        await runner.cleanup()


async def test_self_heal_after_engine_forgets(sim, proxy, admin, client, adapters):
    path = adapters("cats", V1)
    assert (await admin.put({"generation": 1, "concurrency": 16, "adapters": [spec("cats", V1, path)]}))[0] == 200
    r = await client.chat.completions.create(model="cats", messages=MSG, max_tokens=4)
    assert r.choices[0].message.content.startswith("sim:cats@00000001")
    forgotten = await sim.call("POST", "/sim/forget")  # the engine restarted: runtime adapters are gone
    assert forgotten["forgotten"] == ["cats@00000001"]
    n_loads = len(sim.received("/v1/load_lora_adapter"))
    # many requests notice at once; each is answered after one shared re-load and one retry
    outs = await asyncio.gather(*(client.chat.completions.create(
        model="cats", messages=MSG, max_tokens=4, extra_headers={"X-Request-Id": f"heal-{i}"}) for i in range(10)))
    assert all(o.choices[0].message.content.startswith(f"sim:cats@00000001 path={path}") for o in outs)
    reloads = sim.received("/v1/load_lora_adapter")[n_loads:]
    assert 1 <= len(reloads) <= 2 and reloads[0]["json"] == {"lora_name": "cats@00000001", "lora_path": path}
    assert reloads[0]["headers"]["x-request-id"].startswith("heal-")
    assert "cats@00000001" in (await sim.stats())["loaded_adapters"]
    metrics = await _text(proxy.url + "/metrics")
    assert 'vlmpool_proxy_self_heals_total{adapter="cats",result="success"}' in metrics

    # a re-apply of the same generation also restores what the engine forgot
    await sim.call("POST", "/sim/forget")
    status, body = await admin.put({"generation": 1, "concurrency": 16, "adapters": [spec("cats", V1, path)]})
    assert status == 200 and body["adapters"][0]["state"] == "loaded"
    assert (await sim.stats())["loaded_adapters"] == ["cats@00000001"]


async def test_self_heal_failure_is_503_and_retried_once(sim, proxy, admin, client, adapters):
    path = adapters("cats", V1)
    assert (await admin.put({"generation": 1, "concurrency": 16, "adapters": [spec("cats", V1, path)]}))[0] == 200
    await sim.call("POST", "/sim/forget")
    await sim.faults(fail_next_loads=1)  # the re-load fails (an engine 500)
    n_chats = len(sim.received("/v1/chat/completions"))
    try:
        await client.chat.completions.create(model="cats", messages=MSG, max_tokens=4)
        raise AssertionError("expected 503")
    except openai.InternalServerError as e:
        assert e.status_code == 503 and e.body["code"] == "adapter_unavailable"
    assert len(sim.received("/v1/chat/completions")) == n_chats + 1  # no retry without a successful re-load
    _status, state = await admin.get()
    assert state["adapters"][0]["state"] == "failed" and "re-load" in state["adapters"][0]["reason"]


async def test_admin_token_auth(sim, proxy, admin):
    state = {"generation": 1, "concurrency": 4, "adapters": []}
    for token in ("wrong", TOKEN[:-1], TOKEN + "x"):
        status, body = await admin.put(state, token=token)
        assert status == 401 and body["error"]["code"] == "invalid_token"
        assert (await admin.get(token=token))[0] == 401
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin_url + "/admin/v1/state") as r:  # no header at all
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        async with s.get(proxy.admin_url + "/admin/v1/state", headers={"Authorization": f"Basic {TOKEN}"}) as r:
            assert r.status == 401
    assert proxy.proxy.registry.generation is None  # refused calls changed nothing
    assert (await admin.put(state))[0] == 200
    # the admin API is not on the public port
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/admin/v1/state", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 404


async def test_stale_generation_is_ignored(sim, proxy, admin, client, adapters):
    a, b = adapters("cats", V1), adapters("dogs", V1)
    status, body = await admin.put({"generation": 5, "concurrency": 6, "adapters": [spec("cats", V1, a)]})
    assert status == 200 and body["generation"] == 5
    n_loads = len(sim.received("/v1/load_lora_adapter"))
    status, body = await admin.put({"generation": 4, "concurrency": 2, "adapters": [spec("dogs", V1, b)]})
    assert status == 409
    assert {k: body[k] for k in ("generation", "applied", "converged", "concurrency", "adapters", "unloading")} == {
        "generation": 5, "applied": True, "converged": True, "concurrency": 6,
        "adapters": [{"name": "cats", "version": V1, "state": "loaded"}], "unloading": []}
    assert len(sim.received("/v1/load_lora_adapter")) == n_loads  # nothing sent to the engine
    assert proxy.proxy.limiter.limit == 6
    try:
        await client.chat.completions.create(model="dogs", messages=MSG)
        raise AssertionError("dogs must not be served")
    except openai.NotFoundError:
        pass
    status, got = await admin.get()
    assert status == 200 and got == body
    # the same generation again is a re-apply; a newer one applies
    assert (await admin.put({"generation": 5, "concurrency": 6, "adapters": [spec("cats", V1, a)]}))[0] == 200
    status, body = await admin.put({"generation": 6, "concurrency": 2, "adapters": [spec("dogs", V1, b)]})
    assert status == 200 and body["concurrency"] == 2 and [x["name"] for x in body["adapters"]] == ["dogs"]


async def test_invalid_state_is_refused_with_reasons(sim, proxy, admin):
    bad = [
        {"generation": -1, "concurrency": 4, "adapters": []},
        {"generation": 1, "concurrency": 0, "adapters": []},
        {"generation": 1, "concurrency": 4, "adapters": [{"name": "a@b", "version": "1", "path": "/x"}]},
        {"generation": 1, "concurrency": 4, "adapters": [spec("a", "1", "/x"), spec("a", "2", "/y")]},
        {"generation": 1, "concurrency": 4, "adapters": [spec(BASE, "1", "/x")]},
        {"generation": True, "concurrency": 4, "adapters": []},
    ]
    for state in bad:
        status, body = await admin.put(state)
        assert status == 400, (state, body)
        assert body["error"]["code"] == "invalid_state" and body["error"]["message"]
    assert proxy.proxy.registry.generation is None


async def test_load_failures_are_reported_and_old_version_keeps_serving(sim, proxy, admin, client, adapters, tmp_path):
    good = adapters("cats", V1)
    status, body = await admin.put({"generation": 1, "concurrency": 4, "adapters": [
        spec("cats", V1, good), spec("ghost", V1, str(tmp_path / "missing"))]})
    assert status == 200
    states = {a["name"]: a for a in body["adapters"]}
    assert states["cats"]["state"] == "loaded"
    assert states["ghost"]["state"] == "failed" and "404" in states["ghost"]["reason"]
    assert len(states["ghost"]["reason"]) < 700
    try:
        await client.chat.completions.create(model="ghost", messages=MSG)
        raise AssertionError("expected 503")
    except openai.InternalServerError as e:
        assert e.status_code == 503 and e.body["code"] == "adapter_unavailable"

    # a swap whose new version fails to load (engine 500) keeps the old version serving
    await sim.faults(fail_next_loads=1)
    status, body = await admin.put({"generation": 2, "concurrency": 4,
                                    "adapters": [spec("cats", V2, adapters("cats", V2))]})
    assert status == 200
    st = body["adapters"][0]
    assert st["state"] == "failed" and "500" in st["reason"] and st["serving_version"] == V1
    r = await client.chat.completions.create(model="cats", messages=MSG, max_tokens=4)
    assert r.choices[0].message.content.startswith("sim:cats@00000001")
    # the next push succeeds and flips
    status, body = await admin.put({"generation": 3, "concurrency": 4,
                                    "adapters": [spec("cats", V2, adapters("cats", V2))]})
    assert body["adapters"] == [{"name": "cats", "version": V2, "state": "loaded"}]
    r = await client.chat.completions.create(model="cats", messages=MSG, max_tokens=4)
    assert r.choices[0].message.content.startswith("sim:cats@00000002")


async def test_removed_adapter_is_404_and_unloaded(sim, proxy, admin, client, adapters):
    assert (await admin.put({"generation": 1, "concurrency": 4, "adapters": [
        spec("cats", V1, adapters("cats", V1)), spec("dogs", V1, adapters("dogs", V1))]}))[0] == 200
    assert sorted(m.id for m in (await client.models.list()).data) == sorted([BASE, "cats", "dogs"])
    pushed = await admin.put({"generation": 2, "concurrency": 4,
                              "adapters": [spec("dogs", V1, adapters("dogs", V1))]})
    assert pushed[0] == 200
    try:
        await client.chat.completions.create(model="cats", messages=MSG)
        raise AssertionError("cats was removed")
    except openai.NotFoundError:
        pass
    await proxy.proxy.registry.drain_background()
    assert (await sim.stats())["loaded_adapters"] == ["dogs@00000001"]
    assert [m.id for m in (await client.models.list()).data] == [BASE, "dogs"]


async def _text(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.text()


async def test_streaming_self_heal_and_client_abort(sim, proxy, admin, client, adapters):
    path = adapters("cats", V1)
    assert (await admin.put({"generation": 1, "concurrency": 4, "adapters": [spec("cats", V1, path)]}))[0] == 200
    await sim.call("POST", "/sim/forget")
    stream = await client.chat.completions.create(model="cats", messages=MSG, max_tokens=8, stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text.startswith("sim:cats@00000001")  # the 404 came before any byte: healed, then streamed

    # a client that goes away mid-stream frees its slot and its engine sequence
    import aiohttp

    body = {"model": "cats", "messages": MSG, "max_tokens": 200, "min_tokens": 200, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(proxy.url + "/v1/chat/completions", json=body)
        assert resp.status == 200
        await resp.content.readline()  # the first event arrived
        await wait_until(lambda: _running(sim, lambda n: n >= 1), timeout=30, what="the stream at the engine")
        resp.close()  # abort

    async def freed() -> bool:
        return proxy.proxy.limiter.active == 0 and (await sim.stats())["running"] == 0

    await wait_until(freed, timeout=10, what="the slot and the engine sequence to be freed")
    assert proxy.proxy.registry.alias["cats"].inflight == 0


async def test_loads_that_met_an_unreachable_engine_are_retried(adapters):
    """The operator may push before the pod's vLLM listens; the proxy keeps trying without a new push."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = adapters("cats", V1)
    async with run_proxy(proxy_config(f"http://127.0.0.1:{port}", retry_interval=0.2)) as p:
        admin = Admin(p.admin_url)
        status, body = await admin.put({"generation": 1, "concurrency": 4, "adapters": [spec("cats", V1, path)]},
                                       wait=None)
        assert status == 202

        async def unreachable():
            _, state = await admin.get()
            return state if "could not reach the engine" in state["adapters"][0].get("reason", "") else None

        body = await wait_until(unreachable, timeout=10, interval=0.05, what="the load to meet no engine")
        # not refused: still wanted and retried, so pending, and the state is not converged
        assert body["adapters"][0]["state"] == "pending" and not body["converged"]
        sim, runner = await start_sim(port=port)  # the engine comes up on that port
        try:
            async def loaded():
                _, state = await admin.get()
                return state if state["adapters"][0]["state"] == "loaded" else None

            state = await wait_until(loaded, timeout=10, interval=0.1, what="the retried load")
            assert state["adapters"] == [{"name": "cats", "version": V1, "state": "loaded"}]
            load = sim.received("/v1/load_lora_adapter")[-1]
            assert load["headers"]["x-request-id"] == "vlmpool-proxy-retry-1"
            c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
            out = await c.chat.completions.create(model="cats", messages=MSG, max_tokens=4)
            assert out.choices[0].message.content.startswith("sim:cats@00000001")
        finally:
            await runner.cleanup()


async def test_an_adapter_the_engine_already_holds_counts_as_loaded(sim, adapters):
    """vLLM answers 400 "already been loaded" to a second load of a name: that is success. Seen when a
    proxy restarts beside an engine that did not (its first push re-loads everything)."""
    path = adapters("cats", V1)
    push = {"generation": 1, "concurrency": 4, "adapters": [spec("cats", V1, path)]}
    async with run_proxy(proxy_config(sim.url)) as first:
        status, body = await Admin(first.admin_url).put(push)
        assert status == 200 and body["adapters"] == [{"name": "cats", "version": V1, "state": "loaded"}]
        # a re-push: the engine refuses the second load as already loaded; the adapter stays loaded
        status, body = await Admin(first.admin_url).put(push)
        assert status == 200 and body["adapters"] == [{"name": "cats", "version": V1, "state": "loaded"}]
    async with run_proxy(proxy_config(sim.url)) as second:
        status, body = await Admin(second.admin_url).put(push)
        assert status == 200 and body["adapters"] == [{"name": "cats", "version": V1, "state": "loaded"}]
        # the first push loads; the re-push finds it in the engine's list and loads nothing; the new proxy
        # does not know it yet, so its load meets "already loaded"
        loaded = (await sim.stats())["loaded_adapters"]
        assert len(sim.received("/v1/load_lora_adapter")) == 2 and loaded == ["cats@00000001"]
        c = openai.AsyncOpenAI(base_url=second.url + "/v1", api_key="unused", max_retries=0)
        out = await c.chat.completions.create(model="cats", messages=MSG, max_tokens=4)
        assert out.choices[0].message.content.startswith("sim:cats@00000001")


async def test_self_heal_retries_exactly_once(sim, proxy, admin, client, adapters):
    """An engine that forgets the adapter again after the re-load: one re-load, one retry, then a 503
    adapter_unavailable (a server-side failure, as the seed's server error; not the client's 4xx);
    never a loop."""
    path = adapters("cats", V1)
    assert (await admin.put({"generation": 1, "concurrency": 4, "adapters": [spec("cats", V1, path)]}))[0] == 200
    sim.forget_before_generation = True
    n_loads, n_chats = len(sim.received("/v1/load_lora_adapter")), len(sim.received("/v1/chat/completions"))
    try:
        async with asyncio.timeout(20):
            await client.chat.completions.create(model="cats", messages=MSG, max_tokens=4)
        raise AssertionError("expected a 503 adapter_unavailable")
    except openai.InternalServerError as e:
        assert e.status_code == 503 and e.body["code"] == "adapter_unavailable"
        assert e.response.json()["detail"]["kind"] == "adapter_unavailable"
    assert len(sim.received("/v1/chat/completions")) == n_chats + 2  # the request and one retry
    assert len(sim.received("/v1/load_lora_adapter")) == n_loads + 1  # one re-load
