"""The process kubelet on the real control plane: pods of real controllers (Deployment, Job) run as
local processes on their own loopback addresses, with volumes, env, probes, restarts and
termination messages reported the way the kubelet reports them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from vlmpool.testing.waiting import wait_for


def get_json(kubectl, *args):
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def pods(kubectl, ns, selector):
    return get_json(kubectl, "pods", "-n", ns, "-l", selector)["items"]


def apply(kubectl, ns, obj):
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def test_node_is_registered_ready_with_gpus(kubectl, local_node):
    node = get_json(kubectl, "node", local_node.node_config.name)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    lease = get_json(kubectl, "lease", "-n", "kube-node-lease", local_node.node_config.name)
    assert lease["spec"]["holderIdentity"] == local_node.node_config.name


def test_deployment_pods_run_as_processes_with_volumes_env_and_probes(kubectl, local_node, namespace):
    kubectl("create", "secret", "generic", "cfg", "-n", namespace, "--from-literal=token=s3cret",
            "--from-literal=greeting=hello")
    script = ('cat /etc/cfg/token > /srv/web/token.txt; echo "$GREETING" > /srv/web/env.txt; '
              'echo "$MY_IP" > /srv/web/ip.txt; '
              '(echo x > /etc/cfg/new && echo rw > /srv/web/ro.txt) || echo ro > /srv/web/ro.txt; '
              'exec python3 -m http.server 8080 --bind 0.0.0.0 --directory /srv/web')
    apply(kubectl, namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                     "containers": [{
                         "name": "web", "image": "python:3.11-slim", "command": ["sh", "-c", script],
                         "ports": [{"name": "http", "containerPort": 8080}],
                         "env": [{"name": "GREETING",
                                  "valueFrom": {"secretKeyRef": {"name": "cfg", "key": "greeting"}}},
                                 {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                         "readinessProbe": {"httpGet": {"path": "/env.txt", "port": "http"}, "periodSeconds": 1},
                         "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
                                          {"name": "work", "mountPath": "/srv/web"}]}],
                     "volumes": [{"name": "cfg", "secret": {"secretName": "cfg"}},
                                 {"name": "work", "emptyDir": {}}]}}}})
    kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=90s", timeout=100)
    items = pods(kubectl, namespace, "app=web")
    assert len(items) == 2
    ips = {p["status"]["podIP"] for p in items}
    assert len(ips) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    for p in items:
        ip = p["status"]["podIP"]
        assert {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"] == "True"

        def fetch(name, ip=ip):
            with urllib.request.urlopen(f"http://{ip}:8080/{name}", timeout=5) as r:
                return r.read().decode().strip()
        assert fetch("token.txt") == "s3cret"
        assert fetch("env.txt") == "hello"
        assert fetch("ip.txt") == ip
        assert fetch("ro.txt") == "ro"  # the secret volume is mounted read-only
    # (No Service endpoints: Kubernetes refuses loopback addresses in EndpointSlices.)


def test_deleting_a_pod_stops_its_process_and_the_replicaset_replaces_it(kubectl, local_node, namespace):
    apply(kubectl, namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "sleeper"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "sleeper"}},
                 "template": {"metadata": {"labels": {"app": "sleeper"}}, "spec": {
                     "terminationGracePeriodSeconds": 5,
                     "containers": [{"name": "s", "image": "busybox", "command": ["sleep", "3600"]}]}}}})
    kubectl("rollout", "status", "deployment/sleeper", "-n", namespace, "--timeout=60s", timeout=70)
    pod = pods(kubectl, namespace, "app=sleeper")[0]
    pid = int(pod["status"]["containerStatuses"][0]["containerID"].split("://")[1])
    os.kill(pid, 0)  # the process exists
    kubectl("delete", "pod", pod["metadata"]["name"], "-n", namespace, "--wait=true", timeout=60)

    def gone():
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
    wait_for(gone, 20, what="container process to exit")
    wait_for(lambda: [p for p in pods(kubectl, namespace, "app=sleeper")
                      if p["metadata"]["name"] != pod["metadata"]["name"]
                      and p.get("status", {}).get("phase") == "Running"], 60, what="replacement pod")


def _job(name, script, backoff=0):
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script],
                                "terminationMessagePolicy": "FallbackToLogsOnError"}]}}}}


def test_jobs_complete_or_fail_with_termination_messages(kubectl, local_node, namespace):
    apply(kubectl, namespace, _job("ok", 'printf \'{"ok": true, "version": "abc"}\' > /dev/termination-log'))
    apply(kubectl, namespace, _job("bad", "echo something broke; exit 3"))
    kubectl("wait", "--for=condition=Complete", "job/ok", "-n", namespace, "--timeout=60s", timeout=70)
    kubectl("wait", "--for=condition=Failed", "job/bad", "-n", namespace, "--timeout=60s", timeout=70)
    ok_pod = pods(kubectl, namespace, "job-name=ok")[0]
    term = ok_pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert json.loads(term["message"]) == {"ok": True, "version": "abc"}
    assert ok_pod["status"]["phase"] == "Succeeded"
    bad_pod = pods(kubectl, namespace, "job-name=bad")[0]
    term = bad_pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    assert "something broke" in term["message"]  # FallbackToLogsOnError
    assert bad_pod["status"]["phase"] == "Failed"


def test_crashing_container_restarts_with_backoff_and_liveness_kills(kubectl, local_node, namespace):
    apply(kubectl, namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crash"},
        "spec": {"restartPolicy": "Always", "containers": [
            {"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 1"]}]}})
    apply(kubectl, namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unlive"},
        "spec": {"restartPolicy": "Always", "containers": [
            {"name": "c", "image": "busybox", "command": ["sleep", "3600"],
             "livenessProbe": {"tcpSocket": {"port": 9}, "periodSeconds": 1, "failureThreshold": 2}}]}})

    def status(name):
        return get_json(kubectl, "pod", name, "-n", namespace)["status"].get("containerStatuses", [{}])[0]
    cs = wait_for(lambda: (s := status("crash")).get("restartCount", 0) >= 2 and s, 60, what="2 restarts")
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    cs = wait_for(lambda: (s := status("unlive")).get("restartCount", 0) >= 1 and s, 60, what="liveness restart")
    assert cs["lastState"]["terminated"]["exitCode"] == 143  # SIGTERM'd after the failed probe


def test_pvc_is_provisioned_and_mounted(kubectl, local_node, namespace):
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
                               "spec": {"accessModes": ["ReadWriteMany"],
                                        "resources": {"requests": {"storage": "1Gi"}}}})
    apply(kubectl, namespace, _job("writer", "echo persisted > /data/file.txt") |
          {"spec": {"backoffLimit": 0, "template": {"spec": {
              "restartPolicy": "Never",
              "containers": [{"name": "main", "image": "busybox",
                              "command": ["sh", "-c", "echo persisted > /data/file.txt"],
                              "volumeMounts": [{"name": "d", "mountPath": "/data"}]}],
              "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}}}})
    kubectl("wait", "--for=condition=Complete", "job/writer", "-n", namespace, "--timeout=60s", timeout=70)
    pvc = get_json(kubectl, "pvc", "data", "-n", namespace)
    assert pvc["status"]["phase"] == "Bound" and pvc["spec"]["storageClassName"] == "vlmpool-local"
    pv = get_json(kubectl, "pv", pvc["spec"]["volumeName"])
    with open(os.path.join(pv["spec"]["hostPath"]["path"], "file.txt")) as f:
        assert f.read().strip() == "persisted"


def test_pod_needing_more_gpus_than_the_node_has_stays_pending(kubectl, local_node, namespace):
    apply(kubectl, namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "greedy"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "60"],
                                 "resources": {"limits": {"nvidia.com/gpu": "3"}}}]}})

    def unschedulable():
        st = get_json(kubectl, "pod", "greedy", "-n", namespace).get("status", {})
        return [c for c in st.get("conditions") or [] if c.get("reason") == "Unschedulable"]
    cond = wait_for(unschedulable, 30, what="Unschedulable")[0]
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert not get_json(kubectl, "pod", "greedy", "-n", namespace)["spec"].get("nodeName")


def test_a_volume_over_a_directory_holding_other_sources_hides_nothing(kubectl, local_node, namespace):
    """An emptyDir at /tmp must not hide the other volumes' sources (the kubelet's state may live
    under /tmp), and a volume nested in another is mounted after its parent. The host's /tmp is not
    the pod's: what is there stays visible here, and what the pod writes lands in its volume only."""
    host_marker = Path(tempfile.mkdtemp(prefix="vlmpool-host-tmp-")) / "marker"
    host_marker.write_text("host")
    kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=greeting=hi")
    apply(kubectl, namespace, _job("nested", "cat /tmp/cfg/greeting > /tmp/out/result && ls /tmp >/dev/null") |
          {"spec": {"backoffLimit": 0, "template": {"spec": {
              "restartPolicy": "Never",
              "containers": [{"name": "main", "image": "busybox",
                              "command": ["sh", "-c", "cat /tmp/cfg/greeting > /tmp/out/result; "
                                          "cat /tmp/cfg/greeting > /dev/termination-log"],
                              "volumeMounts": [{"name": "cfg", "mountPath": "/tmp/cfg"},
                                               {"name": "scratch", "mountPath": "/tmp"},
                                               {"name": "out", "mountPath": "/tmp/out"}]}],
              "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}},
                          {"name": "scratch", "emptyDir": {}},
                          {"name": "out", "emptyDir": {}}]}}}})
    kubectl("wait", "--for=condition=Complete", "job/nested", "-n", namespace, "--timeout=60s", timeout=70)
    pod = pods(kubectl, namespace, "job-name=nested")[0]
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "hi"
    # The pod's write went to its `out` emptyDir, not to the host's /tmp/out (an empty mount point here).
    written = list(local_node.state_dir.glob(f"pods/{namespace}_{pod['metadata']['name']}_*/volumes/out/result"))
    assert [w.read_text() for w in written] == ["hi"], written
    assert not Path("/tmp/out/result").exists(), "the pod wrote into the host's /tmp"
    assert host_marker.read_text() == "host"  # the host's /tmp is untouched
    shutil.rmtree(host_marker.parent)


HOOK_SERVER = """
import http.server, signal, time
signal.signal(signal.SIGTERM, lambda *_: signal.alarm(3))  # serves the hook a while after its own SIGTERM
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        open('/w/hook-start', 'w').write(repr(time.time()))
        time.sleep(1.0)
        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')
http.server.HTTPServer(('0.0.0.0', 8080), H).serve_forever()
"""
TERM_WRITER = """
import signal, sys, time
def term(*_):
    open('/w/term', 'w').write(repr(time.time())); sys.exit(0)
signal.signal(signal.SIGTERM, term)
time.sleep(3600)
"""


def test_a_prestop_http_hook_runs_before_sigterm(kubectl, local_node, namespace, tmp_path):
    """As the kubelet: a deleted pod's container with a preStop httpGet gets SIGTERM only after the hook
    answered (vlmpool's engine waits for its proxy's drain this way). The witnesses live on a hostPath: an
    emptyDir goes with the pod, possibly before `kubectl delete --wait` returns."""
    workdir = tmp_path / "w"
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hooked"}, "spec": {
        "terminationGracePeriodSeconds": 20,
        "containers": [
            {"name": "web", "image": "python:3.11-slim", "command": ["python3", "-c", HOOK_SERVER],
             "volumeMounts": [{"name": "w", "mountPath": "/w"}]},
            {"name": "victim", "image": "python:3.11-slim", "command": ["python3", "-c", TERM_WRITER],
             "lifecycle": {"preStop": {"httpGet": {"path": "/drainz", "port": 8080}}},
             "volumeMounts": [{"name": "w", "mountPath": "/w"}]}],
        "volumes": [{"name": "w", "hostPath": {"path": str(workdir), "type": "DirectoryOrCreate"}}]}})
    kubectl("wait", "pod/hooked", "-n", namespace, "--for=condition=Ready", "--timeout=60s", timeout=70)
    pod = get_json(kubectl, "pod", "hooked", "-n", namespace)
    kubectl("delete", "pod", "hooked", "-n", namespace, "--wait=true", timeout=60)
    assert pod["status"]["phase"] == "Running"
    hook, term = float((workdir / "hook-start").read_text()), float((workdir / "term").read_text())
    assert term >= hook + 1.0, (hook, term)  # SIGTERM after the hook's whole answer
