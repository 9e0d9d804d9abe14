"""Requests through the proxy: routing, streaming, passthrough, request ids, the error table, probes,
metrics and logs. Real HTTP on loopback: openai SDK -> proxy -> simulator."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import time

import aiohttp
import openai
import pytest
from vlmtest.proxy import BASE, Admin, proxy_config, start_sim

from vlmpool.proxy.engine import is_unknown_model_404
from vlmpool.proxy.errors import map_engine_error
from vlmpool.proxy.logs import JsonFormatter
from vlmpool.proxy.server import ProxyConfig, run_proxy

MSG = [{"role": "user", "content": "what is in the picture?"}]


async def push(admin, generation=1, concurrency=16, adapters=()):
    status, body = await admin.put({"generation": generation, "concurrency": concurrency, "adapters": list(adapters)})
    assert status == 200, body
    return body


async def test_base_and_adapter_chat_and_completions(sim, proxy, admin, client, adapters):
    path = adapters("cats", "00000001")
    body = await push(admin, adapters=[{"name": "cats", "version": "00000001", "path": path}])
    assert body == {"generation": 1, "applied": True, "converged_generation": 1, "converged": True,
                    "concurrency": 16, "load_parallelism": 4,
                    "counts": {"pending": 0, "loading": 0, "loaded": 1, "failed": 0},
                    "adapters": [{"name": "cats", "version": "00000001", "state": "loaded"}], "unloading": []}

    r = await client.chat.completions.create(model=BASE, messages=MSG, max_tokens=8)
    assert r.choices[0].message.content.startswith(f"sim:{BASE}")
    r = await client.chat.completions.create(model="cats", messages=MSG, max_tokens=64)
    text = r.choices[0].message.content
    assert text.startswith("sim:cats@00000001") and f"path={path}" in text
    assert r.model == "cats"  # the name the client asked for; the version that served is in a header
    c = await client.completions.create(model="cats", prompt="a cat on a mat", max_tokens=64)
    assert c.choices[0].text.startswith("sim:cats@00000001")

    # what the engine received: internal names, the load with the adapter's immutable path
    loads = sim.received("/v1/load_lora_adapter")
    assert [x["json"] for x in loads] == [{"lora_name": "cats@00000001", "lora_path": path}]
    chats = sim.received("/v1/chat/completions")
    assert [x["json"]["model"] for x in chats] == [BASE, "cats@00000001"]

    models = await client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [BASE, "cats"]


async def test_request_id_created_forwarded_echoed(sim, proxy, admin, client, adapters):
    status, _ = await admin.put(
        {"generation": 1, "concurrency": 4,
         "adapters": [{"name": "cats", "version": "00000001", "path": adapters("cats", "00000001")}]},
        request_id="push-0001",
    )
    assert status == 200
    load = sim.received("/v1/load_lora_adapter")[-1]
    assert load["headers"].get("x-request-id") == "push-0001"  # operator pushes correlate with vLLM logs

    raw = await client.chat.completions.with_raw_response.create(
        model="cats", messages=MSG, max_tokens=4, extra_headers={"X-Request-Id": "caller-id-42"})
    assert raw.headers["x-request-id"] == "caller-id-42"
    assert sim.received("/v1/chat/completions")[-1]["headers"]["x-request-id"] == "caller-id-42"

    raw = await client.chat.completions.with_raw_response.create(model="cats", messages=MSG, max_tokens=4)
    created = raw.headers["x-request-id"]
    assert len(created) >= 16
    assert sim.received("/v1/chat/completions")[-1]["headers"]["x-request-id"] == created

    # the unload of a removed adapter carries the id of the push that removed it
    status, _ = await admin.put({"generation": 2, "concurrency": 4, "adapters": []}, request_id="push-0002")
    assert status == 200
    await proxy.proxy.registry.drain_background()
    unload = sim.received("/v1/unload_lora_adapter")[-1]
    assert unload["json"] == {"lora_name": "cats@00000001"} and unload["headers"]["x-request-id"] == "push-0002"


async def test_streaming_is_relayed_chunk_by_chunk(sim, proxy, admin, client, adapters):
    await push(admin, adapters=[{"name": "cats", "version": "00000001", "path": adapters("cats", "00000001")}])
    stream = await client.chat.completions.create(
        model="cats", messages=MSG, max_tokens=12, stream=True, extra_body={"min_tokens": 12})
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    text = "".join(parts)
    assert text.startswith("sim:cats@00000001")
    assert len(parts) >= 8
    assert sim.received("/v1/chat/completions")[-1]["json"]["stream"] is True


async def test_streaming_is_not_buffered(adapters):
    # Earlier tests' unclosed clients are finalized by the garbage collector, each logging a traceback on
    # this loop: in CI that stalled it mid-stream and bunched the arrivals (span 0.24 s). Run it first.
    gc.collect()
    s, runner = await start_sim(ttft_ms=10.0, tpot_ms=80.0)
    try:
        async with run_proxy(proxy_config(s.url)) as p:
            await Admin(p.admin_url).put({"generation": 1, "concurrency": 4, "adapters": []})
            c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
            stream = await c.chat.completions.create(
                model=BASE, messages=MSG, max_tokens=10, stream=True, extra_body={"min_tokens": 10})
            arrivals = []
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append(time.monotonic())
            # 10 tokens 80 ms apart: a relay that buffered would deliver them all at once at the end
            assert len(arrivals) >= 8
            assert arrivals[-1] - arrivals[0] > 0.3
    finally:
        await runner.cleanup()


async def test_response_format_passthrough_and_omission(sim, proxy, admin, client):
    await push(admin)
    schema = {"type": "object", "properties": {"people_count": {"type": "integer"}, "scene": {"type": "string"}},
              "required": ["people_count", "scene"]}
    rf = {"type": "json_schema", "json_schema": {"name": "scene", "schema": schema, "strict": True}}
    r = await client.chat.completions.create(
        model=BASE, messages=MSG, max_tokens=256, response_format=rf,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "top_k": 5})
    got = sim.received("/v1/chat/completions")[-1]["json"]
    assert got["response_format"] == rf  # verbatim
    assert got["chat_template_kwargs"] == {"enable_thinking": False} and got["top_k"] == 5
    data = json.loads(r.choices[0].message.content)  # the engine's JSON, not rewritten
    assert set(data) >= {"people_count", "scene"}

    await client.chat.completions.create(model=BASE, messages=MSG, max_tokens=8)
    assert "response_format" not in sim.received("/v1/chat/completions")[-1]["json"]

    # an explicit null is dropped, not forwarded
    await client.chat.completions.create(model=BASE, messages=MSG, max_tokens=8, extra_body={"response_format": None})
    assert "response_format" not in sim.received("/v1/chat/completions")[-1]["json"]


async def test_error_table(sim, admin, adapters):
    async with run_proxy(proxy_config(sim.url)) as p:


        await Admin(p.admin_url).put({"generation": 1, "concurrency": 4, "adapters": []})
        c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)

        # unknown model: 404 without contacting the engine
        before = len(sim.log)
        with pytest.raises(openai.NotFoundError) as ei:
            await c.chat.completions.create(model="no-such-adapter", messages=MSG)
        assert ei.value.status_code == 404 and ei.value.body["code"] == "model_not_found"
        assert len(sim.log) == before

        # engine 4xx (content moderation): 422 with upstream status, code, message, moderated flag
        await sim.faults(moderation_phrase="forbidden scene")
        with pytest.raises(openai.UnprocessableEntityError) as ei:
            await c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "a Forbidden Scene"}])
        err = ei.value.body
        assert ei.value.status_code == 422
        assert err["upstream_status"] == 400 and err["moderated"] is True and err["code"] == "vlm_client_error"
        assert err["kind"] == "vlm_client_error" and ei.value.response.headers["x-request-id"]
        assert err["upstream_type"] == "data_inspection_failed" and len(err["message"]) <= 300
        assert "inappropriate" in err["message"]
        await sim.faults(moderation_phrase=None)

        # other engine 4xx: 422, not moderated; the message is cut to 300 chars
        with pytest.raises(openai.UnprocessableEntityError) as ei:
            await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=10_000_000)
        assert ei.value.body["upstream_status"] == 400 and ei.value.body["moderated"] is False
        assert ei.value.body["kind"] == "vlm_client_error"
        assert 0 < len(ei.value.body["message"]) <= 300

        # engine 5xx: 503 with the upstream status
        await sim.faults(fail_next_requests=1)
        with pytest.raises(openai.InternalServerError) as ei:
            await c.chat.completions.create(model=BASE, messages=MSG)
        assert ei.value.status_code == 503 and ei.value.body["upstream_status"] == 500
        assert ei.value.body["code"] == "engine_error" and ei.value.response.headers.get("retry-after")

        # connection dropped by the engine: 503
        await sim.faults(close_next=1)
        with pytest.raises(openai.InternalServerError) as ei:
            await c.chat.completions.create(model=BASE, messages=MSG)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "engine_unreachable"

        # engine too slow: 503 after --request-timeout (a proxy with a short one)
        await sim.faults(stall_seconds=3.0)
        async with run_proxy(proxy_config(sim.url, request_timeout=0.3)) as quick:
            cq = openai.AsyncOpenAI(base_url=quick.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.InternalServerError) as ei:
                await cq.chat.completions.create(model=BASE, messages=MSG, max_tokens=4)
            assert ei.value.status_code == 503 and ei.value.body["code"] == "engine_timeout"
        await sim.faults(stall_seconds=0.0)

        # and the proxy still serves normally afterwards
        r = await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=4)
        assert r.choices[0].message.content.startswith(f"sim:{BASE}")

    # engine not listening at all: 503
    async with run_proxy(proxy_config("http://127.0.0.1:9", base_model=BASE)) as p:
        c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as ei:
            await c.chat.completions.create(model=BASE, messages=MSG)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "engine_unreachable"


async def test_queue_full_and_queue_timeout_answer_429(sim):
    await sim.faults(stall_seconds=1.5)
    async with run_proxy(proxy_config(sim.url, concurrency=1, queue_limit=1, queue_timeout=0.3)) as p:
        c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
        first = asyncio.create_task(c.chat.completions.create(model=BASE, messages=MSG, max_tokens=2))
        while p.proxy.limiter.active < 1:
            await asyncio.sleep(0.01)
        # one waiter fits in the queue; it gives up after 0.3 s -> 429 queue_timeout
        second = asyncio.create_task(
            c.chat.completions.with_raw_response.create(model=BASE, messages=MSG, max_tokens=2))
        while p.proxy.limiter.waiting < 1:
            await asyncio.sleep(0.01)
        # the queue is full now -> 429 queue_full at once
        with pytest.raises(openai.RateLimitError) as ei:
            await c.chat.completions.create(model=BASE, messages=MSG, max_tokens=2)
        assert ei.value.body["code"] == "queue_full" and ei.value.response.headers["retry-after"]
        with pytest.raises(openai.RateLimitError) as ei:
            await second
        assert ei.value.body["code"] == "queue_timeout" and ei.value.response.headers["retry-after"]
        r = await first
        assert r.choices[0].message.content.startswith(f"sim:{BASE}")
        assert sum(1 for x in sim.log if x["path"] == "/v1/chat/completions") == 1  # rejected ones never reached it
        text = await _get(p.url + "/metrics")
        assert 'vlmpool_proxy_rejected_total{reason="queue_full"} 1.0' in text
        assert 'vlmpool_proxy_rejected_total{reason="queue_timeout"} 1.0' in text


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.text()


async def test_bad_requests(sim, proxy, admin):
    await push(admin)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
        async with s.post(proxy.url + "/v1/chat/completions", json={"messages": MSG}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "model"
        async with s.get(proxy.url + "/v1/nothing-here") as r:
            body = await r.json()
            assert r.status == 404 and set(body["error"]) >= {"message", "type", "param", "code"}
    assert sim.received("/v1/chat/completions") == []


async def test_readiness(sim, proxy, admin):
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/readyz") as r:
            assert r.status == 503 and "no state received" in " ".join((await r.json())["reasons"])
        await push(admin)
        async with s.get(proxy.url + "/readyz") as r:
            assert r.status == 200
        await sim.faults(unhealthy=True)
        async with s.get(proxy.url + "/readyz") as r:
            assert r.status == 503 and "not healthy" in " ".join((await r.json())["reasons"])
        await sim.faults(unhealthy=False)
        async with s.get(proxy.url + "/readyz") as r:
            assert r.status == 200


async def test_metrics_and_json_logs(sim, proxy, admin, client, adapters):
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("vlmpool.proxy")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        await push(admin, adapters=[{"name": "cats", "version": "00000001", "path": adapters("cats", "00000001")}])
        await client.chat.completions.create(model="cats", messages=MSG, max_tokens=4,
                                             extra_headers={"X-Request-Id": "log-me-1"})
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="dogs", messages=MSG)
    finally:
        root.removeHandler(handler)
    lines = [json.loads(x) for x in buf.getvalue().splitlines() if x.strip()]
    assert lines and all({"ts", "level", "msg", "request_id"} <= set(x) for x in lines)
    access = [x for x in lines if x["msg"] == "request" and x.get("request_id") == "log-me-1"]
    assert access and access[0]["status"] == 200 and access[0]["served_by"] == "cats@00000001"
    assert 0 < access[0]["engine_ms"] <= access[0]["duration_ms"] and access[0]["queue_ms"] >= 0
    assert any(x["msg"] == "adapter loaded" and x["request_id"] for x in lines)

    text = await _get(proxy.url + "/metrics")
    assert 'vlmpool_proxy_requests_total{model="cats",route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'vlmpool_proxy_requests_total{model="unknown",route="/v1/chat/completions",status="404"} 1.0' in text
    assert 'vlmpool_proxy_request_duration_seconds_count{model="cats",route="/v1/chat/completions"} 1.0' in text
    assert "vlmpool_proxy_limiter_size 16.0" in text
    assert "vlmpool_proxy_in_flight_requests 0.0" in text
    assert "vlmpool_proxy_queue_depth 0.0" in text
    assert 'vlmpool_proxy_adapter_loads_total{adapter="cats"} 1.0' in text
    assert 'vlmpool_proxy_overhead_seconds_count{route="/v1/chat/completions"} 1.0' in text


def test_self_heal_trigger_is_exact():
    body = json.dumps(
        {"error": {"message": "The model `cats@v1` does not exist.", "type": "NotFoundError", "code": 404}})
    assert is_unknown_model_404(404, body, "cats@v1")
    assert is_unknown_model_404(404, "lora CATS@V1 not found", "cats@v1")
    assert not is_unknown_model_404(404, body, "dogs@v1")  # another model
    assert not is_unknown_model_404(404, "", "cats@v1")  # empty body
    assert not is_unknown_model_404(404, "cats@v1 is gone", "cats@v1")  # other phrasing
    assert not is_unknown_model_404(500, body, "cats@v1")  # not a 404


def test_config_refuses_to_start_without_admin_token():
    with pytest.raises(ValueError, match="admin token is required"):
        ProxyConfig(admin_token=None).validate()
    with pytest.raises(ValueError, match="concurrency"):
        ProxyConfig(admin_token="x", concurrency=0).validate()


async def test_base_model_discovered_from_engine_when_not_configured(sim):
    async with run_proxy(proxy_config(sim.url, base_model=None)) as p:
        c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in (await c.models.list()).data] == [BASE]
        r = await c.completions.create(model=BASE, prompt="hello", max_tokens=4)
        assert r.choices[0].text.startswith(f"sim:{BASE}")
        with pytest.raises(openai.NotFoundError):
            await c.completions.create(model="other", prompt="hello")
        assert [x["json"]["model"] for x in sim.received("/v1/completions")] == [BASE]


def _table(status: int, body: str) -> tuple[int, dict, dict]:
    resp = map_engine_error(status, body)
    return resp.status, json.loads(resp.body)["error"], dict(resp.headers)


@pytest.mark.parametrize("upstream", [400, 404, 413, 422, 429])
def test_every_engine_4xx_is_a_422_with_its_upstream_status(upstream):
    """Upstream 429 included: a per-request answer, not "the service is down" (the proxy's own
    back-pressure is its 429)."""
    status, err, _ = _table(upstream,
                            json.dumps({"error": {"message": "m", "type": "BadRequestError", "code": upstream}}))
    assert status == 422
    assert err["code"] == err["kind"] == "vlm_client_error" and err["type"] == "upstream_client_error"
    assert err["upstream_status"] == upstream and err["upstream_type"] == "BadRequestError"
    assert err["moderated"] is False


@pytest.mark.parametrize("upstream", [500, 502, 503])
def test_every_engine_5xx_is_a_503_with_retry_after(upstream):
    status, err, headers = _table(upstream, json.dumps({"error": {"message": "boom", "type": "InternalServerError"}}))
    assert status == 503 and err["code"] == "engine_error" and err["upstream_status"] == upstream
    assert headers["Retry-After"] and "kind" not in err


@pytest.mark.parametrize("body,moderated", [
    (json.dumps({"error": {"message": "blocked", "type": "data_inspection_failed"}}), True),
    (json.dumps({"error": {"message": "Input data may contain inappropriate content.",
                           "type": "BadRequestError"}}), True),
    ("Inappropriate content", True),
    (json.dumps({"error": {"message": "max_tokens too large", "type": "BadRequestError"}}), False),
], ids=["type-marker-only", "message-marker-only", "plain-text", "neither"])
def test_moderation_is_flagged_by_either_marker_alone(body, moderated):
    status, err, _ = _table(400, body)
    assert status == 422 and err["moderated"] is moderated


async def test_body_size_limit_is_413_from_the_announcement_or_the_bytes(sim):
    limit = 4096
    async with run_proxy(proxy_config(sim.url, max_body_bytes=limit)) as p:
        await Admin(p.admin_url).put({"generation": 1, "concurrency": 4, "adapters": []})

        def body(size: int) -> bytes:
            head = b'{"model": "' + BASE.encode() + b'", "max_tokens": 1, "messages": [{"role": "user", "content": "'
            tail = b'"}]}'
            return head + b"a" * (size - len(head) - len(tail)) + tail

        async with aiohttp.ClientSession() as s:
            async with s.post(p.url + "/v1/chat/completions", data=body(limit)) as r:
                assert r.status == 200, await r.text()  # exactly the limit: served
            async with s.post(p.url + "/v1/chat/completions", data=body(limit + 1),
                              headers={"X-Request-Id": "too-big-1"}) as r:
                err = (await r.json())["error"]
                assert r.status == 413 and err["code"] == "request_too_large" and str(limit) in err["message"]
                assert r.headers["X-Request-Id"] == "too-big-1"

            async def chunked():  # no Content-Length: the bytes are counted as they arrive
                yield body(limit + 1)

            async with s.post(p.url + "/v1/chat/completions", data=chunked()) as r:
                assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
        assert len(sim.received("/v1/chat/completions")) == 1

        # refused from the announcement alone, before a byte of the body is read
        r_, w = await asyncio.open_connection("127.0.0.1", p.port)
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10000000\r\n\r\n")
        async with asyncio.timeout(5):
            head = await r_.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413")
        w.close()
