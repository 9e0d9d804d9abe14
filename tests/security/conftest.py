"""Fixtures of the security tests: real servers on loopback that play the attacker's hosts.

`origin` (https, 127.0.0.1) is the host a hostile VLMAdapter names; it can answer redirects. `other`
(https, 127.0.0.2) is another host; `sink` (plain http, 127.0.0.1) is the clear-text destination a
downgrade would reach. Every server records each request (method, path, headers), so a test can say
whether a credential arrived. The certificate is self-signed and trusted through SSL_CERT_FILE; its
names include mirror.example.com and evil.example.com, which the tests resolve through a hostile
resolver (`resolver` fixture) to loopback, as a DNS-rebinding attacker would.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vlmpool.patcher import egress
from vlmpool.testing.tls import self_signed

NAMES = ("mirror.example.com", "evil.example.com", "huggingface.co")


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    return self_signed(tmp, "vlmpool-security-tests", ips=("127.0.0.1", "127.0.0.2"), dns_names=NAMES)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Server:
    """A recording HTTP(S) server. `routes[path]` is bytes (200) or ('redirect', location[, code])
    or a callable(handler) -> (status, headers, body), the body bytes or an iterable of bytes (sent
    as it yields)."""

    host: str
    scheme: str
    routes: dict[str, object] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def auth_seen(self) -> list[str]:
        return [s.headers["authorization"] for s in self.seen if "authorization" in s.headers]


def _serve(srv: Server, ctx: ssl.SSLContext | None, port: int = 0) -> ThreadingHTTPServer:
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _any(self):
            srv.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            route = srv.routes.get(self.path.split("?", 1)[0])
            if callable(route):
                status, headers, body = route(self)
            elif isinstance(route, tuple) and route[0] == "redirect":
                status, headers, body = (route[2] if len(route) > 2 else 302), {"Location": route[1]}, b""
            elif isinstance(route, bytes):
                status, headers, body = 200, {}, route
            else:
                status, headers, body = 404, {}, b"not found"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if isinstance(body, bytes):
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
            # An iterable body is sent chunk by chunk as it yields (a trickle, a stream of unknown
            # length: no Content-Length unless the route gave one), until the client goes.
            self.close_connection = True
            self.end_headers()
            try:
                for chunk in body:
                    self.wfile.write(chunk)
                    self.wfile.flush()
            except OSError:
                pass

        do_GET = do_HEAD = do_POST = do_PUT = _any

    httpd = ThreadingHTTPServer((srv.host, port), H)
    httpd.daemon_threads = True
    if ctx is not None:
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    srv.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture
def tls(tmp_path, monkeypatch) -> ssl.SSLContext:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.delenv("VLMPOOL_SOURCE_ALLOW", raising=False)
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    return ctx


@pytest.fixture
def servers(tls) -> Callable[[str, str], Server]:
    started: list[ThreadingHTTPServer] = []

    def start(host: str = "127.0.0.1", scheme: str = "https", port: int = 0) -> Server:
        srv = Server(host, scheme)
        started.append(_serve(srv, tls if scheme == "https" else None, port))
        return srv

    yield start
    for h in started:
        h.shutdown()
        h.server_close()


@pytest.fixture
def origin(servers) -> Server:
    return servers("127.0.0.1", "https")


@pytest.fixture
def other(servers) -> Server:
    return servers("127.0.0.2", "https")


@pytest.fixture
def sink(servers) -> Server:
    return servers("127.0.0.1", "http")


@pytest.fixture
def resolver(monkeypatch) -> dict[str, str]:
    """A hostile DNS: names put in the returned dict resolve to the address given (the guard's real
    resolver is replaced; everything else resolves as usual)."""
    table: dict[str, str] = {}
    real = egress._REAL_GETADDRINFO

    def fake(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name in table:
            return real(table[name], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    with egress.guarded(egress.EgressPolicy()):
        pass  # installs the guard's hooks, which call egress._REAL_GETADDRINFO
    monkeypatch.setattr(egress, "_REAL_GETADDRINFO", fake)
    return table


# ------------------------------------------------------------------ the control plane's side
# The operator, its user (operator_kubeconfig, operator_user) and the admin client `kube` are
# tests/conftest.py's, shared with tests/operator; only the default of file:// sources differs.


@pytest.fixture
def operator_host_paths() -> list[str]:
    """file:// sources are off unless a test passes `host_paths` (the product's default, unlike tests/operator)."""
    return []
