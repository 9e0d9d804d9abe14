"""Controller parts that need no cluster: status logic, and the push client
against a real proxy in front of the real simulator (in-process, loopback)."""

from __future__ import annotations

import json

import pytest
from vlmtest.operator import write_adapter

from vlmpool.controller import status as S
from vlmpool.controller.push import pod_fingerprint, pod_is_pushable, push_to_pods
from vlmpool.patcher.publish import check_version_path as _check_version_path

BASE = "Qwen/Qwen2.5-VL-3B-Instruct"
TOKEN = "operator-unit-token"


# ---- status logic ----------------------------------------------------------------------------------
def test_phase_from_conditions():
    st: dict = {"conditions": []}
    assert S.adapter_phase(st)[0] == "Pending"
    st["conditions"] = S.set_condition([], "PoolFound", "False", "PoolNotFound", "no pool")
    assert S.adapter_phase(st) == ("Pending", "PoolNotFound", "no pool")
    c = S.set_condition([], "Patched", "Unknown", "PatchJobRunning", "Job x")
    assert S.adapter_phase({"conditions": c})[0] == "Patching"
    c = S.set_condition(c, "Patched", "False", "RankTooHigh", "r=128")
    assert S.adapter_phase({"conditions": c}) == ("Failed", "RankTooHigh", "r=128")
    c = S.set_condition(c, "Patched", "True", "Patched", "v1")
    assert S.adapter_phase({"conditions": c})[0] == "Registering"
    for args, phase in ((S.loaded_condition(2, 2, []), "Ready"), (S.loaded_condition(0, 2, ["p: bad"]), "Failed"),
                        (S.loaded_condition(1, 2, []), "Registering"), (S.loaded_condition(0, 0, []), "Registering"),
                        (S.loaded_condition(1, 2, ["p: x"]), "Registering")):
        assert S.adapter_phase({"conditions": S.set_condition(c, "Loaded", *args)})[0] == phase
    assert S.adapter_phase({"conditions": c}, deleting=True)[0] == "Deleting"
    out = S.with_phase({"conditions": S.set_condition(c, "Loaded", "True", "Loaded", "2/2")}, 3)
    ready = S.get_condition(out["conditions"], "Ready")
    assert out["phase"] == "Ready" and ready["status"] == "True" and ready["observedGeneration"] == 3


def test_condition_transition_time_moves_only_on_status_change():
    c1 = S.set_condition([], "Loaded", "False", "Loading", "0/2")
    c1[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    c2 = S.set_condition(c1, "Loaded", "False", "Loading", "1/2")
    assert c2[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and c2[0]["message"] == "1/2"
    c3 = S.set_condition(c2, "Loaded", "True", "Loaded", "2/2")
    assert c3[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z"


def test_termination_message_parsing_and_summary():
    assert S.parse_termination_message(None) is None
    assert S.parse_termination_message("Traceback ...") is None
    assert S.parse_termination_message('{"version": "x"}') is None  # no ok flag
    msg = S.parse_termination_message(json.dumps({"ok": True, "version": "v", "path": "/p", "tensorsKept": 4,
                                                  "rank": "8", "doraError": 0.01, "warnings": ["w"], "extra": 1}))
    summary = S.report_summary(msg)
    assert summary == {"tensorsKept": 4, "doraError": 0.01, "warnings": ["w"]}  # rank "8" is not an int: dropped


def test_registered_path_must_be_the_immutable_version_directory():
    root = "/var/lib/vlmpool/adapters"
    assert _check_version_path(root, "a", "v1", f"{root}/a/versions/v1") is None
    assert _check_version_path(root, "a", "v1", f"{root}/a/versions/v1/") is None
    assert "current" in _check_version_path(root, "a", "v1", f"{root}/a/current")
    assert _check_version_path(root, "a", "v1", f"{root}/b/versions/v1")
    assert _check_version_path(root, "a", "../x", f"{root}/a/versions/../x")
    assert _check_version_path(root, "a", "", f"{root}/a/versions/")


def _pod(name: str, ip: str | None, phase: str = "Running", restarts: int = 0) -> dict:
    st: dict = {"phase": phase, "containerStatuses": [
        {"name": "proxy", "restartCount": restarts, "containerID": f"c://{restarts}",
         "state": {"running": {"startedAt": "t"}}},
        {"name": "engine", "restartCount": 0, "state": {"running": {"startedAt": "t"}}}]}
    if ip:
        st["podIP"] = ip
    return {"metadata": {"name": name, "uid": name + "-uid"}, "status": st}


def test_pushable_and_fingerprint():
    assert pod_is_pushable(_pod("a", "10.0.0.1"))
    assert not pod_is_pushable(_pod("a", None))
    assert not pod_is_pushable(_pod("a", "10.0.0.1", phase="Pending"))
    gone = _pod("a", "10.0.0.1")
    gone["metadata"]["deletionTimestamp"] = "t"
    assert not pod_is_pushable(gone)
    assert pod_fingerprint(_pod("a", "10.0.0.1")) == pod_fingerprint(_pod("a", "10.0.0.1"))
    assert pod_fingerprint(_pod("a", "10.0.0.1")) != pod_fingerprint(_pod("a", "10.0.0.1", restarts=1))


# ---- push against the real proxy + simulator ----------------------------------------------------------
@pytest.fixture
async def proxy_pod(tmp_path):
    from aiohttp import web

    from vlmpool.proxy.server import ProxyConfig, run_proxy
    from vlmpool.sim.server import SimConfig, create_app

    app = create_app(SimConfig(model=BASE, enable_lora=True, runtime_lora=True, max_loras=4, ttft_ms=1, tpot_ms=1))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    cfg = ProxyConfig(engine_url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=0, admin_port=0,
                      admin_token=TOKEN, base_model=BASE, shutdown_timeout=2.0)
    async with run_proxy(cfg) as running:
        yield running
    await runner.cleanup()


async def test_push_loads_reports_and_refuses_older_generations(proxy_pod, tmp_path):
    good = write_adapter(tmp_path / "a" / "versions" / "0000000a")
    pod = _pod("p0", "127.0.0.1")
    state = {"generation": 3, "concurrency": 4, "adapters": [
        {"name": "good", "version": "0000000a", "path": str(good)},
        {"name": "broken", "version": "0000000a", "path": str(tmp_path / "missing")}]}
    (res,) = await push_to_pods([pod], proxy_pod.admin_port, TOKEN, state, timeout=10)
    assert res.ok and res.generation == 3  # accepted (the proxy loads in the background)
    # the operator's long poll of the proxy's progress answers once generation 3 converged
    (res,) = await push_to_pods([pod], proxy_pod.admin_port, TOKEN, state, timeout=10, poll_wait=10)
    assert res.ok and res.converged and res.generation == 3
    assert res.adapters["good"]["state"] == "loaded" and res.adapters["broken"]["state"] == "failed"
    entries, n, failures = S.pod_loads("good", "0000000a", ["p0"], {"p0": res})
    assert n == 1 and entries == [{"pod": "p0", "state": "loaded", "version": "0000000a"}]
    entries, n, failures = S.pod_loads("broken", "0000000a", ["p0"], {"p0": res})
    assert n == 0 and entries[0]["state"] == "failed" and failures
    # An older generation is refused with the proxy's generation (what the operator bumps past).
    (old,) = await push_to_pods([pod], proxy_pod.admin_port, TOKEN, {**state, "generation": 1}, timeout=10)
    assert not old.ok and old.conflict_generation == 3
    # Wrong token, unreachable pod: errors, never exceptions.
    (bad,) = await push_to_pods([pod], proxy_pod.admin_port, "wrong", state, timeout=10)
    assert not bad.ok and "401" in bad.error
    (down,) = await push_to_pods([_pod("p1", "127.0.0.1")], 1, TOKEN, state, timeout=2)
    assert not down.ok and down.error


def test_pool_status_from_the_deployment():
    pool = {"metadata": {"name": "vision", "generation": 2}, "spec": {"replicas": 2}}
    fields, conds = S.deployment_status(pool, None)
    assert fields.ready == "0/2" and ("Ready", "False") == conds[0][:2]
    dep = {"metadata": {"generation": 5}, "status": {"observedGeneration": 5, "replicas": 2, "readyReplicas": 2,
                                                      "updatedReplicas": 2}}
    fields, conds = S.deployment_status(pool, dep)
    assert fields.model_dump(by_alias=True, exclude_unset=True) == {"replicas": 2, "readyReplicas": 2, "ready": "2/2",
                      # the scale subresource's selector: the pool's pods
                      "selector": "vlmpool.io/pool=vision,app.kubernetes.io/component=server"}
    assert {c[0]: c[1:3] for c in conds} == {"Ready": ("True", "PodsReady"), "Progressing": ("False", "RolledOut"),
                                             "Stalled": ("False", "Progressing")}
    dep["status"].update(readyReplicas=1, updatedReplicas=1, replicas=3)
    fields, conds = S.deployment_status(pool, dep)
    assert {c[0]: c[1:3] for c in conds} == {"Ready": ("False", "PodsNotReady"), "Progressing": ("True", "RollingOut"),
                                             "Stalled": ("False", "Progressing")}
    fields, conds = S.deployment_status({"metadata": {"name": "vision"}, "spec": {"replicas": 0}},
                                        {"metadata": {}, "status": {}})
    assert conds[0][2] == "ScaledToZero"


def _pending(name: str, message: str | None, phase: str = "Pending") -> dict:
    conds = [] if message is None else [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                         "message": message}]
    return {"metadata": {"name": name}, "status": {"phase": phase, "conditions": conds}}


def test_a_roll_that_no_node_can_take_is_stalled_with_the_schedulers_reason():
    """A full GPU cluster: the new pod waits for a node. The pool says Stalled with the scheduler's
    reason per pod (and why, when the surge is what does not fit); a Pending pod that is only being
    scheduled, a running one, or one being deleted does not count; a Deployment past its progress
    deadline is Stalled too."""
    pool = {"metadata": {"name": "vision", "generation": 2}, "spec": {"replicas": 2}}
    gpu = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available"
    dep = {"metadata": {"generation": 6}, "spec": {"strategy": {"rollingUpdate": {"maxSurge": 1}}},
           "status": {"observedGeneration": 6, "replicas": 3, "readyReplicas": 2, "updatedReplicas": 1}}
    pods = [_pending("vision-new", gpu), _pending("vision-a", None, "Running"), _pending("vision-b", None)]
    _, conds = S.deployment_status(pool, dep, pods)
    stalled = {c[0]: c[1:] for c in conds}["Stalled"]
    assert stalled[:2] == ("True", "PodsUnschedulable"), stalled
    assert stalled[2].startswith("1 pod(s) Pending: vision-new: Unschedulable: 0/1 nodes are available: 1 "
                                 "Insufficient nvidia.com/gpu"), stalled
    assert "maxSurge" in stalled[2]
    dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] = 0
    _, conds = S.deployment_status(pool, dep, [*pods, _pending("vision-c", "0/1 nodes: taint")])
    stalled = {c[0]: c[1:] for c in conds}["Stalled"]
    assert stalled[2].startswith("2 pod(s) Pending: vision-c: ") and "maxSurge" not in stalled[2], stalled
    gone = _pending("vision-new", gpu)
    gone["metadata"]["deletionTimestamp"] = "2026-11-24T00:00:00Z"
    _, conds = S.deployment_status(pool, dep, [gone])
    assert {c[0]: c[1] for c in conds}["Stalled"] == "False"
    dep["status"]["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                    "message": 'ReplicaSet "vision-7d" has timed out progressing.'}]
    _, conds = S.deployment_status(pool, dep, [])
    assert {c[0]: c[1:] for c in conds}["Stalled"] == ("True", "ProgressDeadlineExceeded",
                                                        'ReplicaSet "vision-7d" has timed out progressing.')


async def test_concurrent_pushes_of_a_pool_coalesce_and_never_overlap():
    import asyncio

    from vlmpool.controller.pushing import Pusher
    from vlmpool.controller.reconciler import Controller, PushSummary

    parts = Controller(kube=None)  # type: ignore[arg-type]

    class Recording(Pusher):
        def __init__(self):
            super().__init__(parts.pusher.kube, parts.pusher.config, parts.pusher.metrics, parts.pusher.events,
                             parts.pusher.status, parts.health)
            self.running = 0
            self.max_running = 0
            self.calls = 0

        async def _push(self, ns, pool, st):
            self.calls += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            await asyncio.sleep(0.05)
            self.running -= 1
            return PushSummary(pool, self.calls, [], {}, {})

    r = Recording()
    first = asyncio.create_task(r.push_pool("ns", "p"))
    await asyncio.sleep(0.01)  # the first push is running; the next five share one push after it
    results = await asyncio.gather(first, *(r.push_pool("ns", "p") for _ in range(5)))
    assert r.calls == 2 and r.max_running == 1
    assert [x.generation for x in results] == [1, 2, 2, 2, 2, 2]
    # A waiter cancelled while queued does not strand the callers sharing its push.
    blocker = asyncio.create_task(r.push_pool("ns", "p"))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(r.push_pool("ns", "p"))
    await asyncio.sleep(0.01)
    queued.cancel()
    later = await asyncio.wait_for(r.push_pool("ns", "p"), 2)
    await blocker
    assert later.generation == 4


async def test_prune_waits_until_every_proxy_confirmed_the_old_unload(proxy_pod, tmp_path):
    """A version directory may go only after the proxy confirmed the engine unloaded that version: vLLM
    re-reads a registered adapter's directory when its CPU LRU evicted it."""
    import asyncio

    from vlmpool.controller.push import PodResult

    v1 = write_adapter(tmp_path / "a" / "versions" / "0000000a")
    v2 = write_adapter(tmp_path / "a" / "versions" / "0000000b")
    pod = _pod("p0", "127.0.0.1")
    state = {"generation": 1, "concurrency": 4, "adapters": [{"name": "a", "version": "0000000a", "path": str(v1)}]}
    await push_to_pods([pod], proxy_pod.admin_port, TOKEN, state, timeout=10)
    (r1,) = await push_to_pods([pod], proxy_pod.admin_port, TOKEN, state, timeout=10, poll_wait=10)
    assert r1.converged and r1.unloading == {} and S.unloads_unconfirmed("a", "0000000a", ["p0"], {"p0": r1}) == []
    # the swap: v1 is unloaded after it drained; while the proxy lists it, it is not confirmed
    state = {**state, "generation": 2, "adapters": [{"name": "a", "version": "0000000b", "path": str(v2)}]}
    await push_to_pods([pod], proxy_pod.admin_port, TOKEN, state, timeout=10)
    (r2,) = await push_to_pods([pod], proxy_pod.admin_port, TOKEN, state, timeout=10, poll_wait=10)
    assert r2.converged and r2.adapters["a"]["state"] == "loaded"
    assert r2.unloading in ({}, {"a": {"0000000a"}})
    listed = PodResult("p0", True, 2, r2.adapters, unloading={"a": {"0000000a"}})
    assert S.unloads_unconfirmed("a", "0000000b", ["p0"], {"p0": listed}) == ["p0"]
    # once the proxy unloaded it, the next push reports nothing pending and the prune may run
    await proxy_pod.proxy.registry.drain_background()
    for _ in range(100):
        (r3,) = await push_to_pods([pod], proxy_pod.admin_port, TOKEN, state, timeout=10)
        if r3.unloading == {}:
            break
        await asyncio.sleep(0.05)
    assert S.unloads_unconfirmed("a", "0000000b", ["p0"], {"p0": r3}) == []
    # a proxy that does not report its unloads, or a failed push, never counts as confirmed
    assert S.unloads_unconfirmed("a", "0000000b", ["p0"], {"p0": PodResult("p0", True, 2, r3.adapters)}) == ["p0"]
    assert S.unloads_unconfirmed("a", "0000000b", ["p0"], {"p0": PodResult("p0", False, error="x")}) == ["p0"]
    assert S.unloads_unconfirmed("a", "0000000b", ["p0", "p1"], {"p0": r3}) == ["p1"]
