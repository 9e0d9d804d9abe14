"""A real Kubernetes control plane on loopback, with no Docker: etcd, kube-apiserver and
kube-controller-manager as local processes, started the way envtest and hack/local-up-cluster.sh do.

Used by the test suite (a session fixture) and by `vlmpool dev`. Binaries come from
`hack/k8s-bins.sh` (found or built from their Go modules, cached).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmpool.localcluster.pki import CertificateAuthority, CertPair, service_account_keys

log = logging.getLogger(__name__)

REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
SERVICE_CIDR = "10.0.0.0/24"


class ControlPlaneError(RuntimeError):
    pass


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def find_binaries(bin_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the control-plane binaries: `bin_dir`, $VLMPOOL_K8S_BIN, or whatever
    hack/k8s-bins.sh prints (which finds, or builds and caches, them)."""
    candidates = [bin_dir, os.environ.get("VLMPOOL_K8S_BIN")]
    for c in candidates:
        if c and all((Path(c) / b).exists() for b in REQUIRED_BINARIES):
            return Path(c)
    script = repo_root() / "hack" / "k8s-bins.sh"
    if not script.exists():
        raise ControlPlaneError(f"no control-plane binaries: set VLMPOOL_K8S_BIN or run {script}")
    out = subprocess.run(["bash", str(script), *REQUIRED_BINARIES], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def find_helm() -> Path:
    """helm: $VLMPOOL_HELM, $VLMPOOL_K8S_BIN/helm, or what `hack/k8s-bins.sh helm` finds or builds (cached)."""
    for c in (os.environ.get("VLMPOOL_HELM"),
              os.environ.get("VLMPOOL_K8S_BIN") and str(Path(os.environ["VLMPOOL_K8S_BIN"]) / "helm")):
        if c and os.access(c, os.X_OK):
            return Path(c)
    out = subprocess.run(["bash", str(repo_root() / "hack" / "k8s-bins.sh"), "helm"], capture_output=True, text=True)
    if out.returncode != 0:
        raise ControlPlaneError(f"hack/k8s-bins.sh helm failed ({out.returncode}): {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1]) / "helm"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_kubeconfig(path: Path, server: str, ca_pem: bytes, user: str, cert: CertPair | None = None,
                     token: str | None = None, namespace: str = "default") -> Path:
    user_entry: dict = {}
    if cert is not None:
        user_entry["client-certificate-data"] = base64.b64encode(cert.cert).decode()
        user_entry["client-key-data"] = base64.b64encode(cert.key).decode()
    if token is not None:
        user_entry["token"] = token
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "vlmpool-local", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": "vlmpool-local", "context": {
            "cluster": "vlmpool-local", "user": user, "namespace": namespace}}],
        "current-context": "vlmpool-local",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)
    return path


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1.

    `workdir` holds the PKI, etcd data, kubeconfigs and logs; a persistent one (as `vlmpool dev`
    uses) keeps the cluster's state across restarts. A temporary one is removed on stop.
    """

    workdir: Path | None = None
    bin_dir: Path | None = None
    controller_manager: bool = True
    extra_apiserver_args: list[str] = field(default_factory=list)
    extra_controller_manager_args: list[str] = field(default_factory=list)
    startup_timeout: float = 120.0
    # Where the apiserver listens and what it advertises (the `kubernetes` Service's endpoint). A real
    # node's pods must reach it there, so the node's control plane gives its own address (hack/node.sh).
    address: str = "127.0.0.1"
    api_port: int = 0  # 0: a free port

    def __post_init__(self) -> None:
        self._own_workdir = self.workdir is None
        self._ssl_lock = threading.Lock()
        self._ssl: tuple[CertPair, ssl.SSLContext] | None = None  # the admin pair it was made from
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="vlmpool-cp-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._procs: list[_Proc] = []
        self.server = ""
        self.kubeconfig = self.workdir / "admin.kubeconfig"

    @property
    def _work(self) -> Path:
        assert self.workdir is not None  # __post_init__ always sets it
        return self.workdir

    @property
    def _bins(self) -> Path:
        assert self.bin_dir is not None, "start() the control plane first"
        return self.bin_dir

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> ControlPlane:
        self.bin_dir = find_binaries(self.bin_dir)
        pki = self._work / "pki"
        pki.mkdir(exist_ok=True)
        self._ca = CertificateAuthority()
        self._ca.pair.write(pki, "ca")
        self._ca_pem = self._ca.pair.cert
        self._ca.serving(
            ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local"], sorted({"127.0.0.1", "10.0.0.1", self.address}),
        ).write(pki, "apiserver")
        service_account_keys().write(pki, "sa")
        self.admin_cert = self._ca.client("vlmpool-admin", ["system:masters"])

        etcd_port, peer_port = free_port(), free_port()
        api_port = self.api_port or free_port(self.address)
        self.server = f"https://{self.address}:{api_port}"
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        try:
            self._spawn("etcd", [
                str(self.bin_dir / "etcd"),
                "--name", "vlmpool", "--data-dir", str(self._work / "etcd"),
                "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", f"vlmpool=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync", "--log-level", "warn", "--quota-backend-bytes", str(2 * 1024**3),
            ])
            self._wait(lambda: self._http_ok(f"{etcd_url}/health"), "etcd /health")
            self._spawn("kube-apiserver", [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={self.address}", f"--advertise-address={self.address}", f"--secure-port={api_port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={pki / 'sa.crt'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC", "--allow-privileged=true",
                "--enable-priority-and-fairness=false", "--profiling=false",
                *self.extra_apiserver_args,
            ])
            self._write_kubeconfigs(pki)
            self._wait(self._apiserver_ready, "kube-apiserver /readyz")
            if self.controller_manager:
                self._spawn("kube-controller-manager", [
                    str(self.bin_dir / "kube-controller-manager"),
                    f"--kubeconfig={self._work / 'controller-manager.kubeconfig'}",
                    f"--service-account-private-key-file={pki / 'sa.key'}",
                    f"--root-ca-file={pki / 'ca.crt'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--leader-elect=false", "--secure-port=0", "--controllers=*",
                    # Each controller under its own service account, as real clusters run: the
                    # system:kube-controller-manager role alone cannot run them all.
                    "--use-service-account-credentials=true",
                    # A local cluster has no cloud and, in tests, often no nodes at all.
                    "--node-monitor-grace-period=60s",
                    *self.extra_controller_manager_args,
                ])
                self._wait(self._default_service_account, "kube-controller-manager (default ServiceAccount)")
        except Exception:
            self.stop()
            raise
        log.info("control plane ready at %s (kubeconfig %s)", self.server, self.kubeconfig)
        return self

    def stop(self) -> None:
        for proc in reversed(self._procs):
            _terminate(proc.popen)
        self._procs.clear()
        if self._own_workdir and self.workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def paused(self, name: str) -> Iterator[None]:
        """Stop one of the control plane's processes (SIGSTOP) for the block, then let it go on
        (SIGCONT), e.g. the kube-controller-manager, to see what the operator does before the Job
        controller has written a Job's status. Only with the controller manager's leader election
        off (as started here): a paused leader would lose its lease and exit."""
        proc = next(p for p in self._procs if p.name == name)
        proc.popen.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            proc.popen.send_signal(signal.SIGCONT)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- identities --------------------------------------------------------------------------------
    def kubeconfig_for(self, user: str, groups: list[str] | tuple[str, ...] = (),
                       namespace: str = "default") -> Path:
        """A kubeconfig authenticating as `user` in `groups` with a client certificate (for RBAC tests)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        return write_kubeconfig(self._work / f"user-{safe}.kubeconfig", self.server, self._ca_pem, user,
                                cert=self._ca.client(user, groups), namespace=namespace)

    @property
    def ca_pem(self) -> bytes:
        return self._ca_pem

    # ---- kubectl -----------------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self._bins / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def wait_crds_established(self, *names: str, timeout: float = 60.0) -> None:
        """Wait until every CRD (``crd/<name>`` or ``<name>``) reports Established=True. Polled with a
        deadline rather than `kubectl wait`, which fails at once ("accessor error") on a CRD whose status
        the apiserver has not written yet."""
        deadline = time.monotonic() + timeout
        pending = [n.removeprefix("crd/") for n in names]
        while pending:
            res = self.kubectl("get", "crd", *pending, "-o", "json", check=False)
            if res.returncode == 0:
                doc = json.loads(res.stdout)
                items = doc.get("items", []) if doc.get("kind") == "List" else [doc]
                done = {i["metadata"]["name"] for i in items
                        if any(c.get("type") == "Established" and c.get("status") == "True"
                               for c in (i.get("status") or {}).get("conditions") or [])}
                pending = [n for n in pending if n not in done]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise ControlPlaneError(f"CRDs not Established after {timeout:g}s: {', '.join(pending)}")
            time.sleep(0.2)

    def logs(self, name: str, tail: int = 40) -> str:
        for p in self._procs:
            if p.name == name and p.log_path.exists():
                return "\n".join(p.log_path.read_text(errors="replace").splitlines()[-tail:])
        return ""

    # ---- internals -------------------------------------------------------------------------------
    def _write_kubeconfigs(self, pki: Path) -> None:
        write_kubeconfig(self.kubeconfig, self.server, self._ca_pem, "vlmpool-admin", cert=self.admin_cert)
        write_kubeconfig(self._work / "controller-manager.kubeconfig", self.server, self._ca_pem,
                         "system:kube-controller-manager",
                         cert=self._ca.client("system:kube-controller-manager"))

    def _spawn(self, name: str, argv: list[str]) -> None:
        logs = self._work / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{name}.log"
        fh = open(log_path, "ab")
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        fh.close()
        self._procs.append(_Proc(name, popen, log_path))

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.popen.poll() is not None:
                    raise ControlPlaneError(
                        f"{p.name} exited with {p.popen.returncode} while waiting for {what}:\n"
                        + self.logs(p.name))
            try:
                if ready():
                    return
            except Exception as e:  # noqa: BLE001 - not ready yet
                log.debug("waiting for %s: %s", what, e)
            time.sleep(0.25)
        raise ControlPlaneError(f"timed out after {self.startup_timeout}s waiting for {what}")

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _ssl_context(self) -> ssl.SSLContext:
        """One context per admin key pair: writing the pair per request let a concurrent caller read a
        half-written PEM (bench/scale.py's load threads: `ssl.SSLError: PEM lib`)."""
        with self._ssl_lock:
            if self._ssl is None or self._ssl[0] is not self.admin_cert:  # none yet, or a restart's new pair
                context = ssl.create_default_context(cadata=self._ca_pem.decode())
                cert, key = self.admin_cert.write(self._work / "pki", "admin")
                context.load_cert_chain(str(cert), str(key))
                self._ssl = (self.admin_cert, context)
            return self._ssl[1]

    def request(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """GET `path` on the apiserver as the admin (used for readiness checks)."""
        try:
            with urllib.request.urlopen(self.server + path, context=self._ssl_context(), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _apiserver_ready(self) -> bool:
        status, _ = self.request("/readyz")
        return status == 200

    def _default_service_account(self) -> bool:
        status, body = self.request("/api/v1/namespaces/default/serviceaccounts/default")
        return status == 200 and json.loads(body).get("metadata", {}).get("name") == "default"


def _terminate(popen: subprocess.Popen, grace: float = 10.0) -> None:
    if popen.poll() is not None:
        return
    try:
        os.killpg(popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        popen.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait(5)
