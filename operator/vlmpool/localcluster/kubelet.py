"""A process kubelet: one Node whose pods run as local processes.

It registers a Node (with a fake `nvidia.com/gpu` capacity) and keeps its Lease fresh, binds pending
pods that fit, and runs each container of a bound pod as a local process (see runtime.py) on the
pod's own loopback address. It reports what a kubelet reports: pod IP, phase, conditions, container
states with restart counts, exit codes and termination messages, so the real Deployment, ReplicaSet
and Job controllers of kube-controller-manager drive the pods. Probes (startup, readiness, liveness;
httpGet, tcpSocket, exec) and restart policies with back-off behave as the kubelet's do.

Volumes are local directories: emptyDir, secret, configMap, downwardAPI, projected (service-account
tokens from the TokenRequest API included), hostPath, and PVCs bound by the local provisioner
(provisioner.py).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from vlmpool.kube.client import PODS, ApiError, Conflict, KubeClient, NotFound, Resource
from vlmpool.localcluster.runtime import (
    Mount,
    ProcessSpec,
    RuntimeRefusal,
    resolve_command,
    rewrite_loopback,
)
from vlmpool.pins import K8S_VERSION

log = logging.getLogger("vlmpool.kubelet")

NODES = Resource("", "v1", "nodes", namespaced=False)
LEASES = Resource("coordination.k8s.io", "v1", "leases")
SECRETS = Resource("", "v1", "secrets")
CONFIGMAPS = Resource("", "v1", "configmaps")
PVCS = Resource("", "v1", "persistentvolumeclaims")
PVS = Resource("", "v1", "persistentvolumes", namespaced=False)
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts")

TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_quantity(q: str | int | float) -> float:
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for suffix, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    return float(s)


@dataclass
class NodeConfig:
    name: str = "vlmpool-local"
    gpus: int = 8
    cpu: str = "16"
    memory: str = "64Gi"
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    restart_backoff_base: float = 1.0      # the real kubelet starts at 10 s; local pods restart fast
    restart_backoff_cap: float = 60.0
    sync_interval: float = 0.5
    lease_seconds: int = 40


class IPAM:
    """Loopback addresses for pods: 127.B.1.1 .. 127.B.254.254 (all of 127/8 is loopback on Linux).

    B is drawn at random once per state directory (and kept there), so two local nodes on one
    machine (a test suite's and `vlmpool dev`'s) never hand out the same address."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self._by_uid: dict[str, str] = {}
        self.block = self._block(state_dir)

    @staticmethod
    def _block(state_dir: Path | None) -> int:
        import random

        path = state_dir / "ipam-block" if state_dir else None
        if path is not None and path.exists():
            return int(path.read_text().strip())
        block = random.randint(1, 254)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{block}\n")
        return block

    def allocate(self, uid: str, preferred: str | None = None) -> str:
        if uid in self._by_uid:
            return self._by_uid[uid]
        used = set(self._by_uid.values())
        if preferred and preferred.startswith(f"127.{self.block}.") and preferred not in used:
            self._by_uid[uid] = preferred
            return preferred
        for third in range(1, 255):
            for fourth in range(1, 255):
                ip = f"127.{self.block}.{third}.{fourth}"
                if ip not in used:
                    self._by_uid[uid] = ip
                    return ip
        raise RuntimeError("no loopback address left for a pod")

    def release(self, uid: str) -> None:
        self._by_uid.pop(uid, None)


# --------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------

def _port_number(container: dict, port: Any) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"no container port named {port!r}")


async def run_probe(probe: dict, container: dict, pod_ip: str, session: aiohttp.ClientSession,
                    env: dict[str, str]) -> tuple[bool, str]:
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            hg = probe["httpGet"]
            port = _port_number(container, hg.get("port"))
            host = hg.get("host") or pod_ip
            scheme = (hg.get("scheme") or "HTTP").lower()
            path = hg.get("path") or "/"
            headers = {h["name"]: h["value"] for h in hg.get("httpHeaders") or []}
            async with session.get(f"{scheme}://{host}:{port}{path}", headers=headers, ssl=False,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.read()
                return 200 <= r.status < 400, f"HTTP probe failed with statuscode: {r.status}"
        if "tcpSocket" in probe:
            port = _port_number(container, probe["tcpSocket"].get("port"))
            _, writer = await asyncio.wait_for(asyncio.open_connection(pod_ip, port), timeout)
            writer.close()
            return True, ""
        if "exec" in probe:
            # inside the pod, loopback is the pod itself (as for the containers' own arguments)
            cmd = [rewrite_loopback(a, pod_ip) for a in probe["exec"].get("command") or []]
            proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
            return proc.returncode == 0, out.decode(errors="replace")[-500:]
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        return False, f"probe error: {type(e).__name__}: {e}"
    return True, ""


@dataclass
class ProbeState:
    probe: dict | None
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0
    result: bool | None = None  # None: not yet decided

    def due(self, started_at: float, t: float) -> bool:
        if self.probe is None:
            return False
        if t < started_at + float(self.probe.get("initialDelaySeconds", 0)):
            return False
        return t >= self.next_at

    def record(self, ok: bool, t: float) -> bool | None:
        """Count one result; returns the new decided state when it changes."""
        p = self.probe or {}
        self.next_at = t + float(p.get("periodSeconds", 10))
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(p.get("successThreshold", 1)) and self.result is not True:
                self.result = True
                return True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= int(p.get("failureThreshold", 3)) and self.result is not False:
                self.result = False
                return False
        return None


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------

@dataclass
class ContainerRun:
    spec: dict
    init: bool = False
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    started_ts: str | None = None
    restart_count: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    next_start: float = 0.0
    startup: ProbeState = field(default_factory=lambda: ProbeState(None))
    readiness: ProbeState = field(default_factory=lambda: ProbeState(None))
    liveness: ProbeState = field(default_factory=lambda: ProbeState(None))
    killing: bool = False
    kill_reason: str | None = None
    done: bool = False  # terminated and will not restart

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self) -> dict:
        out = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.proc is not None:
            out["containerID"] = f"process://{self.proc.pid}"
        return out


class PodWorker:
    """Runs one pod until it is deleted."""

    def __init__(self, kubelet: ProcessKubelet, pod: dict, ip: str):
        self.k = kubelet
        self.pod = pod
        self.uid = pod["metadata"]["uid"]
        self.ns = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.ip = ip
        self.dir = kubelet.state_dir / "pods" / f"{self.ns}_{self.name}_{self.uid[:8]}"
        spec = pod["spec"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.inits = [ContainerRun(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [ContainerRun(c) for c in spec.get("containers") or []]
        for c in self.containers:
            c.startup = ProbeState(c.spec.get("startupProbe"))
            c.readiness = ProbeState(c.spec.get("readinessProbe"))
            c.liveness = ProbeState(c.spec.get("livenessProbe"))
        self.volumes: dict[str, Path] = {}
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task | None = None
        # The loop keeps only weak references to tasks: probe-triggered kills live here until done.
        self._kills: set[asyncio.Task] = set()
        self.start_time = pod.get("status", {}).get("startTime") or now()
        self.phase = "Pending"
        self.pod_error: tuple[str, str] | None = None
        self._last_status: str = ""
        self.initialized = not self.inits

    # ---- volumes ---------------------------------------------------------------------------------
    async def _secret_data(self, name: str, optional: bool = False) -> dict[str, bytes]:
        try:
            obj = await self.k.kube.get(SECRETS, name, self.ns)
        except NotFound:
            if optional:
                return {}
            raise
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    async def _configmap_data(self, name: str, optional: bool = False) -> dict[str, bytes]:
        try:
            obj = await self.k.kube.get(CONFIGMAPS, name, self.ns)
        except NotFound:
            if optional:
                return {}
            raise
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        if path == "metadata.name":
            return meta["name"]
        if path == "metadata.namespace":
            return meta["namespace"]
        if path == "metadata.uid":
            return meta["uid"]
        if path.startswith("metadata.labels['"):
            return (meta.get("labels") or {}).get(path[len("metadata.labels['"):-2], "")
        if path.startswith("metadata.annotations['"):
            return (meta.get("annotations") or {}).get(path[len("metadata.annotations['"):-2], "")
        if path in ("status.podIP", "status.podIPs"):
            return self.ip
        if path == "status.hostIP":
            return "127.0.0.1"
        if path == "spec.nodeName":
            return self.k.node.name
        if path == "spec.serviceAccountName":
            return self.pod["spec"].get("serviceAccountName", "default")
        raise ValueError(f"unsupported fieldRef {path}")

    @staticmethod
    def _write_files(target: Path, files: dict[str, bytes], items: list[dict] | None, mode: int | None) -> None:
        target.mkdir(parents=True, exist_ok=True)
        chosen = {i["key"]: i.get("path", i["key"]) for i in items} if items else {k: k for k in files}
        for key, rel in chosen.items():
            if key not in files:
                continue
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_bytes(files[key])
            os.chmod(tmp, mode if mode is not None else 0o644)
            os.replace(tmp, dest)

    async def _service_account_token(self, source: dict) -> bytes:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body: dict[str, Any] = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [source["audience"]] if source.get("audience") else None,
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid}}}
        if body["spec"]["audiences"] is None:
            del body["spec"]["audiences"]
        out = await self.k.kube.request("POST", SERVICEACCOUNTS.path(self.ns, sa, "token"), body=body)
        return out["status"]["token"].encode()

    async def prepare_volumes(self) -> None:
        vol_root = self.dir / "volumes"
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            target = vol_root / name
            if "emptyDir" in vol:
                target.mkdir(parents=True, exist_ok=True)
            elif "secret" in vol:
                s = vol["secret"]
                data = await self._secret_data(s["secretName"], s.get("optional", False))
                self._write_files(target, data, s.get("items"), s.get("defaultMode"))
            elif "configMap" in vol:
                c = vol["configMap"]
                data = await self._configmap_data(c["name"], c.get("optional", False))
                self._write_files(target, data, c.get("items"), c.get("defaultMode"))
            elif "downwardAPI" in vol:
                files = {i["path"]: self._field(i["fieldRef"]["fieldPath"]).encode()
                         for i in vol["downwardAPI"].get("items") or [] if "fieldRef" in i}
                self._write_files(target, files, None, vol["downwardAPI"].get("defaultMode"))
            elif "projected" in vol:
                target.mkdir(parents=True, exist_ok=True)
                mode = vol["projected"].get("defaultMode")
                for src in vol["projected"].get("sources") or []:
                    if "serviceAccountToken" in src:
                        sat = src["serviceAccountToken"]
                        self._write_files(target, {sat["path"]: await self._service_account_token(sat)}, None, mode)
                    elif "configMap" in src:
                        c = src["configMap"]
                        self._write_files(target, await self._configmap_data(c["name"], c.get("optional", False)),
                                          c.get("items"), mode)
                    elif "secret" in src:
                        s = src["secret"]
                        self._write_files(target, await self._secret_data(s["name"], s.get("optional", False)),
                                          s.get("items"), mode)
                    elif "downwardAPI" in src:
                        files = {i["path"]: self._field(i["fieldRef"]["fieldPath"]).encode()
                                 for i in src["downwardAPI"].get("items") or [] if "fieldRef" in i}
                        self._write_files(target, files, None, mode)
            elif "hostPath" in vol:
                target = Path(vol["hostPath"]["path"])
                if vol["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                    target.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in vol:
                target = await self._claim_path(vol["persistentVolumeClaim"]["claimName"])
            else:
                raise RuntimeRefusal("UnsupportedVolume", f"volume {name}: type not supported by the process kubelet")
            self.volumes[name] = target

    async def _claim_path(self, claim: str) -> Path:
        pvc = await self.k.kube.get(PVCS, claim, self.ns)
        pv_name = (pvc.get("spec") or {}).get("volumeName")
        if not pv_name or (pvc.get("status") or {}).get("phase") != "Bound":
            raise RuntimeRefusal("ContainerCreating", f"persistentvolumeclaim {claim!r} is not bound yet")
        pv = await self.k.kube.get(PVS, pv_name)
        spec = pv.get("spec") or {}
        path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
        if not path:
            raise RuntimeRefusal("UnsupportedVolume", f"persistentvolume {pv_name} is neither hostPath nor local")
        await asyncio.to_thread(Path(path).mkdir, parents=True, exist_ok=True)
        return Path(path)

    # ---- environment -----------------------------------------------------------------------------
    async def container_env(self, c: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                data = await self._secret_data(src["secretRef"]["name"], src["secretRef"].get("optional", False))
            else:
                data = await self._configmap_data(src["configMapRef"]["name"],
                                                  src["configMapRef"].get("optional", False))
            env.update({prefix + k: v.decode() for k, v in data.items()})
        for e in c.get("env") or []:
            if "valueFrom" not in e:
                env[e["name"]] = _expand(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[e["name"]] = self._field(vf["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                kind, ref = (("Secret", vf["secretKeyRef"]) if "secretKeyRef" in vf
                             else ("ConfigMap", vf["configMapKeyRef"]))
                read = self._secret_data if kind == "Secret" else self._configmap_data
                data = await read(ref["name"], ref.get("optional", False))
                if ref["key"] in data:
                    env[e["name"]] = data[ref["key"]].decode()
                elif not ref.get("optional"):
                    raise RuntimeRefusal("CreateContainerConfigError",
                                         f"couldn't find key {ref['key']} in {kind} {self.ns}/{ref['name']}")
            elif "resourceFieldRef" in vf:
                env[e["name"]] = "0"
        env = {k: rewrite_loopback(v, self.ip) for k, v in env.items()}
        base = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(self.dir / "home"),
            "HOSTNAME": self.name,
            "PYTHONUNBUFFERED": "1",
            "VLMPOOL_BIND_HOST": self.ip,
            "KUBERNETES_SERVICE_HOST": self.k.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.k.api_port),
        }
        for key in ("LANG", "LC_ALL", "VIRTUAL_ENV", "XDG_CACHE_HOME", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            if key in os.environ:
                base[key] = os.environ[key]
        base.update(env)
        (self.dir / "home").mkdir(parents=True, exist_ok=True)
        return base

    def container_mounts(self, c: dict) -> tuple[list[Mount], Path]:
        mounts: list[Mount] = []
        for vm in c.get("volumeMounts") or []:
            src = self.volumes.get(vm["name"])
            if src is None:
                raise RuntimeRefusal("CreateContainerConfigError", f"volumeMount {vm['name']} names no volume")
            if vm.get("subPath"):
                src = src / vm["subPath"]
                if not src.exists():
                    src.mkdir(parents=True, exist_ok=True)
            mounts.append(Mount(src, vm["mountPath"], bool(vm.get("readOnly")), is_file=src.is_file()))
        term = self.dir / f"{c['name']}.termination-log"
        term.write_bytes(b"")
        mounts.append(Mount(term, c.get("terminationMessagePath") or "/dev/termination-log", False, is_file=True))
        return mounts, term

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start_container(self, run: ContainerRun) -> None:
        c = run.spec
        try:
            env = await self.container_env(c)
            argv = [rewrite_loopback(a, self.ip) for a in resolve_command(c, self.ip)]
            mounts, term = self.container_mounts(c)
            pspec = ProcessSpec(argv=argv, env=env, cwd=c.get("workingDir"), mounts=mounts)
            pspec.prepare_mount_points()
        except RuntimeRefusal as e:
            run.state = {"waiting": {"reason": e.reason, "message": e.message}}
            run.next_start = time.monotonic() + 2.0
            return
        except ApiError as e:
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)[:500]}}
            run.next_start = time.monotonic() + 2.0
            return
        log_path = self.dir / f"{c['name']}.log"
        with await asyncio.to_thread(open, log_path, "ab") as fh:
            fh.write(f"--- {now()} start: {' '.join(argv)}\n".encode())
            fh.flush()
            run.proc = await asyncio.create_subprocess_exec(
                *pspec.launcher(), env=env, stdout=fh, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True, cwd="/")
        run.term_path = term  # type: ignore[attr-defined]
        run.log_path = log_path  # type: ignore[attr-defined]
        run.started_at = time.monotonic()
        run.started_ts = now()
        run.state = {"running": {"startedAt": run.started_ts}}
        run.killing, run.kill_reason = False, None
        run.ready = False
        run.started = run.startup.probe is None
        for p in (run.startup, run.readiness, run.liveness):
            p.successes = p.failures = 0
            p.result = None
            p.next_at = 0.0
        log.info("pod %s/%s: started container %s (pid %s) on %s", self.ns, self.name, c["name"],
                 run.proc.pid, self.ip)

    def _termination_message(self, run: ContainerRun, exit_code: int) -> str:
        msg = ""
        term = getattr(run, "term_path", None)
        if term is not None and term.exists():
            msg = term.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(errors="replace")
        if not msg.strip() and exit_code != 0 and \
                run.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lp = getattr(run, "log_path", None)
            if lp is not None and lp.exists():
                lines = lp.read_bytes().decode(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
                msg = "\n".join(lines)[-2048:]
        return msg

    def on_exit(self, run: ContainerRun, rc: int) -> None:
        exit_code = rc if rc >= 0 else 128 - rc  # killed by signal N -> 128+N
        reason = "Completed" if exit_code == 0 else "Error"
        if run.kill_reason:
            reason = "Error" if exit_code else "Completed"
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": run.started_ts,
                      "finishedAt": now(), "containerID": f"process://{run.proc.pid if run.proc else 0}"}
        message = self._termination_message(run, exit_code)
        if message:
            terminated["message"] = message
        run.ready = False
        policy = self.restart_policy
        restart = not self.stop_event.is_set() and (
            (policy == "Always" and not run.init) or (policy in ("Always", "OnFailure") and exit_code != 0))
        if run.init and exit_code == 0:
            restart = False
        log.info("pod %s/%s: container %s exited %s (restart=%s)", self.ns, self.name, run.name, exit_code, restart)
        if restart:
            run.last_state = {"terminated": terminated}
            ran_for = time.monotonic() - run.started_at
            if ran_for > 600:
                backoff_n = 0
            else:
                backoff_n = run.restart_count
            delay = min(self.k.node.restart_backoff_cap, self.k.node.restart_backoff_base * (2 ** backoff_n))
            run.next_start = time.monotonic() + delay
            run.restart_count += 1
            run.state = {"waiting": {"reason": "CrashLoopBackOff" if run.restart_count > 1 else "ContainerCreating",
                                     "message": f"back-off {delay:.0f}s restarting failed container={run.name} "
                                                f"pod={self.name}"}}
            run.proc = None
        else:
            run.state = {"terminated": terminated}
            run.done = True

    async def kill(self, run: ContainerRun, grace: float, reason: str) -> None:
        proc = run.proc
        if proc is None or proc.returncode is not None:
            return
        run.killing, run.kill_reason = True, reason
        t0 = time.monotonic()
        await self._pre_stop(run, grace)  # as the kubelet: the hook, then SIGTERM, within one grace period
        grace = max(0.0, grace - (time.monotonic() - t0))
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()

    async def _pre_stop(self, run: ContainerRun, grace: float) -> None:
        """The container's preStop hook (httpGet or sleep; exec is not run by this kubelet), bounded by the
        grace period; a failed hook is logged and the container stopped anyway, as the kubelet does."""
        hook = ((run.spec.get("lifecycle") or {}).get("preStop")) or {}
        try:
            if "sleep" in hook:
                await asyncio.sleep(min(grace, float(hook["sleep"].get("seconds", 0))))
            elif "httpGet" in hook and self.k.http is not None:
                ok, why = await run_probe({**hook, "timeoutSeconds": grace}, run.spec, self.ip, self.k.http, {})
                if not ok:
                    log.info("pod %s/%s: %s preStop hook failed: %s", self.ns, self.name, run.name, why)
        except (ValueError, TypeError) as e:
            log.info("pod %s/%s: %s preStop hook refused: %s", self.ns, self.name, run.name, e)

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a pod must never take the kubelet down
            log.exception("pod %s/%s worker failed", self.ns, self.name)
            self.pod_error = ("KubeletError", str(e)[:500])
            await self.push_status(force=True)

    async def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        await self.push_status(force=True)
        while not self.stop_event.is_set():
            try:
                await self.prepare_volumes()
                self.pod_error = None
                break
            except RuntimeRefusal as e:
                self.pod_error = (e.reason, e.message)
            except ApiError as e:
                self.pod_error = ("FailedMount", str(e)[:500])
            await self.push_status()
            await self._sleep(1.0)
        # init containers, in order
        for run in self.inits:
            while not self.stop_event.is_set() and not run.done:
                await self._step(run)
                await self.push_status()
                await self._sleep(0.2)
            if run.state.get("terminated", {}).get("exitCode", 1) != 0:
                self.phase = "Failed"
                await self.push_status(force=True)
                await self.stop_event.wait()
                return
        self.initialized = True
        while not self.stop_event.is_set():
            for run in self.containers:
                await self._step(run)
            await self._probe_all()
            self._update_phase()
            await self.push_status()
            if self.phase in ("Succeeded", "Failed"):
                break
            await self._sleep(0.2)
        await self.push_status(force=True)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop_event.wait(), seconds)
        except TimeoutError:
            pass

    async def _step(self, run: ContainerRun) -> None:
        if run.done:
            return
        if run.proc is None:
            if time.monotonic() >= run.next_start:
                await self.start_container(run)
            return
        if run.proc.returncode is not None:
            self.on_exit(run, run.proc.returncode)

    async def _probe_all(self) -> None:
        t = time.monotonic()
        jobs = []
        for run in self.containers:
            if run.proc is None or run.proc.returncode is not None or run.killing:
                continue
            if not run.started:
                if run.startup.due(run.started_at, t):
                    jobs.append((run, run.startup, "startup"))
                continue
            if run.liveness.due(run.started_at, t):
                jobs.append((run, run.liveness, "liveness"))
            if run.readiness.probe is None:
                run.ready = True
            elif run.readiness.due(run.started_at, t):
                jobs.append((run, run.readiness, "readiness"))
        http = self.k.http
        if not jobs or http is None:  # http is None only while the kubelet starts or stops
            return
        env = {"PATH": os.environ.get("PATH", "")}
        # due() is never true without a probe: the filter only narrows the type (zip(strict) below checks it).
        results = await asyncio.gather(*(run_probe(p.probe, r.spec, self.ip, http, env)
                                         for r, p, _ in jobs if p.probe is not None))
        t = time.monotonic()
        for (run, state, kind), (ok, why) in zip(jobs, results, strict=True):
            changed = state.record(ok, t)
            if kind == "startup":
                if changed is True:
                    run.started = True
                elif changed is False:
                    log.info("pod %s/%s: %s startup probe failed: %s", self.ns, self.name, run.name, why)
                    self._kill_soon(run, "StartupProbeFailed")
            elif kind == "liveness" and changed is False:
                log.info("pod %s/%s: %s liveness probe failed: %s", self.ns, self.name, run.name, why)
                self._kill_soon(run, "LivenessProbeFailed")
            elif kind == "readiness" and changed is not None:
                run.ready = changed

    def _kill_soon(self, run: ContainerRun, reason: str) -> None:
        task = asyncio.create_task(self.kill(run, self._grace(), reason))
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)

    def _grace(self) -> float:
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def _update_phase(self) -> None:
        runs = self.containers
        if all(r.done for r in runs):
            codes = [r.state.get("terminated", {}).get("exitCode", 1) for r in runs]
            self.phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        elif any(r.proc is not None or r.done for r in runs):
            self.phase = "Running"
        else:
            self.phase = "Pending"

    def status(self) -> dict:
        ready = self.phase == "Running" and all(r.ready for r in self.containers)
        cond_time = now()
        prev = {c["type"]: c for c in (self.pod.get("status") or {}).get("conditions") or []}

        def cond(ctype: str, value: bool, reason: str | None = None) -> dict:
            status = "True" if value else "False"
            old = prev.get(ctype)
            out = {"type": ctype, "status": status,
                   "lastTransitionTime": old["lastTransitionTime"] if old and old.get("status") == status
                   else cond_time, "lastProbeTime": None}
            if reason and not value:
                out["reason"] = reason
            return out

        conditions = [
            cond("PodScheduled", True),
            cond("Initialized", self.initialized, "ContainersNotInitialized"),
            cond("ContainersReady", ready, "ContainersNotReady"),
            cond("Ready", ready, "ContainersNotReady"),
        ]
        st: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": [r.status() for r in self.containers],
        }
        if self.inits:
            st["initContainerStatuses"] = [r.status() for r in self.inits]
        if self.pod_error:
            st["reason"], st["message"] = self.pod_error
            for cs in st["containerStatuses"]:
                if "waiting" in cs["state"]:
                    cs["state"] = {"waiting": {"reason": self.pod_error[0], "message": self.pod_error[1]}}
        return st

    async def push_status(self, force: bool = False) -> None:
        st = self.status()
        key = json.dumps({**st, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                               for c in st["conditions"]]}, sort_keys=True)
        if key == self._last_status and not force:
            return
        try:
            out = await self.k.kube.patch(PODS, self.name, {"status": st}, self.ns, subresource="status")
            self.pod = out
            self._last_status = key
        except NotFound:
            pass
        except ApiError as e:
            log.warning("pod %s/%s: status update failed: %s", self.ns, self.name, e)
        except aiohttp.ClientError as e:
            log.warning("pod %s/%s: status update failed: %s", self.ns, self.name, e)

    async def terminate(self) -> None:
        """Stop every container (SIGTERM, grace, SIGKILL), as for a deleted pod."""
        self.stop_event.set()
        grace = min(self._grace(), float(self.pod["metadata"].get("deletionGracePeriodSeconds") or self._grace()))
        await asyncio.gather(*(self.kill(r, grace, "Killing") for r in self.inits + self.containers))
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass


def _expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) expansion as the kubelet does for env values, args and commands."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and ")" in value[i:]:
            j = value.index(")", i)
            name = value[i + 2:j]
            out.append(env.get(name, value[i:j + 1]))
            i = j + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# The kubelet
# --------------------------------------------------------------------------------------------------

class ProcessKubelet:
    def __init__(self, kube: KubeClient, state_dir: Path, node: NodeConfig | None = None,
                 api_host: str = "127.0.0.1", api_port: int = 6443):
        self.kube = kube
        self.state_dir = Path(state_dir)
        self.node = node or NodeConfig()
        self.api_host, self.api_port = api_host, api_port
        self.ipam = IPAM(self.state_dir)
        self.workers: dict[str, PodWorker] = {}
        self.http: aiohttp.ClientSession | None = None  # probes
        self._stop = asyncio.Event()

    # ---- node -------------------------------------------------------------------------------------
    def node_object(self) -> dict:
        cap = {"cpu": self.node.cpu, "memory": self.node.memory, "pods": str(self.node.pods),
               "ephemeral-storage": "100Gi", "nvidia.com/gpu": str(self.node.gpus)}
        labels = {"kubernetes.io/hostname": self.node.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true",
                  "vlmpool.io/process-kubelet": "true", **self.node.labels}
        return {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node.name, "labels": labels},
                "spec": {}, "status": {"capacity": cap, "allocatable": cap}}

    def node_status(self) -> dict:
        t = now()
        obj = self.node_object()
        return {
            "capacity": obj["status"]["capacity"], "allocatable": obj["status"]["allocatable"],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "process kubelet is posting ready status", "lastHeartbeatTime": t,
                 "lastTransitionTime": t},
                *[{"type": ct, "status": "False", "reason": f"KubeletHasNo{ct}", "message": "",
                   "lastHeartbeatTime": t, "lastTransitionTime": t}
                  for ct in ("MemoryPressure", "DiskPressure", "PIDPressure")],
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node.name}],
            "nodeInfo": {"kubeletVersion": f"v{K8S_VERSION}", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "process://vlmpool",
                         "osImage": "vlmpool process kubelet", "kernelVersion": os.uname().release,
                         "machineID": "", "systemUUID": "", "bootID": ""},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        }

    async def register(self) -> None:
        try:
            await self.kube.create(self.node_object(), res=NODES)
        except Conflict:
            labels = self.node_object()["metadata"]["labels"]
            await self.kube.patch(NODES, self.node.name, {"metadata": {"labels": labels}})
        await self.kube.patch(NODES, self.node.name, {"status": self.node_status()}, subresource="status")

    async def heartbeat(self) -> None:
        lease: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                 "metadata": {"name": self.node.name, "namespace": "kube-node-lease"},
                                 "spec": {"holderIdentity": self.node.name,
                                          "leaseDurationSeconds": self.node.lease_seconds}}
        while not self._stop.is_set():
            try:
                lease["spec"]["renewTime"] = now_micro()
                try:
                    await self.kube.request("PUT", LEASES.path("kube-node-lease", self.node.name),
                                            body=await self._with_rv(lease))
                except NotFound:
                    await self.kube.request("POST", LEASES.path("kube-node-lease"), body=lease)
                await self.kube.patch(NODES, self.node.name, {"status": self.node_status()}, subresource="status")
            except (ApiError, aiohttp.ClientError) as e:
                log.warning("node heartbeat failed: %s", e)
            try:
                await asyncio.wait_for(self._stop.wait(), 10)
            except TimeoutError:
                pass

    async def _with_rv(self, lease: dict) -> dict:
        cur = await self.kube.get(LEASES, self.node.name, "kube-node-lease")
        out = json.loads(json.dumps(lease))
        out["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
        return out

    # ---- scheduling -------------------------------------------------------------------------------
    def _fits(self, pod: dict, bound: list[dict]) -> tuple[bool, str]:
        spec = pod["spec"]
        labels = self.node_object()["metadata"]["labels"]
        for k, v in (spec.get("nodeSelector") or {}).items():
            if labels.get(k) != v:
                return False, f"0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector ({k}={v})."

        def gpus(p: dict) -> float:
            total = 0.0
            for c in p["spec"].get("containers") or []:
                res = c.get("resources") or {}
                q = (res.get("limits") or {}).get("nvidia.com/gpu") or (res.get("requests") or {}).get("nvidia.com/gpu")
                total += parse_quantity(q) if q else 0
            return total

        used = sum(gpus(p) for p in bound if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))
        if used + gpus(pod) > self.node.gpus:
            return False, f"0/1 nodes are available: 1 Insufficient nvidia.com/gpu ({used:g}/{self.node.gpus} used)."
        return True, ""

    async def schedule(self, pods: list[dict]) -> None:
        bound = [p for p in pods if p["spec"].get("nodeName") == self.node.name]
        for pod in pods:
            spec, meta = pod["spec"], pod["metadata"]
            if spec.get("nodeName") or meta.get("deletionTimestamp"):
                continue
            if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
                continue
            ok, why = self._fits(pod, bound)
            if not ok:
                conds = (pod.get("status") or {}).get("conditions") or []
                if not any(c.get("type") == "PodScheduled" and c.get("message") == why for c in conds):
                    await self._patch_status_quietly(pod, {"phase": "Pending", "conditions": [
                        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why,
                         "lastTransitionTime": now(), "lastProbeTime": None}]})
                continue
            try:
                await self.kube.bind_pod(meta["name"], meta["namespace"], self.node.name)
                pod["spec"]["nodeName"] = self.node.name
                bound.append(pod)
                log.info("bound pod %s/%s to %s", meta["namespace"], meta["name"], self.node.name)
            except (NotFound, Conflict):
                pass
            except ApiError as e:
                log.warning("binding %s/%s failed: %s", meta["namespace"], meta["name"], e)

    async def _patch_status_quietly(self, pod: dict, status: dict) -> None:
        try:
            await self.kube.patch(PODS, pod["metadata"]["name"], {"status": status}, pod["metadata"]["namespace"],
                                  subresource="status")
        except ApiError:
            pass

    # ---- sync loop --------------------------------------------------------------------------------
    async def sync_once(self) -> None:
        pods = await self.kube.list(PODS)
        await self.schedule(pods)
        seen: set[str] = set()
        for pod in pods:
            if pod["spec"].get("nodeName") != self.node.name:
                continue
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            if pod["metadata"].get("deletionTimestamp"):
                await self._finish_deletion(pod, worker)
                continue
            if worker is None:
                phase = (pod.get("status") or {}).get("phase")
                if phase in ("Succeeded", "Failed"):
                    continue  # finished before this kubelet started; nothing to run
                ip = self.ipam.allocate(uid, (pod.get("status") or {}).get("podIP"))
                worker = PodWorker(self, pod, ip)
                self.workers[uid] = worker
                worker.task = asyncio.create_task(worker.run(), name=f"pod-{pod['metadata']['name']}")
        for uid in list(self.workers):
            if uid not in seen:  # deleted outright (force delete)
                worker = self.workers.pop(uid)
                await worker.terminate()
                self.ipam.release(uid)

    async def _finish_deletion(self, pod: dict, worker: PodWorker | None) -> None:
        uid = pod["metadata"]["uid"]
        if worker is not None:
            self.workers.pop(uid, None)
            await worker.terminate()
            await worker.push_status(force=True)
            self.ipam.release(uid)
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": uid}}
        try:
            await self.kube.request("DELETE", PODS.path(pod["metadata"]["namespace"], pod["metadata"]["name"]),
                                    body=body)
        except (NotFound, Conflict):
            pass
        except ApiError as e:
            log.warning("final delete of %s failed: %s", pod["metadata"]["name"], e)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        self.http = aiohttp.ClientSession()
        try:
            await self.register()
            hb = asyncio.create_task(self.heartbeat())
            if ready is not None:
                ready.set()
            while not self._stop.is_set():
                try:
                    await self.sync_once()
                except (ApiError, aiohttp.ClientError, socket.gaierror) as e:
                    log.warning("kubelet sync failed: %s", e)
                try:
                    await asyncio.wait_for(self._stop.wait(), self.node.sync_interval)
                except TimeoutError:
                    pass
            hb.cancel()
        finally:
            await self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        workers, self.workers = list(self.workers.values()), {}
        await asyncio.gather(*(w.terminate() for w in workers), return_exceptions=True)
        if self.http is not None:
            await self.http.close()
            self.http = None
