"""Where the Kubernetes API is and how to authenticate to it, as the `kubernetes` package loads it.

vlmpool does not parse kubeconfigs itself: the official client's loader (``kubernetes.config``) reads
them, so everything kubectl users rely on works: exec credential plugins (EKS, GKE, AKS, kubelogin),
the ``oidc`` and ``gcp`` auth providers, client certificates and tokens (inline or from files), basic
auth, and ``$KUBECONFIG`` holding several files merged in order. In a pod it reads the service
account the same way (the projected token is re-read every minute, as it rotates).

Sources, in order: an explicit path (``--kubeconfig``, which may also be a ``:``-separated list), then
``$KUBECONFIG``, then the in-cluster service account, then ``~/.kube/config``.

Credentials expire. :class:`KubeConfig` keeps the current ``Authorization`` header and renews it by
asking the loader again: shortly before the expiry an exec plugin or auth provider announced (a tenth
of the lifetime before it, at most a minute), every minute for a service-account token file, and at
once after the apiserver answered 401 (a revoked token, or an OIDC id-token past its ``exp``). The
renewal runs in a worker thread (an exec plugin is a subprocess), and concurrent callers share one.
vlmpool's own client (:mod:`vlmpool.kube.client`) and kopf (:meth:`KubeConfig.kopf_connection_info`,
which hands kopf the same expiry so that kopf logs in again before it, not after a 401) use the same
instance, so one plugin run serves both.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes.client import Configuration
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader
from kubernetes.config.kube_config import KubeConfigLoader, KubeConfigMerger

log = logging.getLogger("vlmpool.kube")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_FILE_PERIOD = 60.0  # seconds between re-reads of a service-account token file
MAX_MARGIN = 60.0  # renew at most this long before an announced expiry


class KubeConfigError(RuntimeError):
    """The kubeconfig cannot be used (missing, malformed, or its credentials cannot be obtained)."""


class KubeConfig:
    """An API endpoint and renewable credentials. Build with :meth:`load` or :meth:`in_cluster`."""

    def __init__(self, loader: Any, *, namespace: str = "default", source: str = "", periodic: bool = False,
                 plugin: str | None = None):
        self._loader = loader
        self._periodic = periodic  # a token file that rotates on disk: re-read on a timer
        self._plugin = plugin  # "exec" or "auth-provider": must yield credentials, or loading fails
        self._lock = threading.Lock()
        self.namespace = namespace
        self.source = source
        self.refreshes = 0  # how many times the credentials were obtained (1 after loading)
        # What the loader gave (set by _obtain): the endpoint, the Authorization header, TLS files.
        self.server = ""
        self.header: str | None = None
        self.ca_file: str | None = None
        self.cert_file: str | None = None
        self.key_file: str | None = None
        self.insecure = False
        self.tls_server_name: str | None = None
        self.renew_at: dt.datetime | None = None  # when to renew (None: only after a 401)
        self._renew_mono: float | None = None
        self._obtained_mono = 0.0
        self._refresh()

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, context: str | None = None) -> KubeConfig:
        if path:
            return cls.from_kubeconfig(str(path), context)
        env = os.environ.get("KUBECONFIG")
        if env:
            return cls.from_kubeconfig(env, context)
        if os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT_DIR / "token").exists():
            return cls.in_cluster()
        home = Path.home() / ".kube" / "config"
        if home.exists():
            return cls.from_kubeconfig(str(home), context)
        raise KubeConfigError("no kubeconfig: pass --kubeconfig, set KUBECONFIG, or run in a pod")

    @classmethod
    def from_kubeconfig(cls, paths: str, context: str | None = None) -> KubeConfig:
        """One kubeconfig file, or several joined by ``os.pathsep`` (merged as kubectl merges them:
        the first file naming a cluster, user or context wins)."""
        files = [os.path.expanduser(p) for p in paths.split(os.pathsep) if p]
        if not any(os.path.exists(p) for p in files):
            raise KubeConfigError(f"cannot read kubeconfig {paths}: no such file")
        try:
            merged = KubeConfigMerger(os.pathsep.join(files))
            if merged.config is None:
                raise KubeConfigError(f"kubeconfig {paths} is empty")
            # The persister writes refreshed OIDC tokens back, as kubectl and the kubernetes package do.
            loader = KubeConfigLoader(config_dict=merged.config, active_context=context, config_base_path=None,
                                      config_persister=merged.save_changes)
            ctx = loader.current_context.get("context") or {}
            namespace = ctx.get("namespace") or "default"
            entries = [getattr(u, "value", u) for u in merged.config.value.get("users") or []]
            users = {u.get("name"): u.get("user") or {} for u in entries}
            user = users.get(ctx.get("user")) or {}
            plugin = next((k for k in ("exec", "auth-provider") if k in user), None)
        except KubeConfigError:
            raise
        except (ConfigException, OSError, KeyError, TypeError, ValueError) as e:
            raise KubeConfigError(f"kubeconfig {paths}: {e}") from e
        except Exception as e:  # a malformed YAML document (yaml.YAMLError) and the like
            raise KubeConfigError(f"kubeconfig {paths} cannot be read: {e}") from e
        return cls(loader, namespace=namespace, source=paths, plugin=plugin)

    @classmethod
    def in_cluster(cls, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig:
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise KubeConfigError("KUBERNETES_SERVICE_HOST is not set: not running in a pod")
        ns_file = sa_dir / "namespace"
        loader = InClusterConfigLoader(token_filename=str(sa_dir / "token"), cert_filename=str(sa_dir / "ca.crt"))
        return cls(loader, namespace=ns_file.read_text().strip() if ns_file.exists() else "default",
                   source="in-cluster", periodic=True)

    # ---- renewal -----------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Ask the loader for credentials again (runs an exec plugin; reads token files). A failed
        renewal keeps the credentials in hand (they may still be valid) and is tried again 5 s later."""
        try:
            self._obtain()
        except KubeConfigError as e:
            if not self.refreshes:
                raise
            log.warning("renewing the kubernetes credentials failed (kept the current ones): %s", e)
            self._renew_mono = time.monotonic() + 5.0

    def _obtain(self) -> None:
        cfg = Configuration()
        try:
            self._loader.load_and_set(cfg)
        except (ConfigException, OSError) as e:
            raise KubeConfigError(f"kubeconfig {self.source}: {e}") from e
        if not cfg.host:
            raise KubeConfigError(f"kubeconfig {self.source}: the cluster has no server")
        key = next((k for k in ("BearerToken", "authorization") if cfg.api_key.get(k)), None)
        header = None
        if key:
            prefix = cfg.api_key_prefix.get(key)
            header = (f"{prefix} {cfg.api_key[key]}" if prefix else str(cfg.api_key[key])).strip()
            scheme, _, rest = header.partition(" ")  # token files may end in a newline (kubectl strips it)
            header = f"Bearer {rest.strip()}" if scheme.lower() == "bearer" else header
        if self._plugin and not header and not cfg.cert_file:
            # The loader logs a failed plugin and carries on without credentials: refuse instead of
            # talking to the apiserver anonymously.
            raise KubeConfigError(f"kubeconfig {self.source}: the user's {self._plugin} credentials produced "
                                  "no token or certificate (see the log above)")
        now = dt.datetime.now(dt.UTC)
        expiry = getattr(self._loader, "expiry", None)  # set by exec plugins and the gcp provider
        renew_at: dt.datetime | None = None
        if isinstance(expiry, dt.datetime):
            expiry = expiry if expiry.tzinfo else expiry.replace(tzinfo=dt.UTC)
            margin = min(MAX_MARGIN, max(0.0, (expiry - now).total_seconds()) / 10)
            renew_at = expiry - dt.timedelta(seconds=margin)
        elif self._periodic:
            renew_at = now + dt.timedelta(seconds=TOKEN_FILE_PERIOD)
        self.server = cfg.host.rstrip("/")
        self.header = header
        self.ca_file = cfg.ssl_ca_cert
        self.cert_file = cfg.cert_file
        self.key_file = cfg.key_file
        self.insecure = not cfg.verify_ssl
        self.tls_server_name = getattr(cfg, "tls_server_name", None)
        self.renew_at = renew_at
        self._renew_mono = None if renew_at is None else time.monotonic() + (renew_at - now).total_seconds()
        self._obtained_mono = time.monotonic()
        self.refreshes += 1
        if self.refreshes > 1:
            log.info("kubernetes credentials renewed (%s)%s", self.source,
                     f", valid until {renew_at.isoformat()}" if renew_at else "")

    def due(self) -> bool:
        return self._renew_mono is not None and time.monotonic() >= self._renew_mono

    def _refresh_if(self, failed: str | bool, min_age: float = 0.0) -> None:
        with self._lock:  # one renewal at a time; the others find it done when they get the lock
            if failed is False:
                wanted = self.due()
            elif failed is True:
                wanted = time.monotonic() - self._obtained_mono >= min_age
            else:
                wanted = failed == self.header
            if wanted:
                self._refresh()

    async def fresh_header(self) -> str | None:
        """The Authorization header to send now, renewed first when it is due."""
        if self.due():
            await _in_thread(self._refresh_if, False)
        return self.header

    async def renew_after_401(self, failed: str | None) -> bool:
        """The apiserver refused `failed`: obtain new credentials unless a concurrent caller already did.
        Returns whether the credentials to use now (header or client certificate) differ."""
        tls = self.tls_identity
        await _in_thread(self._refresh_if, failed if failed is not None else True)
        return self.header != failed or self.tls_identity != tls

    async def renew(self, min_age: float = 0.0) -> None:
        """Obtain new credentials, unless they were obtained less than `min_age` seconds ago."""
        await _in_thread(self._refresh_if, True, min_age)

    # ---- use ---------------------------------------------------------------------------------------
    @property
    def tls_identity(self) -> tuple[str | None, ...]:
        """Changes when the TLS material changes (an exec plugin may hand out client certificates)."""
        return (self.ca_file, self.cert_file, self.key_file, str(self.insecure))

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    async def kopf_connection_info(self, *, renew_older_than: float | None = None) -> Any:
        """The same credentials as kopf's ConnectionInfo, with the renewal time as kopf's expiration
        (kopf logs in again then). kopf also logs in again after a 401, when the credentials it held were
        refused: `renew_older_than` renews them first unless they are that recent (kopf's first login
        follows the loading at once)."""
        import kopf

        if renew_older_than is not None:
            await self.renew(renew_older_than)
        header = await self.fresh_header()
        scheme, _, token = (header or "").partition(" ")
        return kopf.ConnectionInfo(
            server=self.server,
            ca_path=self.ca_file,
            insecure=self.insecure or None,
            certificate_path=self.cert_file,
            private_key_path=self.key_file,
            scheme=scheme or None,
            token=token or None,
            default_namespace=self.namespace,
            expiration=self.renew_at,
        )


async def _in_thread(fn: Any, *args: Any) -> None:
    import asyncio

    await asyncio.to_thread(fn, *args)
