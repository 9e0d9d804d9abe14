"""POST /v1/vlmpool/crop-describe: real frames drawn with Pillow, the real openai SDK as the client, the
real proxy and simulator. The image the engine received is decoded and checked (size, panel order and
colours), the engine calls counted, the answer's parse checked against the simulator's deterministic
CROPS lines."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random

import httpx2 as httpx
import openai
import pytest
from PIL import Image
from vlmtest.proxy import BASE, Admin, proxy_config, start_sim

from vlmpool.proxy.server import run_proxy

W, H = 640, 480
LETTERS = "ABCDEFGHIJKLMNOPQRST"
PANEL_COLOURS = ((255, 255, 0), (0, 128, 255), (0, 255, 0), (255, 0, 255), (255, 165, 0))
CLASSES = ("person", "car", "dog", "bicycle", "truck")


def make_scene(n: int = 20, seed: int = 7) -> tuple[bytes, list[dict]]:
    """A grey PNG frame with n solid boxes in distinct colours (a 5 x 4 grid) and their detections, in a
    shuffled order with distinct confidences."""
    rng = random.Random(seed)
    img = Image.new("RGB", (W, H), (90, 90, 90))
    dets = []
    confs = rng.sample(range(10, 99), n)
    for i in range(n):
        cx, cy = (i % 5) * 128 + 30, (i // 5) * 120 + 30
        box = [cx, cy, cx + 64, cy + 56]
        colour = (40 + 10 * i, 240 - 9 * i, (70 * i) % 256)
        img.paste(colour, tuple(box))
        dets.append({"bbox" if i % 2 else "xyxy": box, "class": CLASSES[i % 5], "confidence": confs[i] / 100,
                     "track_id": i, "colour": colour})
    rng.shuffle(dets)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), dets


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def close(a: tuple, b: tuple, tol: int = 40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a[:3], b[:3], strict=True))


async def crop_describe(c: openai.AsyncOpenAI, **body) -> dict:
    resp = await c.post("/vlmpool/crop-describe", body=body, cast_to=httpx.Response)
    return json.loads(resp.content)


def engine_call(sim) -> dict:
    return sim.received("/v1/chat/completions")[-1]["json"]


def received_image(sim) -> tuple[str, bytes]:
    url = engine_call(sim)["messages"][0]["content"][0]["image_url"]["url"]
    head, _, data = url.partition(",")
    return head, base64.b64decode(data)


@pytest.fixture
def sdk(proxy):
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("n", [0, 1, 3, 20])
async def test_panels_composite_and_one_engine_call(sim, proxy, admin, sdk, n):
    await admin.put({"generation": 1, "concurrency": 4, "adapters": []})
    frame, dets = make_scene()
    before = (await sim.stats())["requests_total"]
    out = await crop_describe(sdk, image_b64=b64(frame), crops=[{k: v for k, v in d.items() if k != "colour"}
                                                                 for d in dets], max_crops=n)
    assert (await sim.stats())["requests_total"] == before + 1  # one generation, whatever n is
    call = engine_call(sim)
    assert call["model"] == BASE and call["max_tokens"] == 512 and call["temperature"] == 0.0
    assert [p["type"] for p in call["messages"][0]["content"]] == ["image_url", "text"]  # image first
    head, data = received_image(sim)
    ranked = sorted(dets, key=lambda d: -d["confidence"])[:n]
    if n == 0:
        assert head == "data:image/png;base64" and data == frame  # the frame byte for byte
        assert out["crop_descriptions"] == [] and out["panels"] == []
        return
    img = Image.open(io.BytesIO(data)).convert("RGB")
    assert head == "data:image/jpeg;base64"
    assert img.size == {1: (853, 480), 3: (853, 480), 20: (853, 2400)}[n]  # w + max(160, min(384, w//3))
    slot = max(120, H // n)
    for i, d in enumerate(ranked):  # panel i shows the i-th most confident box, in colour i % 5
        top = i * slot
        assert close(img.getpixel((W + 1, top + slot // 2)), PANEL_COLOURS[i % 5]), i  # slot border
        centre = (W + 6 + (213 - 12) // 2, top + 32 + (slot - 38) // 2)
        assert close(img.getpixel(centre), d["colour"]), (i, img.getpixel(centre), d["colour"])
        x1, _, _, y2 = d.get("bbox") or d["xyxy"]
        assert close(img.getpixel((x1 + 1, y2 - 6)), PANEL_COLOURS[i % 5])  # the box outline on the frame
    prompt = call["messages"][0]["content"][1]["text"]
    assert [ln.split(":")[0] for ln in prompt.splitlines() if ln.startswith("- ")] == [f"- {c}" for c in LETTERS[:n]]
    assert "CROPS:" in prompt
    assert out["crop_descriptions"] == [f"{d['class']}: sim saw panel {LETTERS[i]}" for i, d in enumerate(ranked)]
    assert [(p["label"], p["class"], p["confidence"], p["track_id"]) for p in out["panels"]] == [
        (LETTERS[i], d["class"], d["confidence"], d["track_id"]) for i, d in enumerate(ranked)]
    assert out["model"] == BASE and out["description"].startswith(f"sim:{BASE}") and out["elapsed_ms"] >= 0


async def test_schema_mode_returns_the_models_json_unchanged_and_skips_the_hint(sim, proxy, admin, sdk):
    await admin.put({"generation": 1, "concurrency": 4, "adapters": []})
    frame, dets = make_scene(3)
    crops = [{k: v for k, v in d.items() if k != "colour"} for d in dets]
    schema = {"type": "json_schema", "json_schema": {"name": "scene", "schema": {
        "type": "object", "properties": {"summary": {"type": "string"}, "people_count": {"type": "integer"}},
        "required": ["summary", "people_count"]}}}
    out = await crop_describe(sdk, image_b64=b64(frame), crops=crops, max_crops=0, response_format=schema)
    call = engine_call(sim)
    assert call["response_format"] == schema  # forwarded verbatim
    assert "YOLO detections" not in call["messages"][0]["content"][1]["text"]  # no hint in schema mode
    sent = (await sdk.chat.completions.create(model=BASE, messages=call["messages"], response_format=schema,
                                              max_tokens=512)).choices[0].message.content
    assert out["entities"] == json.loads(sent)  # the model's JSON exactly, nothing injected
    assert out["description"] == out["entities"]["summary"]

    out = await crop_describe(sdk, image_b64=b64(frame), crops=crops, max_crops=0)  # free text: the hint
    prompt = engine_call(sim)["messages"][0]["content"][1]["text"]
    assert "YOLO detections" in prompt and "response_format" not in engine_call(sim)
    assert prompt.count("track_id=") == 3 and out["entities"] == {}


async def test_thinking_per_family_and_think_blocks_stripped(adapters):
    sim, runner = await start_sim(thinking=True)
    try:
        frame, dets = make_scene(2)
        crops = [{k: v for k, v in d.items() if k != "colour"} for d in dets]
        for mode in ("switch", "none"):
            async with run_proxy(proxy_config(sim.url, thinking=mode)) as p:
                await Admin(p.admin_url).put({"generation": 1, "concurrency": 4, "adapters": []})
                c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
                out = await crop_describe(c, image_b64=b64(frame), crops=crops, max_crops=2, enable_thinking=True)
                kwargs = engine_call(sim).get("chat_template_kwargs")
                assert kwargs == ({"enable_thinking": True} if mode == "switch" else None)  # roboflow: qwen3vl never
                assert len(out["crop_descriptions"]) == 2  # CROPS lines are found anywhere in the text
                assert "sim saw panel A" in out["crop_descriptions"][0]
                if mode == "switch":  # the pre-filled <think> put back: the thought is split off
                    assert out["thinking"] == "sim thought about 1 image(s)" and "think>" not in out["text"]
                    assert out["text"].startswith("CROPS:") and out["description"].startswith("sim:")
                else:  # no thinking mode (roboflow's qwen3vl): trio's strip leaves a lone </think> in place
                    assert "</think>" in out["text"]
                out = await crop_describe(c, image_b64=b64(frame), crops=crops, max_crops=2, enable_thinking=False)
                assert "thinking" not in out and len(out["crop_descriptions"]) == 2
                if mode == "switch":
                    assert engine_call(sim)["chat_template_kwargs"] == {"enable_thinking": False}
                    assert "</think>" not in out["text"] and out["text"].startswith("CROPS:")
    finally:
        await runner.cleanup()
    # an engine with a reasoning parser: the thought arrives in message.reasoning
    sim, runner = await start_sim(thinking=True, reasoning_parser="qwen3")
    try:
        async with run_proxy(proxy_config(sim.url, thinking="switch")) as p:
            await Admin(p.admin_url).put({"generation": 1, "concurrency": 4, "adapters": []})
            c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
            out = await crop_describe(c, image_b64=b64(frame), crops=crops, max_crops=1, enable_thinking=True)
            assert out["thinking"].strip() == "sim thought about 1 image(s)" and out["text"].startswith("CROPS:")
            assert len(out["crop_descriptions"]) == 1
    finally:
        await runner.cleanup()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 0).save(buf, format="PNG")
    return buf.getvalue()


BAD = [
    ({"image_b64": b64(b"just some text, not an image")}, "invalid_image", "not a JPEG or PNG image"),
    ({"image_b64": "%%% not base64 %%%"}, "invalid_image", "not valid base64"),
    ({"image_b64": b64(_png(5000, 4000))}, "image_too_large", "5000x4000 = 20000000 pixels"),  # tiny file, huge frame
    ({"image_b64": "A" * 14_000_004}, "image_too_large", "longer than 14000000 characters"),
    ({"crops": [{"bbox": [10, 10, 5, 40]}]}, "invalid_crops", "crops[0].bbox must have x2 > x1"),
    ({"crops": [{"bbox": [1, 2, 3, 40]}, {"xyxy": [1, 2, 3]}]}, "invalid_crops", "crops[1].bbox must be 4 numbers"),
    ({"crops": [{"bbox": ["a", 2, 30, 40]}]}, "invalid_crops", "crops[0].bbox must be 4 numbers"),
    ({"crops": [{"bbox": [1, 2, 30, 40], "confidence": "high"}]}, "invalid_crops", "crops[0].confidence"),
    ({"crops": [{"bbox": [1, 2, 30, 40]}] * 51}, "invalid_crops", "at most 50"),
    ({"max_crops": 21}, "invalid_max_crops", "`max_crops` must be an integer from 0 to 20 (got 21)"),
    ({"max_crops": -1}, "invalid_max_crops", "from 0 to 20 (got -1)"),
    ({"max_crops": "3"}, "invalid_max_crops", "from 0 to 20"),
    ({"max_crops": True}, "invalid_max_crops", "from 0 to 20"),
    ({"max_tokens": 0}, "invalid_request", "`max_tokens` must be an integer from 1 to 16384"),
    ({"extra_body": {"messages": []}}, "invalid_request", "may not set messages"),
]


async def test_bad_input_is_400_with_a_clear_stable_message(sim, proxy, admin, sdk):
    await admin.put({"generation": 1, "concurrency": 4, "adapters": []})
    frame, _ = make_scene(1)
    before = len(sim.log)
    for extra, code, words in BAD:
        body = {"image_b64": b64(frame), **extra}
        with pytest.raises(openai.BadRequestError) as ei:
            await sdk.post("/vlmpool/crop-describe", body=body, cast_to=httpx.Response)
        full = ei.value.response.json()
        assert full["error"]["code"] == code and words in full["error"]["message"], (extra.keys(), full)
        assert full["detail"] == {"kind": code, "upstream_status": None, "moderated": False,
                                  "message": full["error"]["message"]}
    assert len(sim.log) == before  # nothing reached the engine


async def test_adapter_model_route_off_and_unknown_model(sim, adapters):
    frame, _ = make_scene(1)
    async with run_proxy(proxy_config(sim.url)) as p:
        await Admin(p.admin_url).put({"generation": 1, "concurrency": 4, "adapters": [
            {"name": "cats", "version": "00000001", "path": adapters("cats", "00000001")}]})
        c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
        resp = await c.post("/vlmpool/crop-describe", body={"image_b64": b64(frame), "model": "cats"},
                            cast_to=httpx.Response)
        assert engine_call(sim)["model"] == "cats@00000001" and resp.headers["x-vlmpool-served-by"] == "cats@00000001"
        assert resp.json()["model"] == "cats" and resp.headers["x-request-id"]
        with pytest.raises(openai.NotFoundError) as ei:
            await c.post("/vlmpool/crop-describe", body={"image_b64": b64(frame), "model": "dogs"},
                         cast_to=httpx.Response)
        assert ei.value.body["code"] == "model_not_found"
        await sim.faults(fail_next_requests=1)  # the chat error table applies
        with pytest.raises(openai.InternalServerError) as ei:
            await c.post("/vlmpool/crop-describe", body={"image_b64": b64(frame)}, cast_to=httpx.Response)
        assert ei.value.status_code == 503 and ei.value.response.json()["detail"]["upstream_status"] == 500
    async with run_proxy(proxy_config(sim.url, crop_describe=False)) as p:
        c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError) as ei:
            await c.post("/vlmpool/crop-describe", body={"image_b64": b64(frame)}, cast_to=httpx.Response)
        assert ei.value.body["code"] == "crop_describe_disabled"


async def test_the_chat_limiter_gates_crop_describe(sim):
    """crop-describe waits for the same engine slots as chat: with the one slot busy and no room to wait,
    it is a 429 queue_full, and the engine never sees it."""
    frame, _ = make_scene(1)
    await sim.faults(stall_seconds=2.0)
    async with run_proxy(proxy_config(sim.url, concurrency=1, queue_limit=0, queue_timeout=0.3)) as p:
        c = openai.AsyncOpenAI(base_url=p.url + "/v1", api_key="unused", max_retries=0)
        busy = asyncio.create_task(c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}],
                                                             max_tokens=2))
        async with asyncio.timeout(10):
            while p.proxy.limiter.active < 1:
                await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as ei:
            await c.post("/vlmpool/crop-describe", body={"image_b64": b64(frame)}, cast_to=httpx.Response)
        assert ei.value.body["code"] == "queue_full" and ei.value.response.json()["detail"]["kind"] == "queue_full"
        await sim.faults(stall_seconds=0.0)
        await busy
        assert len(sim.received("/v1/chat/completions")) == 1
