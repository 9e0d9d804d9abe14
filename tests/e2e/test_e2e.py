"""End to end on a running cluster: pools and adapters applied with kubectl, served by real proxy
and simulator processes, reconciled by the operator running under its own RBAC rules."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from vlmpool.names import API_VERSION
from vlmpool.testing.waiting import wait_for

NS = "e2e"
RESYNC_BOUND = 5.0  # seconds watched after a restart (the operator's resume handlers run at its start)
POOL = "pool"
PROXY_PORT, ENGINE_PORT = 8080, 8000


def apply(e2e, obj):
    e2e.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(obj))


def get(e2e, kind, name):
    res = e2e.kubectl("get", kind, name, "-n", NS, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def adapter_manifest(name, uri, **spec):
    return {"apiVersion": API_VERSION, "kind": "VLMAdapter", "metadata": {"name": name},
            "spec": {"poolRef": {"name": POOL}, "source": {"uri": uri}, **spec}}


def pool_pods(e2e):
    selector = f"vlmpool.io/pool={POOL},app.kubernetes.io/component=server"
    out = json.loads(e2e.kubectl("get", "pods", "-n", NS, "-l", selector, "-o", "json").stdout)["items"]
    return [p for p in out if not p["metadata"].get("deletionTimestamp") and p.get("status", {}).get("podIP")]


def http(url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def chat(e2e, pod, model, text="Describe the image."):
    return http(e2e.pod_url(pod, PROXY_PORT) + "/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8})


def engine_models(e2e, pod):
    status, body = http(e2e.pod_url(pod, ENGINE_PORT) + "/v1/models")
    assert status == 200, body
    return {m["id"] for m in body["data"]}


def ready(e2e, name, version=None):
    def check():
        st = (get(e2e, "vlma", name) or {}).get("status") or {}
        if st.get("phase") == "Failed":
            raise AssertionError(f"adapter {name} failed: {st.get('reason')}: {st.get('message')}")
        ok = st.get("phase") == "Ready" and st.get("loadedPods") == 2 and st.get("desiredPods") == 2
        return st if ok and (version is None or st.get("version") != version) else None
    return wait_for(check, 180, what=f"adapter {name} Ready on 2/2 pods")


class JobWatch:
    """The patch Jobs the apiserver reports (a kubectl watch) from entering the block until `bound`
    seconds after leaving it: absence is proved over a watched window, not by a list after a sleep."""

    def __init__(self, e2e, bound: float):
        bin_ = getattr(e2e, "kubectl_bin", None) or str(e2e.dev.cp.bin_dir / "kubectl")
        self.argv = [bin_, f"--kubeconfig={e2e.kubeconfig}", "get", "jobs", "-n", NS, "-l",
                     "app.kubernetes.io/component=patch", "--watch-only", "-o", "name"]
        self.bound, self.out = bound, ""

    def __enter__(self) -> JobWatch:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.out, _ = self.proc.communicate(timeout=self.bound)
        except subprocess.TimeoutExpired:  # the watch ran for the whole bound: stop it
            self.proc.terminate()
            self.out, _ = self.proc.communicate(timeout=30)

    def names(self) -> set[str]:
        return {line.split("/", 1)[-1] for line in self.out.split() if line}


def jobs_of(e2e, adapter):
    out = json.loads(e2e.kubectl("get", "jobs", "-n", NS, "-l",
                                 f"vlmpool.io/adapter={adapter},app.kubernetes.io/component=patch",
                                 "-o", "json").stdout)["items"]
    return sorted(j["metadata"]["name"] for j in out)


@pytest.fixture(scope="module")
def pool(e2e):
    e2e.kubectl("create", "namespace", NS, check=False)
    apply(e2e, {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": POOL},
                "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "servedName": "qwen2.5-vl-3b",
                                   "family": "qwen2_5_vl"},
                         "replicas": 2, "engine": {"gpus": 1, "maxLoras": 4, "maxCpuLoras": 8},
                         "proxy": {"concurrency": 8}}})
    wait_for(lambda: len([p for p in pool_pods(e2e) if any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]) == 2,
        180, what="2 ready pool pods")
    return get(e2e, "vlmp", POOL)


def test_adapter_becomes_ready_on_every_pod_and_answers(e2e, pool, adapters):
    apply(e2e, adapter_manifest("reader", f"file://{adapters['v1']}", servedName="acme/reader"))
    st = ready(e2e, "reader")
    assert st["loaded"] == "2/2" and st["servedName"] == "acme/reader"
    assert st["report"]["baseCheck"] == "match"
    out = e2e.kubectl("get", "vlma", "reader", "-n", NS).stdout.split("\n")
    assert out[0].split() == ["NAME", "POOL", "PHASE", "VERSION", "LOADED", "AGE"]
    assert out[1].split()[1:5] == [POOL, "Ready", st["version"], "2/2"]
    for pod in pool_pods(e2e):
        status, body = chat(e2e, pod, "acme/reader")
        assert status == 200, body
        text = body["choices"][0]["message"]["content"]
        assert text.startswith(f"sim:acme/reader@{st['version']}"), text
        assert f"path={st['path']}" in text
        assert f"acme/reader@{st['version']}" in engine_models(e2e, pod)
    pool_status = get(e2e, "vlmp", POOL)["status"]
    assert pool_status["ready"] == "2/2" and pool_status["concurrency"] == 8


def test_engine_restart_is_healed_without_a_manual_step(e2e, pool, adapters):
    st = ready(e2e, "reader")
    internal = f"acme/reader@{st['version']}"
    pod = pool_pods(e2e)[0]
    restarts = next(c["restartCount"] for c in pod["status"]["containerStatuses"] if c["name"] == "engine")
    e2e.kill_container(pod, "engine")

    def reloaded():
        p = get(e2e, "pod", pod["metadata"]["name"])
        cs = next(c for c in p["status"]["containerStatuses"] if c["name"] == "engine")
        return cs["restartCount"] > restarts and internal in engine_models(e2e, p)
    # No request is sent meanwhile: the operator's push (pod restart seen) reloads it, not self-heal.
    t0 = time.monotonic()
    wait_for(reloaded, 60, what="adapter loaded again in the restarted engine")
    assert time.monotonic() - t0 < 60
    status, body = chat(e2e, pod, "acme/reader")
    assert status == 200 and body["choices"][0]["message"]["content"].startswith(f"sim:{internal}")


def test_source_change_swaps_version_with_zero_failed_requests(e2e, pool, adapters):
    old = ready(e2e, "reader")
    results: list[tuple[int, str]] = []
    stop = threading.Event()
    pods = pool_pods(e2e)

    def load(pod):
        while not stop.is_set():
            status, body = chat(e2e, pod, "acme/reader")
            text = body["choices"][0]["message"]["content"] if status == 200 else json.dumps(body)
            results.append((status, text))
    threads = [threading.Thread(target=load, args=(p,)) for p in pods for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        e2e.kubectl("patch", "vlma", "reader", "-n", NS, "--type=merge", "-p",
                    json.dumps({"spec": {"source": {"uri": f"file://{adapters['v2']}"}}}))
        new = ready(e2e, "reader", version=old["version"])
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert new["version"] != old["version"]
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:5]
    versions = {text.split()[0] for _, text in results}
    assert versions <= {f"sim:acme/reader@{old['version']}", f"sim:acme/reader@{new['version']}"}, versions
    assert f"sim:acme/reader@{new['version']}" in versions
    assert len(results) > 20
    assert len(jobs_of(e2e, "reader")) == 2  # one Job per version


def test_operator_restart_creates_no_duplicate_jobs_and_converges(e2e, pool, adapters):
    before = jobs_of(e2e, "reader")
    st = ready(e2e, "reader")
    e2e.stop_operator()
    # Work arrives while the operator is down: nothing makes its Job until the operator is back.
    with JobWatch(e2e, bound=2) as down:
        apply(e2e, adapter_manifest("late", f"file://{adapters['other']}"))
    assert {n for n in down.names() if n.startswith("late-")} == set() and jobs_of(e2e, "late") == []
    e2e.start_operator()
    late = ready(e2e, "late")
    assert late["loaded"] == "2/2"
    known = set(jobs_of(e2e, "reader")) | set(jobs_of(e2e, "late"))
    # The restarted operator resumes every adapter at once: a duplicate Job would show in the watch.
    with JobWatch(e2e, bound=RESYNC_BOUND) as restarted:
        e2e.restart_operator()
    assert restarted.names() - known == set()
    assert jobs_of(e2e, "reader") == before
    assert len(jobs_of(e2e, "late")) == 1
    assert ready(e2e, "reader")["version"] == st["version"]
    for pod in pool_pods(e2e):
        models = engine_models(e2e, pod)
        assert f"acme/reader@{st['version']}" in models and f"late@{late['version']}" in models


@pytest.mark.parametrize("which,reason", [("wrong-base", "BaseModelMismatch"), ("pickle", "PickleWeights")])
def test_bad_adapter_fails_with_the_reason(e2e, pool, adapters, which, reason):
    name = f"bad-{which}"
    apply(e2e, adapter_manifest(name, f"file://{adapters[which]}"))

    def failed():
        st = (get(e2e, "vlma", name) or {}).get("status") or {}
        return st if st.get("phase") == "Failed" else None
    st = wait_for(failed, 120, what=f"{name} Failed")
    assert st["reason"] == reason, st
    assert st["message"]
    for pod in pool_pods(e2e):
        status, body = chat(e2e, pod, name)
        assert status == 404, body


def test_delete_unloads_everywhere_and_removes_files(e2e, pool, adapters):
    st = ready(e2e, "late")
    files = e2e.adapter_files(pool, NS, "late")
    assert (files / "versions" / st["version"] / "adapter_model.safetensors").exists()
    e2e.kubectl("delete", "vlma", "late", "-n", NS, "--wait=true", "--timeout=120s", timeout=130)
    for pod in pool_pods(e2e):
        assert f"late@{st['version']}" not in engine_models(e2e, pod)
        status, _ = chat(e2e, pod, "late")
        assert status == 404
    wait_for(lambda: not files.exists(), 60, what="adapter files removed")
    # The other adapter is untouched.
    assert ready(e2e, "reader")["loaded"] == "2/2"


def test_dashboard_series_exist_on_the_running_pods(e2e, pool, adapters):
    """Every series the chart's Grafana dashboard queries is on the /metrics of the operator and of each
    pool pod's proxy, and the adapter's traffic is there under its served name."""
    from prometheus_client.parser import text_string_to_metric_families

    from vlmpool.testing.dashboard import exported_names, queried_metrics

    def scrape(url):
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read().decode()
    queried = queried_metrics()
    proxy_series = {q for q in queried if q.startswith("vlmpool_proxy_")}
    operator_series = {q for q in queried if q.startswith("vlmpool_operator_")}
    assert proxy_series and operator_series and proxy_series | operator_series == queried
    assert operator_series - exported_names(scrape(e2e.operator_metrics_url())) == set()
    for pod in pool_pods(e2e):
        text = scrape(e2e.pod_url(pod, PROXY_PORT) + "/metrics")
        assert proxy_series - exported_names(text) == set(), pod["metadata"]["name"]
        models = {s.labels.get("model") for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == "vlmpool_proxy_requests_total"}
        assert "acme/reader" in models, models


def test_a_pool_that_no_node_can_take_says_stalled_with_the_schedulers_reason(e2e, pool):
    """A full GPU cluster: a pool whose pod needs more GPUs than the node has stays Pending. The pool says
    why (Stalled, the scheduler's reason per pod, a Warning Event) instead of a silent rollout; once its
    spec fits, the roll goes on and Stalled turns False."""
    big = "big"
    spec = {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"}, "replicas": 1,
            "engine": {"gpus": 16, "maxLoras": 4, "maxCpuLoras": 8}}
    apply(e2e, {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": big}, "spec": spec})
    try:
        def stalled(status: str):
            def check():
                conds = ((get(e2e, "vlmp", big) or {}).get("status") or {}).get("conditions") or []
                c = next((c for c in conds if c["type"] == "Stalled"), None)
                return c if c and c["status"] == status else None
            return check
        c = wait_for(stalled("True"), 120, what="pool big Stalled")
        assert c["reason"] == "PodsUnschedulable", c
        assert "1 pod(s) Pending: big-" in c["message"], c
        # The scheduler's first word may name another wait (on a real node the new pool's claim is bound by
        # the provisioner a moment later: "unbound immediate PersistentVolumeClaims"); the condition follows
        # the scheduler's latest reason, which then is the GPUs.
        c = wait_for(lambda: (c := stalled("True")()) and "Insufficient nvidia.com/gpu" in c["message"] and c,
                     120, what="pool big Stalled on its GPUs")

        def event(reason):
            out = json.loads(e2e.kubectl("get", "events", "-n", NS, "--field-selector",
                                         f"involvedObject.kind=VLMPool,involvedObject.name={big},reason={reason}",
                                         "-o", "json").stdout)["items"]
            return out[0] if out else None
        ev = wait_for(lambda: event("RolloutStalled"), 60, what="a RolloutStalled Event")
        assert ev["type"] == "Warning" and "Pending: big-" in ev["message"], ev

        spec["engine"]["gpus"] = 1
        apply(e2e, {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": big},
                    "spec": spec})
        c = wait_for(stalled("False"), 180, what="pool big no longer Stalled")
        assert c["reason"] == "Progressing", c
        wait_for(lambda: event("RolloutResumed"), 60, what="a RolloutResumed Event")
    finally:
        e2e.kubectl("delete", "vlmp", big, "-n", NS, "--wait=false", check=False)
