"""Every error body in both shapes (OpenAI's ``error`` and trio's ``detail``, same facts), and answers
naming the model the client asked for (plain and streamed), with the version in a header. Real HTTP on
loopback: openai SDK -> proxy -> simulator."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from vlmtest.proxy import BASE, Admin, proxy_config

from vlmpool.proxy.forwarding import ModelRename
from vlmpool.proxy.server import run_proxy

MSG = [{"role": "user", "content": "what is in the picture?"}]


def both_shapes(body: dict) -> dict:
    """The error's facts, checked to be the same in the OpenAI and the trio shape."""
    err, detail = body["error"], body["detail"]
    assert set(detail) == {"kind", "upstream_status", "moderated", "message"}
    assert detail["kind"] == err["code"] and detail["message"] == err["message"]
    assert detail["upstream_status"] == err.get("upstream_status")
    assert detail["moderated"] is bool(err.get("moderated", False))
    return detail


async def test_error_envelope_on_every_kind(sim, adapters):
    async with run_proxy(proxy_config(sim.url)) as p:
        await Admin(p.admin_url).put({"generation": 1, "concurrency": 4, "adapters": []})
        c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
        seen = {}

        with pytest.raises(openai.NotFoundError) as ei:  # unknown model
            await c.chat.completions.create(model="no-such-adapter", messages=MSG)
        seen["model_not_found"] = both_shapes(ei.value.response.json())

        await sim.faults(moderation_phrase="forbidden scene")  # engine 4xx, moderated
        with pytest.raises(openai.UnprocessableEntityError) as ei:
            await c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "a forbidden scene"}])
        d = seen["vlm_client_error"] = both_shapes(ei.value.response.json())
        assert d["upstream_status"] == 400 and d["moderated"] is True
        await sim.faults(moderation_phrase=None)

        await sim.faults(fail_next_requests=1)  # engine 5xx
        with pytest.raises(openai.InternalServerError) as ei:
            await c.chat.completions.create(model=BASE, messages=MSG)
        d = seen["engine_error"] = both_shapes(ei.value.response.json())
        assert d["upstream_status"] == 500 and d["moderated"] is False

        await sim.faults(close_next=1)  # engine unreachable
        with pytest.raises(openai.InternalServerError) as ei:
            await c.chat.completions.create(model=BASE, messages=MSG)
        seen["engine_unreachable"] = both_shapes(ei.value.response.json())

        async with aiohttp.ClientSession() as s:  # the proxy's own refusals
            async with s.post(p.url + "/v1/chat/completions", data=b"{not json",
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400
                seen["invalid_json"] = both_shapes(await r.json())
            async with s.get(p.url + "/v1/nothing-here") as r:
                assert r.status == 404
                seen["not_found"] = both_shapes(await r.json())
            async with s.get(p.admin_url + "/admin/v1/state") as r:  # admin API: same envelope
                assert r.status == 401
                seen["admin"] = both_shapes(await r.json())
        for kind in ("model_not_found", "vlm_client_error", "engine_error", "engine_unreachable", "invalid_json",
                     "not_found"):
            assert seen[kind]["kind"] == kind
        assert all(d["upstream_status"] is None for k, d in seen.items()
                   if k not in ("vlm_client_error", "engine_error"))


async def test_second_404_after_a_successful_heal_is_503_adapter_unavailable(sim, proxy, admin, client, adapters):
    path = adapters("cats", "00000001")
    st, _ = await admin.put({"generation": 1, "concurrency": 4,
                             "adapters": [{"name": "cats", "version": "00000001", "path": path}]})
    assert st == 200
    sim.forget_before_generation = True  # forgets again between the re-load and the retry
    with pytest.raises(openai.InternalServerError) as ei:
        await client.chat.completions.create(model="cats", messages=MSG, max_tokens=4)
    assert ei.value.status_code == 503 and ei.value.response.headers.get("retry-after")
    d = both_shapes(ei.value.response.json())
    assert d["kind"] == "adapter_unavailable" and "cats" in d["message"]
    sim.forget_before_generation = False
    out = await client.chat.completions.create(model="cats", messages=MSG, max_tokens=4)  # heals once more
    assert out.choices[0].message.content.startswith("sim:cats@00000001")


async def test_answers_name_the_model_asked_for_plain_and_streamed(sim, proxy, admin, client, adapters):
    path = adapters("cats", "00000001")
    st, _ = await admin.put({"generation": 1, "concurrency": 4,
                             "adapters": [{"name": "cats", "version": "00000001", "path": path}]})
    assert st == 200
    raw = await client.chat.completions.with_raw_response.create(model="cats", messages=MSG, max_tokens=8)
    r = raw.parse()
    assert r.model == "cats" and raw.headers["x-vlmpool-served-by"] == "cats@00000001"
    assert r.choices[0].message.content.startswith("sim:cats@00000001")  # the text itself is never touched
    c = await client.completions.create(model="cats", prompt="a cat", max_tokens=8)
    assert c.model == "cats"

    stream = await client.chat.completions.create(model="cats", messages=MSG, max_tokens=32, stream=True,
                                                  stream_options={"include_usage": True})
    models, parts = set(), []
    async for chunk in stream:
        models.add(chunk.model)
        parts.extend(ch.delta.content or "" for ch in chunk.choices)
    assert models == {"cats"} and "".join(parts).startswith("sim:cats@00000001")
    r = await client.chat.completions.create(model=BASE, messages=MSG, max_tokens=4)
    assert r.model == BASE


def test_rename_is_per_event_bounded_and_leaves_strings_alone():
    r = ModelRename("cats@00000001", "cats")
    # a quote inside a JSON string is escaped: text that looks like the member is not touched
    body = b'{"model": "cats@00000001", "choices": [{"text": "{\\"model\\":\\"cats@00000001\\"}"}]}'
    assert r.whole(body) == b'{"model": "cats", "choices": [{"text": "{\\"model\\":\\"cats@00000001\\"}"}]}'
    # an event split anywhere (even inside the name) is renamed once it is complete, not before
    out = [r.feed(b'data: {"model":"ca'), r.feed(b'ts@00000001"}\n'), r.feed(b'\ndata: {"model":"cats@00000001"}\n\n')]
    assert out == [b"", b"", b'data: {"model":"cats"}\n\ndata: {"model":"cats"}\n\n']
    assert r.feed(b'data: {"model":"cats@00000001"}\r\n\r\n') == b'data: {"model":"cats"}\r\n\r\n'
    # a run without an event boundary beyond the bound is relayed as it is
    big = b"x" * (ModelRename.MAX_CARRY + 1)
    assert r.feed(big) == big and r.flush() == b""
