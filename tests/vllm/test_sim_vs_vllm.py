"""The simulator judged by the real engine: one probe set, sent in the same order to `vlmpool sim` and to real
vLLM (the CPU build, `make test-vllm`'s venv) started with the same flags on the same tiny Qwen2.5-VL
(`vlmpool testing make-model`), and compared on statuses and structure, never on generated text.

Every difference must be listed, with its reason, in docs/sim.md's table between the `sim-vs-vllm` markers,
which this test reads: a difference not listed fails, and so does a listed one that no longer occurs (the
list and the simulator cannot drift apart). One engine start for the module (~30-80 s), reused by every probe.

What is compared, per probe: the status; the media type; for JSON the key skeleton (every key path, `[*]`
for list items, with the value's JSON type) and the exact values of the fields in VALUE_PATHS (error
message/type/param/code, object, model, prompt token counts, finish reasons of short answers, model ids,
roots and parents, the version); for plain-text answers the text; for streams the same over the events
(list of decoded `data:` chunks) and whether `[DONE]` ended them; for /metrics the label names of the series
the proxy and the EPP read.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from real_engine import free_port, start_engine

from vlmpool.testing.adapters import make_adapter, write_lora
from vlmpool.testing.images import png
from vlmpool.testing.vlm_model import make_model
from vlmpool.testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
SIM_DOC = REPO / "docs" / "sim.md"
# the engine flags both get (the simulator ignores --dtype, as it ignores every GPU flag)
ARGS = ["--served-model-name", "base", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--max-model-len", "512", "--max-num-seqs", "4", "--dtype", "bfloat16",
        "--limit-mm-per-prompt", '{"image":1,"video":0}']
# what the proxy (vlmpool/proxy) and the GIE EPP read from /metrics
METRICS = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
           "vllm:lora_requests_info")
VALUE_PATHS = ("status", "media", "text", "done", "error.message", "error.type", "error.param", "error.code",
               "object", "model", "usage.prompt_tokens", "choices[*].finish_reason", "choices[*].index",
               "data[*].id", "data[*].root", "data[*].parent", "data[*].max_model_len", "data[*].object",
               "version", "events[*].object", "events[*].model", "events[*].choices[*].finish_reason",
               "events[*].choices[*].delta.role", "metrics")
HELLO = [{"role": "user", "content": "Hello there"}]


IMAGE_URL = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()


# ---- the probe set -----------------------------------------------------------------------------------------

@dataclass
class Probe:
    name: str
    method: str
    path: str
    body: Any = None
    stream: bool = False


def probes(adapters: dict[str, Path]) -> list[Probe]:
    def chat(model: str, messages: Any = None, **extra: Any) -> dict[str, Any]:
        return {"model": model, "messages": messages or HELLO, "max_tokens": 4, **extra}

    def load(name: str, path: str, **extra: Any) -> dict[str, Any]:
        return {"lora_name": name, "lora_path": path, **extra}

    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": IMAGE_URL}}]}]
    long_text = [{"role": "user", "content": "a" * 600}]
    near_limit = [{"role": "user", "content": "b" * 440}]
    P = Probe
    return [
        P("version", "GET", "/version"),
        P("health", "GET", "/health"),
        P("models.base", "GET", "/v1/models"),
        P("chat.text", "POST", "/v1/chat/completions", chat("base")),
        P("chat.image", "POST", "/v1/chat/completions", chat("base", image)),
        P("chat.stream", "POST", "/v1/chat/completions", chat("base", max_tokens=3, stream=True), stream=True),
        P("completions", "POST", "/v1/completions", {"model": "base", "prompt": "Hello there", "max_tokens": 4}),
        P("completions.stream", "POST", "/v1/completions",
          {"model": "base", "prompt": "Hello there", "max_tokens": 3, "stream": True}, stream=True),
        P("chat.over-max-model-len", "POST", "/v1/chat/completions", chat("base", long_text)),
        P("completions.over-max-model-len", "POST", "/v1/completions",
          {"model": "base", "prompt": "a" * 600, "max_tokens": 4}),
        P("chat.max-tokens-over-max-model-len", "POST", "/v1/chat/completions", chat("base", max_tokens=1000)),
        P("chat.max-tokens-clamped", "POST", "/v1/chat/completions", chat("base", near_limit, max_tokens=100)),
        P("chat.max-tokens-zero", "POST", "/v1/chat/completions", chat("base", max_tokens=0)),
        P("chat.no-messages", "POST", "/v1/chat/completions", {"model": "base"}),
        P("chat.unknown-model", "POST", "/v1/chat/completions", chat("nosuch")),
        P("load.good", "POST", "/v1/load_lora_adapter", load("a1", str(adapters["good"]))),
        P("load.again", "POST", "/v1/load_lora_adapter", load("a1", str(adapters["good"]))),
        P("load.inplace", "POST", "/v1/load_lora_adapter", load("a1", str(adapters["good"]), load_inplace=True)),
        P("chat.adapter", "POST", "/v1/chat/completions", chat("a1")),
        P("chat.adapter.image", "POST", "/v1/chat/completions", chat("a1", image)),
        P("models.with-adapter", "GET", "/v1/models"),
        P("load.missing-lora-path", "POST", "/v1/load_lora_adapter", {"lora_name": "a2"}),
        P("load.missing-lora-name", "POST", "/v1/load_lora_adapter", {"lora_path": str(adapters["good"])}),
        P("load.empty-name", "POST", "/v1/load_lora_adapter", load("", str(adapters["good"]))),
        P("load.no-such-dir", "POST", "/v1/load_lora_adapter", load("a3", str(adapters["good"]) + "-nosuch")),
        P("load.base-name", "POST", "/v1/load_lora_adapter", load("base", str(adapters["good"]))),
        P("load.over-rank", "POST", "/v1/load_lora_adapter", load("a4", str(adapters["rank16"]))),
        P("load.oversized-in-features", "POST", "/v1/load_lora_adapter", load("a5", str(adapters["wide"]))),
        P("health.after-refused-load", "GET", "/health"),
        P("load.oversized-out-features", "POST", "/v1/load_lora_adapter", load("a7", str(adapters["tall"]))),
        P("load.tensor-rank-over-max", "POST", "/v1/load_lora_adapter", load("a8", str(adapters["deep"]))),
        P("load.tensor-rank-under-config", "POST", "/v1/load_lora_adapter", load("a9", str(adapters["shallow"]))),
        P("chat.refused-adapter", "POST", "/v1/chat/completions", chat("a5")),
        P("load.smaller-in-features", "POST", "/v1/load_lora_adapter", load("a6", str(adapters["narrow"]))),
        P("chat.smaller-in-features", "POST", "/v1/chat/completions", chat("a6")),
        P("unload.loaded", "POST", "/v1/unload_lora_adapter", {"lora_name": "a1"}),
        P("unload.twice", "POST", "/v1/unload_lora_adapter", {"lora_name": "a1"}),
        P("unload.unknown", "POST", "/v1/unload_lora_adapter", {"lora_name": "nosuch"}),
        P("unload.missing-name", "POST", "/v1/unload_lora_adapter", {}),
        P("chat.unloaded-adapter", "POST", "/v1/chat/completions", chat("a1")),
        P("load.after-unload", "POST", "/v1/load_lora_adapter", load("a1", str(adapters["good"]))),
        P("chat.reloaded-adapter", "POST", "/v1/chat/completions", chat("a1")),
        P("metrics", "GET", "/metrics"),
        P("health.end", "GET", "/health"),
    ]


# ---- observing an answer -----------------------------------------------------------------------------------

def _type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}[type(v)]


def skeleton(value: Any, prefix: str = "") -> dict[str, str]:
    """Every key path of a JSON value with its type; list items merged under [*]."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{prefix}.{k}" if prefix else k
            out[path] = _type(v)
            out.update(skeleton(v, path))
    elif isinstance(value, list):
        for item in value:
            for path, t in skeleton(item, f"{prefix}[*]").items():
                out[path] = t if out.get(path) in (None, t) else f"{out[path]}|{t}"
            out.setdefault(f"{prefix}[*]", _type(item))
    return out


def values(value: Any, path: str) -> list[Any]:
    """The values at a dotted path, [*] over lists."""
    items = [value]
    for part in re.findall(r"[^.\[\]]+|\[\*\]", path):
        nxt: list[Any] = []
        for it in items:
            if part == "[*]" and isinstance(it, list):
                nxt.extend(it)
            elif isinstance(it, dict) and part in it:
                nxt.append(it[part])
        items = nxt
    return items


def _metrics(text: str) -> dict[str, Any]:
    """The label names of each series the proxy and the EPP read, and the labels of lora_requests_info's
    current series (the one with the largest value, the time of the last update, as the EPP reads it)."""
    out: dict[str, set[str]] = {}
    current: tuple[float, dict[str, str]] = (-1.0, {})
    for line in text.splitlines():
        m = re.match(r"^(vllm:[a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) in METRICS:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out.setdefault(m.group(1), set()).update(labels)
            if m.group(1) == "vllm:lora_requests_info" and float(m.group(3)) > current[0]:
                current = (float(m.group(3)), labels)
    found: dict[str, Any] = {k: sorted(v) for k, v in sorted(out.items())}
    found["lora_requests_info current"] = current[1]
    return found


def send(base: str, probe: Probe) -> dict[str, Any]:
    """One probe's observation: {"status", "media", and "json" | "text" | "events"/"done" | "metrics"}."""
    data = json.dumps(probe.body).encode() if probe.body is not None else None
    req = urllib.request.Request(base + probe.path, data=data, method=probe.method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        resp = urllib.request.urlopen(req, timeout=120)  # loopback only
        status, headers, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    media = (headers.get("Content-Type") or "").split(";")[0].strip() or None
    obs: dict[str, Any] = {"status": status, "media": media}
    text = raw.decode("utf-8", "replace")
    if probe.path == "/metrics":
        obs["media"] = "text/plain" if media and media.startswith("text/plain") else media
        obs["metrics"] = _metrics(text)
    elif probe.stream and status == 200:
        events, done = [], False
        for line in text.splitlines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    done = True
                else:
                    events.append(json.loads(line[6:]))
        obs["events"], obs["done"] = events, done
    elif media == "application/json":
        obs["json"] = json.loads(raw)
    elif probe.path != "/health":
        obs["text"] = text
    return obs


def _distinct(items: list[Any]) -> list[Any]:
    return sorted({json.dumps(x, sort_keys=True) for x in items})


def _matches(text: str, pattern: str) -> bool:
    """A table pattern: literal text where `*` matches anything (brackets are literal, unlike fnmatch)."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), text, re.S) is not None


def compare(name: str, sim: dict[str, Any], real: dict[str, Any]) -> list[str]:
    """The differences, each one line: 'value <path>: sim X, vllm Y' / 'key-only-vllm <path>' / ...."""
    diffs: list[str] = []

    def doc(o: dict[str, Any]) -> Any:
        if "events" in o:
            return {"events": o["events"]}
        return o.get("json")

    s_doc, r_doc = doc(sim), doc(real)
    if s_doc is not None or r_doc is not None:
        s_sk, r_sk = skeleton(s_doc) if s_doc is not None else {}, skeleton(r_doc) if r_doc is not None else {}
        for path in sorted(set(s_sk) | set(r_sk)):
            if path not in s_sk:
                diffs.append(f"key-only-vllm {path}")
            elif path not in r_sk:
                diffs.append(f"key-only-sim {path}")
            elif s_sk[path] != r_sk[path]:
                diffs.append(f"type {path}: sim {s_sk[path]}, vllm {r_sk[path]}")
    for path in VALUE_PATHS:
        if path in ("status", "media", "text", "done", "metrics"):
            s_v, r_v = sim.get(path), real.get(path)
        else:
            s_v = values(s_doc, path) if s_doc is not None else []
            r_v = values(r_doc, path) if r_doc is not None else []
            if path.startswith("events"):
                # how many chunks a stream has depends on the generated bytes (vLLM holds back a chunk until
                # its bytes decode), so streams compare the distinct values, not one per chunk
                s_v, r_v = _distinct(s_v), _distinct(r_v)
        if s_v != r_v:
            diffs.append(f"value {path}: sim {json.dumps(s_v)[:300]}, vllm {json.dumps(r_v)[:300]}")
    return diffs


# ---- the listed differences (docs/sim.md) -----------------------------------------------------------------

def listed() -> list[tuple[str, str, str]]:
    """(probe pattern, difference pattern, reason) rows of docs/sim.md's sim-vs-vllm table."""
    text = SIM_DOC.read_text()
    m = re.search(r"<!-- sim-vs-vllm:begin -->(.*?)<!-- sim-vs-vllm:end -->", text, re.S)
    assert m, "docs/sim.md has no sim-vs-vllm table"
    rows = []
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("probe", "") or set(cells[0]) <= {"-"}:
            continue
        probe, diff, reason = (c.strip("`") for c in cells)
        assert reason, f"docs/sim.md: the difference {probe} / {diff} gives no reason"
        rows.append((probe, diff, reason))
    return rows


def unexplained(diffs: dict[str, list[str]], rows: list[tuple[str, str, str]]) -> tuple[list[str], list[str]]:
    """(differences no row lists, rows that match no difference)."""
    used: set[int] = set()
    missing = []
    for probe, lines in diffs.items():
        for line in lines:
            hits = [i for i, (p, d, _) in enumerate(rows) if _matches(probe, p) and _matches(line, d)]
            used.update(hits)
            if not hits:
                missing.append(f"{probe}: {line}")
    stale = [f"{p} | {d}" for i, (p, d, _) in enumerate(rows) if i not in used]
    return missing, stale


# ---- the two servers ------------------------------------------------------------------------------------

def _lora(directory: Path, base: Path, shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]], r: int = 8) -> Path:
    """An adapter with the given lora_A/lora_B shapes per layer-0 attention module (q_proj, v_proj, ...)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for mod, (a, b) in shapes.items():
        prefix = f"base_model.model.model.language_model.layers.0.self_attn.{mod}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(*a, generator=g)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(*b, generator=g) * 0.01
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": sorted(shapes), "bias": "none",
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}))
    return directory


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("simvsvllm")
    model = make_model(root / "Qwen2.5-VL-tiny")
    adapters = {
        "good": make_adapter("qwen2_5_vl", root / "good", r=8, alpha=16, model_dir=model, base_name=str(model)),
        "rank16": make_adapter("qwen2_5_vl", root / "rank16", r=16, alpha=32, model_dir=model, base_name=str(model)),
        # q/v_proj A [8, 256]: in-features 256 where the model's are 128 (and B's out-features 256)
        "wide": write_lora(root / "wide", base=str(model), rank=8, hidden=256),
        # A [8, 64], B [64, 8]: smaller than the model's, which fits vLLM's buffers
        "narrow": write_lora(root / "narrow", base=str(model), rank=8, hidden=64),
        # q_proj (in 128, out 128): B with out-features 256
        "tall": _lora(root / "tall", model, {"q_proj": ((8, 128), (256, 8))}),
        # A/B of rank 16 (config r=8, --max-lora-rank 8): over the buffers' rank
        "deep": _lora(root / "deep", model, {"q_proj": ((16, 128), (128, 16))}),
        # A/B of rank 4, config r=8: fits the buffers
        "shallow": _lora(root / "shallow", model, {"q_proj": ((4, 128), (128, 4))}),
    }
    return model, adapters


def _wait_sim(proc: subprocess.Popen, url: str, deadline_s: float = 120.0) -> None:
    def healthy() -> bool:
        assert proc.poll() is None, f"vlmpool sim exited with {proc.returncode}"
        with urllib.request.urlopen(url + "/health", timeout=2) as r:  # OSError until it listens
            return r.status == 200
    wait_for(healthy, deadline_s, interval=0.2, what="vlmpool sim healthy")


@pytest.fixture(scope="module")
def observations(vllm_python, material, tmp_path_factory) -> dict[str, Any]:
    model, adapters = material
    log_dir = tmp_path_factory.mktemp("logs")
    probe_list = probes(adapters)
    out: dict[str, Any] = {"sim": {}, "vllm": {}}
    t0 = time.monotonic()
    port = free_port()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with open(log_dir / "sim.log", "wb") as log:
        sim = subprocess.Popen([sys.executable, "-m", "vlmpool.cli", "sim", str(model), "--host", "127.0.0.1",
                                "--port", str(port), *ARGS], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_sim(sim, url)
        for p in probe_list:
            out["sim"][p.name] = send(url, p)
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    with start_engine(vllm_python, model, ARGS, log_dir / "vllm.log") as engine:
        out["engine_start_s"] = engine.started_in_s
        for p in probe_list:
            out["vllm"][p.name] = send(engine.url, p)
        out["engine_log"] = engine.log_tail(3000)
    out["wall_s"] = time.monotonic() - t0
    (log_dir / "observations.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"sim-vs-vllm: engine started in {out['engine_start_s']:.1f} s, module wall {out['wall_s']:.1f} s "
          f"(both servers' answers: {log_dir / 'observations.json'})")
    return out


def test_the_listed_differences_are_exactly_the_differences(observations):
    diffs = {name: compare(name, observations["sim"][name], observations["vllm"][name])
             for name in observations["vllm"]}
    missing, stale = unexplained(diffs, listed())
    assert not missing, ("the simulator differs from vLLM where docs/sim.md lists no difference "
                         "(fix the simulator, or list it with its reason):\n  " + "\n  ".join(missing))
    assert not stale, ("docs/sim.md lists differences the real engine no longer shows (remove them):\n  "
                       + "\n  ".join(stale))


def test_the_real_engine_answers_what_the_probes_expect(observations):
    """The facts the simulator was fixed to follow, seen on the real engine itself (so a vLLM that changes
    them is noticed here, whatever the table says)."""
    real = observations["vllm"]
    status = {name: o["status"] for name, o in real.items()}
    assert status["chat.over-max-model-len"] == 400
    assert real["chat.over-max-model-len"]["json"]["error"]["param"] == "input_tokens"
    assert status["load.oversized-in-features"] == 500 and status["health.after-refused-load"] == 200
    assert "must match the size of tensor b" in real["load.oversized-in-features"]["json"]["error"]["message"]
    assert status["chat.refused-adapter"] == 404 and status["load.smaller-in-features"] == 200
    assert status["chat.adapter"] == 200 and status["chat.image"] == 200 and status["unload.twice"] == 404
    assert status["health.end"] == 200


def test_the_table_rules_need_no_engine():
    """How differences meet docs/sim.md's rows (runs without the engine): `*` is the only wildcard (brackets
    are literal), a difference no row matches is reported, and so is a row no difference matches."""
    rows = listed()
    assert rows and all(reason for _, _, reason in rows)
    table = [("chat.*", "value choices[*].finish_reason: *", "r"), ("load.x", "value media: *", "r")]
    missing, stale = unexplained({"chat.text": ["value choices[*].finish_reason: sim 1, vllm 2", "key-only-sim x"]},
                                 table)
    assert missing == ["chat.text: key-only-sim x"] and stale == ["load.x | value media: *"]
    assert _matches("value choices[*].index: a", "value choices[*].*") and not _matches("choicesX", "choices[*]")
