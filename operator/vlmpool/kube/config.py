"""Where the Kubernetes API is and how to authenticate to it.

Sources, in order: an explicit kubeconfig path, ``$KUBECONFIG`` (first file of the list), the
in-cluster service account, ``~/.kube/config``. Supported credentials: client certificates (file or
inline data), bearer tokens (inline or ``tokenFile``), basic auth, the cluster CA (file or inline
data) and ``insecure-skip-tls-verify``. Exec plugins and auth providers are not supported: they
raise :class:`KubeConfigError` with the reason rather than silently connecting unauthenticated.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(RuntimeError):
    """The kubeconfig cannot be used (missing, malformed or an unsupported credential kind)."""


@dataclass
class KubeConfig:
    server: str
    ca_data: bytes | None = None  # PEM
    insecure: bool = False
    cert_data: bytes | None = None  # PEM client certificate
    key_data: bytes | None = None  # PEM client key
    token: str | None = None
    token_file: str | None = None  # re-read on every request (projected tokens rotate)
    username: str | None = None
    password: str | None = None
    namespace: str = "default"
    source: str = ""
    _tmpfiles: list[str] = field(default_factory=list, repr=False)

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, context: str | None = None) -> "KubeConfig":
        if path:
            return cls.from_kubeconfig(Path(path), context)
        env = os.environ.get("KUBECONFIG")
        if env:
            first = next((p for p in env.split(os.pathsep) if p), None)
            if first:
                return cls.from_kubeconfig(Path(first), context)
        if os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT_DIR / "token").exists():
            return cls.in_cluster()
        home = Path.home() / ".kube" / "config"
        if home.exists():
            return cls.from_kubeconfig(home, context)
        raise KubeConfigError("no kubeconfig: pass --kubeconfig, set KUBECONFIG, or run in a pod")

    @classmethod
    def in_cluster(cls, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> "KubeConfig":
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeConfigError("KUBERNETES_SERVICE_HOST is not set: not running in a pod")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        ns_file = sa_dir / "namespace"
        return cls(
            server=f"https://{host}:{port}",
            ca_data=(sa_dir / "ca.crt").read_bytes(),
            token_file=str(sa_dir / "token"),
            namespace=ns_file.read_text().strip() if ns_file.exists() else "default",
            source="in-cluster",
        )

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> "KubeConfig":
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise KubeConfigError(f"cannot read kubeconfig {path}: {e}") from e
        except yaml.YAMLError as e:
            raise KubeConfigError(f"kubeconfig {path} is not valid YAML: {e}") from e
        return cls.from_dict(doc, context, base_dir=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], context: str | None = None, base_dir: Path = Path("."),
                  source: str = "") -> "KubeConfig":
        def pick(kind: str, name: str) -> dict[str, Any]:
            for item in doc.get(kind) or []:
                if item.get("name") == name:
                    return item.get(kind[:-1]) or {}
            raise KubeConfigError(f"kubeconfig {source}: no {kind[:-1]} named {name!r}")

        ctx_name = context or doc.get("current-context")
        if not ctx_name:
            raise KubeConfigError(f"kubeconfig {source}: no current-context")
        ctx = pick("contexts", ctx_name)
        cluster = pick("clusters", ctx.get("cluster", ""))
        user = pick("users", ctx["user"]) if ctx.get("user") else {}
        if "exec" in user or "auth-provider" in user:
            raise KubeConfigError(f"kubeconfig {source}: exec/auth-provider credentials are not supported; "
                                  "use a client certificate or a token")

        def blob(data_key: str, file_key: str, section: dict[str, Any]) -> bytes | None:
            if section.get(data_key):
                return base64.b64decode(section[data_key])
            if section.get(file_key):
                p = Path(section[file_key])
                return (p if p.is_absolute() else base_dir / p).read_bytes()
            return None

        if not cluster.get("server"):
            raise KubeConfigError(f"kubeconfig {source}: cluster {ctx.get('cluster')!r} has no server")
        token_file = user.get("tokenFile")
        if token_file and not Path(token_file).is_absolute():
            token_file = str(base_dir / token_file)
        return cls(
            server=cluster["server"].rstrip("/"),
            ca_data=blob("certificate-authority-data", "certificate-authority", cluster),
            insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
            cert_data=blob("client-certificate-data", "client-certificate", user),
            key_data=blob("client-key-data", "client-key", user),
            token=user.get("token"),
            token_file=token_file,
            username=user.get("username"),
            password=user.get("password"),
            namespace=ctx.get("namespace") or "default",
            source=source,
        )

    # ---- use ---------------------------------------------------------------------------------------
    def current_token(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return None

    def auth_headers(self) -> dict[str, str]:
        tok = self.current_token()
        if tok:
            return {"Authorization": f"Bearer {tok}"}
        if self.username is not None and self.password is not None:
            raw = f"{self.username}:{self.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(cadata=self.ca_data.decode() if self.ca_data else None)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_data and self.key_data:
            # ssl can only load a key pair from files: write them privately and remove them on close().
            cert = self._private_file(self.cert_data, ".crt")
            key = self._private_file(self.key_data, ".key")
            ctx.load_cert_chain(cert, key)
        return ctx

    def _private_file(self, data: bytes, suffix: str) -> str:
        fd, name = tempfile.mkstemp(prefix="vlmpool-kube-", suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._tmpfiles.append(name)
        return name

    def cleanup(self) -> None:
        while self._tmpfiles:
            try:
                os.unlink(self._tmpfiles.pop())
            except OSError:
                pass

    def kopf_connection_info(self) -> Any:
        """The same credentials as kopf's ConnectionInfo (kopf then does the watching)."""
        import kopf

        return kopf.ConnectionInfo(
            server=self.server,
            ca_data=self.ca_data,
            insecure=self.insecure or None,
            certificate_data=self.cert_data,
            private_key_data=self.key_data,
            token=self.current_token(),
            scheme="Bearer" if self.current_token() else None,
            username=self.username,
            password=self.password,
            default_namespace=self.namespace,
        )
