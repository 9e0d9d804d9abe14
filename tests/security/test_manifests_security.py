"""Issue #11 items 2, 3, 9, 10 at the level of the pure manifest builders (the apiserver tests in
test_apiserver.py show the same on the real control plane): what a hostile VLMAdapter spec can and
cannot put into a Job, the restricted security contexts, and the derived admin tokens."""

from __future__ import annotations

import pytest

from vlmpool.api.objects import Adapter, Pool
from vlmpool.controller.reconciler import pool_token
from vlmpool.manifests import adapter as MA
from vlmpool.manifests import pool as MP
from vlmpool.names import API_VERSION

BASE = "Qwen/Qwen2.5-VL-3B-Instruct"


def pool_obj(**spec) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VLMPool",
            "metadata": {"name": "vision", "namespace": "team-a", "uid": "pool-uid"},
            "spec": {"model": {"name": BASE, "family": "qwen2_5_vl"}, **spec}}


def pool(**spec) -> Pool:
    return Pool.parse(pool_obj(**spec))


def adapter(**spec) -> Adapter:
    return Adapter.parse({"apiVersion": API_VERSION, "kind": "VLMAdapter",
                          "metadata": {"name": "inv", "namespace": "team-a", "uid": "ad-uid"},
                          "spec": {"poolRef": {"name": "vision"}, "source": {"uri": "https://example.com/a.tgz"},
                                   **spec}})


def restricted_violations(pod_spec: dict) -> list[str]:
    """The checks of the Pod Security Standards `restricted` profile (v1.35) that these pods touch."""
    out = []
    psc = pod_spec.get("securityContext") or {}
    if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        out.append("pod seccompProfile")
    for v in pod_spec.get("volumes") or []:
        if "hostPath" in v:
            out.append(f"hostPath volume {v['name']}")
    for c in pod_spec["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            out.append(f"{c['name']}: capabilities drop ALL")
        if set((sc.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: capabilities add")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{c['name']}: runAsUser 0")
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
    return out


def test_pool_pods_pass_the_restricted_profile_with_read_only_roots():
    spec = MP.deployment(pool(), "h")["spec"]["template"]["spec"]
    assert restricted_violations(spec) == []
    containers = {c["name"]: c for c in spec["containers"]}
    assert all(c["securityContext"]["readOnlyRootFilesystem"] is True for c in containers.values())
    engine = containers["engine"]
    mounts = {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    for path in ("/tmp", MP.ENGINE_HOME):
        assert vols[mounts[path]] == {"name": mounts[path], "emptyDir": {}}
    assert {"name": "HOME", "value": MP.ENGINE_HOME} in engine["env"]


def test_a_pool_can_loosen_only_its_engine():
    spec = MP.deployment(pool(engine={"securityContext": {"runAsUser": 0, "runAsNonRoot": False,
                                                          "readOnlyRootFilesystem": False}}), "h")
    containers = {c["name"]: c for c in spec["spec"]["template"]["spec"]["containers"]}
    eng = containers["engine"]["securityContext"]
    assert eng["runAsUser"] == 0 and eng["runAsNonRoot"] is False and eng["readOnlyRootFilesystem"] is False
    assert eng["capabilities"] == {"drop": ["ALL"]} and eng["allowPrivilegeEscalation"] is False
    assert containers["proxy"]["securityContext"] == MP.container_security()
    assert restricted_violations(spec["spec"]["template"]["spec"]) == ["engine: runAsNonRoot", "engine: runAsUser 0"]


@pytest.mark.parametrize("field", [{"privileged": True}, {"allowPrivilegeEscalation": True},
                                   {"capabilities": {"add": ["SYS_ADMIN"]}},
                                   {"seccompProfile": {"type": "Unconfined"}}])
def test_a_pool_cannot_make_its_engine_privileged(field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        pool(engine={"securityContext": {"runAsUser": 0, **field}})  # refused where the spec is parsed


@pytest.mark.parametrize("which", ["patch", "cleanup", "prune"])
def test_job_pods_pass_the_restricted_profile(which):
    a, p = adapter(), pool()
    job = {"patch": lambda: MA.patch_job(a, p), "cleanup": lambda: MA.cleanup_job(a, p),
           "prune": lambda: MA.prune_job(a, p, "v1")}[which]()
    spec = job["spec"]["template"]["spec"]
    assert restricted_violations(spec) == []
    assert spec["securityContext"]["runAsUser"] == 65532 and spec["automountServiceAccountToken"] is False
    assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in spec["containers"])


def test_a_credentials_secret_reaches_the_patch_container_only_as_credential_keys():
    job = MA.patch_job(adapter(source={"uri": "https://example.com/a.tgz", "credentialsSecret": {"name": "creds"}}),
                       pool(), source_allow=("10.0.0.0/8",))
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in c  # a Secret key such as HTTPS_PROXY, PYTHONPATH or the allow-list never lands
    env = {e["name"]: e for e in c["env"]}
    assert env["VLMPOOL_SOURCE_ALLOW"] == {"name": "VLMPOOL_SOURCE_ALLOW", "value": "10.0.0.0/8"}
    from_secret = {n for n, e in env.items() if "valueFrom" in e}
    assert from_secret == set(MA.CREDENTIAL_KEYS)
    assert all(env[n]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": n, "optional": True}
               for n in from_secret)


def test_the_allow_list_env_is_set_even_when_empty():
    c = MA.patch_job(adapter(), pool())["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "VLMPOOL_SOURCE_ALLOW", "value": ""} in c["env"]


@pytest.mark.parametrize("uri,allowed,ok", [
    ("file:///var/lib/kubelet", (), False),
    ("file:///srv/adapters/a", (), False),
    ("file:///srv/adapters/a", ("/srv/adapters",), True),
    ("file:///srv/adapters", ("/srv/adapters/",), True),
    ("file:///srv/adapters-evil/a", ("/srv/adapters",), False),
    ("file:///srv/adapters/../../var/lib/kubelet", ("/srv/adapters",), False),
    ("file:///srv/adapters/./a", ("/srv/adapters",), False),
    ("file:///srv/adapters//a", ("/srv/adapters",), False),
    ("file:///srv/adapters/%2e%2e/etc", ("/srv/adapters",), False),
    ("file://node1/srv/adapters/a", ("/srv/adapters",), False),
    ("file:///srv/adapters/a?x=1", ("/srv/adapters",), False),
    ("https://example.com/a.tgz", (), True),
])
def test_file_sources_only_under_allowed_node_directories(uri, allowed, ok):
    why = MA.file_source_refusal(uri, allowed)
    assert (why is None) == ok, why
    if not ok and not allowed:
        assert "disabled" in why and "--allow-host-path" in why


def test_admin_tokens_are_derived_from_the_pool_identity_and_the_key():
    p = pool_obj()
    t = pool_token(b"k" * 32, p)
    assert t == pool_token(b"k" * 32, pool_obj()) and len(t) == 64
    other = [pool_token(b"x" * 32, p)]
    for field, value in (("uid", "other-uid"), ("name", "vision2"), ("namespace", "team-b")):
        q = pool_obj()
        q["metadata"][field] = value
        other.append(pool_token(b"k" * 32, q))
    assert t not in other and len(set(other)) == len(other)


# ------------------------------------------------------------------ issue 23: the engine's port

@pytest.mark.parametrize("arg", ["--host", "--host=0.0.0.0", "--port", "--port=9000", "--uds"])
def test_a_pool_cannot_open_its_engine_through_extra_args(arg):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=f"engine.extraArgs may not set {arg.split('=')[0]}"):
        pool(engine={"extraArgs": ["--enforce-eager", arg, "0.0.0.0"]})


def test_the_engine_listens_on_the_pods_loopback_only_and_its_probes_reach_it_there(tmp_path):
    """The engine container's own command line (run as `vlmpool sim`, which takes vLLM's flags, as the
    process kubelet runs it) listens on 127.0.0.1 only: another address of the same host (127.0.0.2
    here; in a cluster the pod IP) is refused. Its exec probes, run as the kubelet runs them, pass on
    the live engine and fail once it is gone."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dep = MP.deployment(pool(engine={"port": port}))
    eng = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "engine")
    assert "ports" not in eng
    vlmpool = str(Path(sys.executable).with_name("vlmpool"))
    log = (tmp_path / "engine.log").open("w")
    # the simulator image's ENTRYPOINT (`vlmpool sim --host 0.0.0.0`) then the container's args
    proc = subprocess.Popen([vlmpool, "sim", "--host", "0.0.0.0", *eng["args"]], stdout=log, stderr=subprocess.STDOUT)

    def probe(kind: str) -> int:
        return subprocess.run(eng[kind]["exec"]["command"], capture_output=True, timeout=30).returncode

    try:
        deadline = time.monotonic() + 60
        while probe("startupProbe") != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "engine.log").read_text()
            time.sleep(0.3)
        assert probe("readinessProbe") == 0 and probe("livenessProbe") == 0
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.settimeout(5)
            s.connect(("127.0.0.2", port))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert probe("livenessProbe") != 0


@pytest.mark.parametrize("doc, why", [
    ('{"httpFrom": []}', "adminFrom must name the operator's pods"),
    ('{"adminFrom": [{}], "egress": []}', "keys adminFrom, httpFrom, extraIngress only"),
    ('{"adminFrom": "everyone"}', "adminFrom must be a list of objects"),
    ("not json", "not JSON"),
])
def test_the_network_policy_setting_is_refused_when_it_would_shut_out_the_operator_or_is_malformed(doc, why):
    from vlmpool.controller.cli import parse_network_policy

    with pytest.raises(ValueError, match=why):
        parse_network_policy(doc)
