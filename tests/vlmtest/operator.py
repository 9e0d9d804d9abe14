"""Helpers of the operator tests on the real control plane.

There is no kubelet: the tests play it. For a pool pod they start the pod's two containers as real
local processes (`vlmpool sim` for the engine, `vlmpool proxy`) on a loopback address of their own,
with the container args the operator wrote into the pod spec, then bind the pod to a Node and report
it Running with that address as podIP. For a Job pod they run the container (the cleanup Job's
command really runs) or write what the patcher would have written, and report it terminated with a
termination message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from vlmpool.kube.client import JOBS, NODES, PODS, VLMADAPTERS, Conflict, KubeClient
from vlmpool.testing.adapters import write_lora
from vlmpool.testing.waiting import wait_until

VLMPOOL = str(Path(sys.executable).parent / "vlmpool")
NODE = "vlmpool-test-node"
BASE = "Qwen/Qwen2.5-VL-3B-Instruct"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_block() -> str:
    """A random 127.a.b. prefix, so concurrent sessions do not share pod addresses."""
    return f"127.{random.randint(10, 250)}.{random.randint(1, 250)}."


# A small loadable LoRA for this suite's base model (shared maker: vlmpool.testing.adapters).
write_adapter = functools.partial(write_lora, base=BASE)


async def ensure_node(kube: KubeClient) -> None:
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}}}
    try:
        await kube.request("POST", NODES.path(), body=node)
    except Conflict:
        pass


async def bind(kube: KubeClient, pod: dict[str, Any]) -> None:
    if not (pod.get("spec") or {}).get("nodeName"):
        await kube.bind_pod(pod["metadata"]["name"], pod["metadata"]["namespace"], NODE)


async def report_running(kube: KubeClient, pod: dict[str, Any], ip: str, restarts: int = 0) -> dict[str, Any]:
    await bind(kube, pod)
    t = now()
    statuses = [{
        "name": c["name"], "ready": True, "started": True, "restartCount": restarts, "image": c["image"],
        "imageID": "", "containerID": f"fake://{pod['metadata']['uid']}/{c['name']}/{restarts}",
        "state": {"running": {"startedAt": t}},
    } for c in pod["spec"]["containers"]]
    conds = [{"type": k, "status": "True", "lastTransitionTime": t}
             for k in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
    return await kube.patch(PODS, pod["metadata"]["name"], {"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1", "startTime": t,
        "conditions": conds, "containerStatuses": statuses}}, pod["metadata"]["namespace"], subresource="status")


async def report_terminated(kube: KubeClient, pod: dict[str, Any], exit_code: int, message: str = "") -> dict[str, Any]:
    await bind(kube, pod)
    t = now()
    c = pod["spec"]["containers"][0]
    term = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "startedAt": t,
            "finishedAt": t, "containerID": f"fake://{pod['metadata']['uid']}/{c['name']}"}
    if message:
        term["message"] = message
    phase = "Succeeded" if exit_code == 0 else "Failed"
    return await kube.patch(PODS, pod["metadata"]["name"], {"status": {
        "phase": phase, "podIP": "127.0.0.1", "hostIP": "127.0.0.1", "startTime": t,
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                       {"type": "Ready", "status": "False", "lastTransitionTime": t, "reason": "PodCompleted"}],
        "containerStatuses": [{"name": c["name"], "ready": False, "started": False, "restartCount": 0,
                               "image": c["image"], "imageID": "", "state": {"terminated": term}}]}},
        pod["metadata"]["namespace"], subresource="status")


async def job_pods(kube: KubeClient, ns: str, job: str) -> list[dict[str, Any]]:
    return await kube.list(PODS, ns, label_selector=f"batch.kubernetes.io/job-name={job}")


async def wait_job_pod(kube: KubeClient, ns: str, job: str) -> dict[str, Any]:
    async def pending_pod():
        pods = [p for p in await job_pods(kube, ns, job) if (p.get("status") or {}).get("phase") in (None, "Pending")]
        return pods[0] if pods else None
    return await wait_until(pending_pod, what=f"a pod of Job {job}")


async def wait_job_condition(kube: KubeClient, ns: str, job: str, cond: str) -> dict[str, Any]:
    async def done():
        j = await kube.get(JOBS, job, ns)
        conditions = (j.get("status") or {}).get("conditions") or []
        return j if any(c["type"] == cond and c["status"] == "True" for c in conditions) else None
    return await wait_until(done, what=f"Job {job} {cond}")


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


@dataclass
class PodProcesses:
    """The two containers of one pool pod, as real processes on one loopback address."""

    pod: str
    ip: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    envs: list[dict[str, str]] = field(default_factory=list)

    def restart(self, index: int) -> None:
        """Kill container `index` (0 engine, 1 proxy) and start it again with the same args (a container
        restart the kubelet did not report yet)."""
        old = self.procs[index]
        old.kill()
        old.wait()
        self.procs[index] = subprocess.Popen(old.args, stdout=self.logs[index].open("a"), stderr=subprocess.STDOUT,
                                             env=self.envs[index])

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-2000:] for p in self.logs if p.exists())


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


async def start_pod_processes(pod: dict[str, Any], ip: str, token: str, workdir: Path) -> PodProcesses:
    """Run the pod's engine container as `vlmpool sim` with the engine args the operator wrote, and
    its proxy container with its own args, both bound to `ip`."""
    name = pod["metadata"]["name"]
    engine = container(pod, "engine")
    proxy = container(pod, "proxy")
    env_engine = {e["name"]: e.get("value", "") for e in engine.get("env") or []}
    token_file = workdir / f"{name}.token"
    token_file.write_text(token)
    out = PodProcesses(name, ip)
    eng_log, px_log = workdir / f"{name}.engine.log", workdir / f"{name}.proxy.log"
    out.logs += [eng_log, px_log]
    env = {**os.environ, **env_engine}
    out.procs.append(subprocess.Popen([VLMPOOL, "sim", *engine["args"], "--host", ip],
                                      stdout=eng_log.open("w"), stderr=subprocess.STDOUT, env=env))
    out.envs.append(env)
    px_args = [a.replace("127.0.0.1", ip) for a in proxy["args"]]
    px_env = {e["name"]: e.get("value", "") for e in proxy.get("env") or [] if "value" in e}
    px_env["VLMPOOL_ADMIN_TOKEN_FILE"] = str(token_file)  # the Secret volume, mounted
    out.procs.append(subprocess.Popen([proxy["command"][0].replace("vlmpool", VLMPOOL), *px_args, "--host", ip],
                                      stdout=px_log.open("w"), stderr=subprocess.STDOUT,
                                      env={**os.environ, **px_env}))
    out.envs.append({**os.environ, **px_env})
    port = int(_arg(proxy["args"], "--port"))
    eport = int(_arg(engine["args"], "--port"))

    async def up():
        for p in out.procs:
            if p.poll() is not None:
                raise AssertionError(f"a container of {name} exited: {out.tail()}")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{ip}:{eport}/health") as r1, s.get(f"http://{ip}:{port}/healthz") as r2:
                return r1.status == 200 and r2.status == 200
    try:
        await wait_until(up, timeout=60, what=f"pod {name}'s processes")
    except BaseException:
        out.stop()
        raise
    return out


async def admin_state(ip: str, admin_port: int, token: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{ip}:{admin_port}/admin/v1/state",
                         headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def run_cleanup_pod(kube: KubeClient, pod: dict[str, Any]) -> int:
    """Run the cleanup Job's container command for real (its volume is the same directory here)."""
    c = pod["spec"]["containers"][0]
    cmd = [VLMPOOL if c["command"][0] == "vlmpool" else c["command"][0], *c["command"][1:], *(c.get("args") or [])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    await report_terminated(kube, pod, res.returncode, (res.stdout + res.stderr)[-2000:])
    return res.returncode


@dataclass
class OperatorProcess:
    """`vlmpool operator` as a subprocess under a given kubeconfig (namespace "*": all namespaces)."""

    kubeconfig: Path
    namespace: str
    adapter_root: Path
    log_path: Path
    resync: float = 3.0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    metrics_port: int = 0
    # file:// sources of the tests live under the temp dir (the operator refuses them by default).
    host_paths: list[str] = field(default_factory=lambda: [tempfile.gettempdir()])

    async def start(self) -> OperatorProcess:
        self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [VLMPOOL, "operator", "--kubeconfig", str(self.kubeconfig),
             *(["--all-namespaces"] if self.namespace == "*" else ["--namespace", self.namespace]),
             "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port),
             "--resync-seconds", str(self.resync), "--push-timeout", "5", "--adapter-root", str(self.adapter_root),
             "--log-level", "DEBUG", *(a for d in self.host_paths for a in ("--allow-host-path", d)),
             *self.extra_args],
            stdout=self.log_path.open("a"), stderr=subprocess.STDOUT,
            # One key for every operator of the suite (restarts, leader and followers derive the same tokens).
            env={**os.environ, "VLMPOOL_TOKEN_KEY": "vlmpool-operator-tests-token-key"})

        async def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited {self.proc.returncode}: {self.tail()}")
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"http://127.0.0.1:{self.metrics_port}/readyz") as r:
                        return r.status == 200
            except aiohttp.ClientError:
                return False
        await wait_until(ready, timeout=60, what="the operator's /readyz")
        return self

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
                return await r.text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no release of anything it holds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, n: int = 6000) -> str:
        return self.log_path.read_text()[-n:] if self.log_path.exists() else ""


async def stop_operators(procs: list[OperatorProcess], kube: KubeClient, namespace: str) -> None:
    """Teardown of the operator fixtures: stop the operators, then drop the finalizers of the adapters
    left behind so the namespace can go."""
    for op in procs:
        op.stop()
    for a in await kube.list(VLMADAPTERS, namespace):
        if a["metadata"].get("finalizers"):
            await kube.patch(VLMADAPTERS, a["metadata"]["name"], {"metadata": {"finalizers": None}}, namespace)


async def run_job_pod(kube: KubeClient, pod: dict[str, Any], workdir: Path, timeout: float = 300) -> int:
    """Run a Job pod's container for real, as a kubelet would: its command and args as a local
    process (volumes are the same local directories here), the termination message file at a local
    path, and FallbackToLogsOnError: an empty message after a failure becomes the log tail."""
    c = pod["spec"]["containers"][0]
    term_path = c.get("terminationMessagePath", "/dev/termination-log")
    local_term = workdir / f"{pod['metadata']['name']}.termination-log"
    local_term.write_text("")
    argv = [*c.get("command", []), *c.get("args", [])]
    argv = [str(local_term) if a == term_path else a for a in argv]
    argv[0] = VLMPOOL if argv[0] == "vlmpool" else (sys.executable if argv[0] == "python3" else argv[0])
    env = {**os.environ, **{e["name"]: e.get("value", "") for e in c.get("env") or [] if "value" in e}}
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    message = local_term.read_text()[:4096]
    if not message and proc.returncode != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        message = out.decode(errors="replace")[-2048:]
    await report_terminated(kube, pod, proc.returncode or 0, message)
    return proc.returncode or 0


def counter(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample of the operator's Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def after_more(op: OperatorProcess, name: str, by: float, timeout: float = 60, **labels: str) -> None:
    """Wait until the operator's counter `name` (with `labels`) grew by `by` from now: the operator has
    reconsidered things that often, so what it did not do by then it does not do (absence proved by a
    counter, not by a sleep)."""
    start = counter(await op.metrics(), name, **labels)

    async def grown():
        return counter(await op.metrics(), name, **labels) >= start + by
    await wait_until(grown, timeout=timeout, what=f"{name}{labels} to grow by {by}")
