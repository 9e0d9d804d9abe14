"""The simulator driven by the real `openai` SDK, as the proxy and users drive vLLM."""

from __future__ import annotations

import base64
import json

import aiohttp
import jsonschema
import openai
import pytest
from sim_helpers import png_bytes

from vlmpool.sim.server import running_sim


def client(url: str, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


async def load(url: str, name: str, path) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}) as r:
            assert r.status == 200, await r.text()


async def test_chat_names_base_and_adapter_with_path(fast_config, adapter):
    a1 = adapter("a1")
    async with running_sim(fast_config()) as url:
        await load(url, "a1", a1)
        c = client(url)
        base = await c.chat.completions.create(model="qwen-base", messages=[{"role": "user", "content": "hi there"}])
        assert base.model == "qwen-base"
        assert base.object == "chat.completion"
        assert base.choices[0].message.role == "assistant"
        assert base.choices[0].message.content.startswith("sim:qwen-base")
        assert " path=" not in base.choices[0].message.content
        assert base.choices[0].finish_reason == "stop"
        assert base.usage.completion_tokens > 0 and base.usage.total_tokens == (
            base.usage.prompt_tokens + base.usage.completion_tokens)

        lora = await c.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}])
        assert lora.model == "a1"
        assert lora.choices[0].message.content.startswith(f"sim:a1 path={a1}")


async def test_unknown_model_is_vllm_404_not_found(fast_config):
    async with running_sim(fast_config()) as url:
        with pytest.raises(openai.NotFoundError) as err:
            await client(url).chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 404
        assert err.value.body == {"message": "The model `ghost` does not exist. Valid aliases: qwen-base.",
                                  "type": "NotFoundError",
                                  "param": "model", "code": 404}
        # raw body: vLLM's ErrorResponse shape
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", json={"model": "ghost", "prompt": "x"}) as r:
                assert r.status == 404
                assert await r.json() == {"error": {
                    "message": "The model `ghost` does not exist. Valid aliases: qwen-base.",
                                                    "type": "NotFoundError", "param": "model", "code": 404}}


async def test_streaming_chunks_usage_and_done(fast_config):
    async with running_sim(fast_config(tpot_ms=1)) as url:
        stream = await client(url).chat.completions.create(
            model="qwen-base", messages=[{"role": "user", "content": "one two three"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
        assert all(ch.object == "chat.completion.chunk" and ch.model == "qwen-base" for ch in chunks)
        assert len({ch.id for ch in chunks}) == 1
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == "sim:qwen-base images=0 echo: one two three"
        finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text.split())

        # raw SSE framing: data: lines, ends with [DONE]
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", json={
                    "model": "qwen-base", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                raw = (await r.read()).decode()
        events = [e for e in raw.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # no include_usage → no usage


async def test_max_tokens_cuts_with_finish_reason_length(fast_config):
    async with running_sim(fast_config()) as url:
        c = client(url)
        r = await c.chat.completions.create(model="qwen-base", max_tokens=2,
                                            messages=[{"role": "user", "content": "a b c d e f"}])
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 2
        assert r.choices[0].message.content == "sim:qwen-base images=0"
        # ignore_eos (vLLM extra) generates exactly max_tokens
        r = await c.chat.completions.create(model="qwen-base", max_tokens=40,
                                            messages=[{"role": "user", "content": "x"}],
                                            extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model="qwen-base", max_tokens=10**6,
                                            messages=[{"role": "user", "content": "x"}])
        assert err.value.body == {
            "message": "max_tokens=1000000 cannot be greater than max_model_len=32768. Please request fewer output "
                       "tokens. (parameter=max_tokens, value=1000000)",
            "type": "BadRequestError", "param": "max_tokens", "code": 400}
        # a max_tokens within max_model_len that does not fit after the prompt is clamped (vLLM 0.32), not refused
        r = await c.chat.completions.create(model="qwen-base", max_tokens=32768,
                                            messages=[{"role": "user", "content": "x"}],
                                            extra_body={"ignore_eos": True})
        assert r.usage.prompt_tokens + r.usage.completion_tokens == 32768


SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["cat", "dog"]},
        "caption": {"type": "string", "maxLength": 80},
        "count": {"type": "integer", "minimum": 2, "maximum": 9},
        "score": {"type": "number", "exclusiveMinimum": 0.5},
        "boxes": {"type": "array", "minItems": 2, "items": {"$ref": "#/$defs/box"}},
        "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
                 "required": ["ok"], "additionalProperties": False},
    },
    "required": ["label", "count", "boxes", "meta"],
    "additionalProperties": False,
    "$defs": {"box": {"type": "object", "properties": {"x": {"type": "integer"}, "kind": {"const": "bbox"}},
                      "required": ["x", "kind"]}},
}


async def test_response_format_json_schema_answer_validates(fast_config, adapter):
    a1 = adapter("a1")
    async with running_sim(fast_config()) as url:
        await load(url, "a1", a1)
        r = await client(url).chat.completions.create(
            model="a1", messages=[{"role": "user", "content": "describe"}],
            response_format={"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA, "strict": True}})
        value = json.loads(r.choices[0].message.content)
        jsonschema.validate(value, SCHEMA)
        assert len(value["boxes"]) == 2
        assert value["caption"].startswith("sim:a1")  # free strings name the adapter that answered

        r = await client(url).chat.completions.create(
            model="qwen-base", messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"})
        obj = json.loads(r.choices[0].message.content)
        assert isinstance(obj, dict) and obj["model"] == "sim:qwen-base"


async def test_images_are_decoded_and_counted(fast_config):
    img = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    async with running_sim(fast_config(image_tokens=100)) as url:
        c = client(url)
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                              {"type": "image_url", "image_url": {"url": img}},
                                              {"type": "text", "text": "what is this"}]}]
        r = await c.chat.completions.create(model="qwen-base", messages=msgs)
        assert "images=2" in r.choices[0].message.content
        assert r.usage.prompt_tokens >= 200
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model="qwen-base", messages=bad)
        assert "base64" in err.value.body["message"]
        notimg = "data:image/png;base64," + base64.b64encode(b"plain text, not an image").decode()
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="qwen-base", messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": notimg}}]}])


async def test_completions_route(fast_config, adapter):
    a1 = adapter("a1")
    async with running_sim(fast_config()) as url:
        await load(url, "a1", a1)
        c = client(url)
        r = await c.completions.create(model="a1", prompt="hello world", max_tokens=50)
        assert r.object == "text_completion" and r.model == "a1"
        assert r.choices[0].text.startswith(f"sim:a1 path={a1}")
        r = await c.completions.create(model="qwen-base", prompt=["p one", "p two"], max_tokens=50)
        assert [ch.index for ch in r.choices] == [0, 1]
        stream = await c.completions.create(model="qwen-base", prompt="x y", stream=True)
        text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
        assert text.startswith("sim:qwen-base")


async def test_models_list_root_and_parent(fast_config, adapter):
    a1 = adapter("a1")
    async with running_sim(fast_config()) as url:
        await load(url, "a1", a1)
        models = (await client(url).models.list()).data
        by_id = {m.id: m.model_dump() for m in models}
        assert by_id["qwen-base"]["root"] == "Qwen/Qwen2.5-VL-3B-Instruct"
        assert by_id["qwen-base"]["parent"] is None
        assert by_id["qwen-base"]["owned_by"] == "vllm" and by_id["qwen-base"]["max_model_len"] == 32768
        assert by_id["a1"]["root"] == str(a1) and by_id["a1"]["parent"] == "qwen-base"
        assert by_id["a1"]["permission"][0]["object"] == "model_permission"


async def test_request_id_header_becomes_the_completion_id(fast_config):
    async with running_sim(fast_config(enable_request_id_headers=True)) as url:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", headers={"X-Request-Id": "req-42"},
                              json={"model": "qwen-base", "messages": [{"role": "user", "content": "x"}]}) as r:
                body = await r.json()
                assert body["id"] == "chatcmpl-req-42"
                assert r.headers["X-Request-Id"] == "req-42"
            stats = await (await s.get(url + "/sim/stats")).json()
        assert stats["recent_requests"][-1]["request_id"] == "chatcmpl-req-42"


async def test_api_key_like_vllm(fast_config):
    async with running_sim(fast_config(api_key="sekret")) as url:
        with pytest.raises(openai.AuthenticationError):
            await client(url, api_key="wrong").models.list()
        assert (await client(url, api_key="sekret").models.list()).data[0].id == "qwen-base"
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/health") as r:  # health is not behind the key
                assert r.status == 200


async def test_bad_requests_are_vllm_400s(fast_config):
    async with running_sim(fast_config()) as url:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/chat/completions", data="not json",
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400 and (await r.json())["error"]["type"] == "BadRequestError"
            async with s.post(url + "/v1/chat/completions", data="{}", headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 400
                assert "Only 'application/json' is allowed" in (await r.json())["error"]["message"]
            async with s.post(url + "/v1/chat/completions", json={"model": "qwen-base"}) as r:
                assert r.status == 400 and "messages" in (await r.json())["error"]["message"]
            async with s.post(url + "/v1/chat/completions", json={
                    "model": "qwen-base", "messages": [{"role": "user", "content": "x"}],
                    "stream_options": {"include_usage": True}}) as r:
                assert r.status == 400
                assert (await r.json())["error"]["message"] == "Stream options can only be defined when `stream=True`."
            async with s.get(url + "/v1/nothing-here") as r:
                assert r.status == 404 and await r.json() == {"detail": "Not Found"}


async def test_served_name_aliases_answer_as_the_first_name(fast_config):
    async with running_sim(fast_config(served_model_name=["qwen-base", "alias"])) as url:
        c = client(url)
        r = await c.chat.completions.create(model="alias", messages=[{"role": "user", "content": "x"}])
        assert r.model == "qwen-base" and r.choices[0].message.content.startswith("sim:qwen-base")
        assert [m.id for m in (await c.models.list()).data] == ["qwen-base", "alias"]


async def test_the_role_chunk_comes_with_the_first_output_as_vllms(fast_config):
    """vLLM's chat stream sends its first chunk (the assistant role, empty content) when the engine has the
    first output, so a client's time to first token is the engine's TTFT. The simulator sent it before its
    TTFT delay, and `vllm bench serve` read 3-6 ms TTFT off a 20 ms simulator (issue #27)."""
    import time

    async with running_sim(fast_config(ttft_ms=300, tpot_ms=1)) as url:
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.post(url + "/v1/chat/completions", json={
                    "model": "qwen-base", "stream": True, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 200
                line = b""
                while not line.startswith(b"data: "):
                    line = await r.content.readline()
                first = time.monotonic() - t0
                assert json.loads(line[6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                rest = (await r.read()).decode()
    assert first >= 0.28, f"the role chunk came after {first * 1000:.0f} ms, before the 300 ms TTFT"
    assert rest.rstrip().endswith("data: [DONE]")
