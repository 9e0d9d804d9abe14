"""Where a patch may connect while it fetches a source (the egress policy of `vlmpool patch`).

A VLMAdapter's author picks the source URI and may supply its credentials, so a fetch must reach only
what the author could reach from outside the cluster:

- No internal destinations: every address a fetch connects to is checked at ``connect()`` (the very
  address connected to, after resolution: no DNS-rebinding gap) and refused unless it is globally
  routable. That refuses loopback (127/8, ::1), link-local and the cloud metadata endpoints
  (169.254.169.254, fd00:ec2::254), RFC 1918, CGNAT (100.64/10), ULA (fc00::/7), unspecified,
  reserved and multicast addresses, IPv4 embedded in IPv6 (mapped, NAT64) included. Host names under
  ``.svc``, ``.cluster.local``, ``.internal``, ``.local``, ``localhost`` and single-label names are
  refused before they are resolved.
- An allow-list of host names (``mirror.corp``, ``*.corp``) and CIDRs (``10.20.0.0/16``) lifts the
  refusal for air-gapped mirrors: the cluster admin's operator setting ``--source-allow``, passed
  into the patch Job as ``$VLMPOOL_SOURCE_ALLOW`` (comma-separated; an explicit ``env`` entry,
  which a tenant's credentials Secret cannot override).
- Redirects never leave https for anything else, and credentials go only to the origin the URI names
  (scheme, host, port): urllib (https), httpx2 (huggingface_hub) and botocore (s3) are each held to
  it by the helpers below.

- A whole-fetch deadline (the patcher's ``--fetch-timeout``): when it passes, every connection of the
  fetch is shut down (whatever client library is blocked reading it gets an error at once) and no new
  one is made, so a source that trickles one byte a minute ends at the deadline, not at the Job's.

Refusals are PatchErrors with the stable reasons ``SourceAddressRefused``, ``SourceRedirectRefused``
and ``FetchTimeout``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vlmpool.patcher.errors import PatchError

ENV_ALLOW = "VLMPOOL_SOURCE_ALLOW"
INTERNAL_SUFFIXES = (".svc", ".cluster.local", ".internal", ".local", ".localhost")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HINT = f"a cluster admin can allow-list it (operator --source-allow, ${ENV_ALLOW})"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _embedded_v4(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


@dataclass(frozen=True)
class EgressPolicy:
    """The allow-list: host names (exact, or ``*.suffix``) and networks that may be reached although
    they are internal."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> EgressPolicy:
        nets: list[IPNetwork] = []
        hosts: list[str] = []
        for raw in entries:
            e = raw.strip().lower().rstrip(".")
            if not e:
                continue
            try:
                nets.append(ipaddress.ip_network(e, strict=False))
                continue
            except ValueError:
                pass
            name = e[2:] if e.startswith("*.") else e
            if not name or any(not part or len(part) > 63 or not all(c.isalnum() or c == "-" for c in part)
                               for part in name.split(".")):
                raise ValueError(f"not a host name, *.suffix or CIDR: {raw!r}")
            hosts.append(e)
        return cls(tuple(nets), tuple(hosts))

    @classmethod
    def from_env(cls) -> EgressPolicy:
        try:
            return cls.parse(os.environ.get(ENV_ALLOW, "").split(","))
        except ValueError as e:
            raise PatchError("InvalidArguments", f"${ENV_ALLOW}: {e}") from None

    def host_allowed(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return any(h == p or (p.startswith("*.") and h.endswith(p[1:])) for p in self.hosts)

    def host_refusal(self, host: str | None) -> str | None:
        """Why a host name (before resolution) may not be reached, or None."""
        if not host:
            return "the URI names no host"
        h = host.lower().rstrip(".").strip("[]")
        ip = _ip(h)
        if ip is not None:
            return self.address_refusal(ip)
        if self.host_allowed(h):
            return None
        if h == "localhost" or "." not in h or h.endswith(INTERNAL_SUFFIXES):
            return f"{host} is a cluster-internal or local name"
        return None

    def address_refusal(self, ip: IPAddress) -> str | None:
        """Why an address may not be connected to, or None."""
        if any(ip.version == n.version and ip in n for n in self.networks):
            return None
        v4 = _embedded_v4(ip)
        if v4 is not ip and any(v4.version == n.version and v4 in n for n in self.networks):
            return None
        if not ip.is_global or not v4.is_global or ip.is_multicast or v4.is_multicast:
            kind = ("loopback" if v4.is_loopback else "link-local (cloud metadata)" if v4.is_link_local
                    else "private or cluster-internal")
            return f"{ip} is a {kind} address"
        return None


# ------------------------------------------------------------------ the connect() guard

@dataclass
class _Guard:
    policy: EgressPolicy
    names: dict[str, str] = field(default_factory=dict)   # resolved address -> name asked for
    allowed: set[str] = field(default_factory=set)        # addresses of allow-listed names
    refusal: PatchError | None = None
    timeout: float | None = None                          # the whole fetch's deadline, seconds
    expired: bool = False
    conns: list[tuple[int, Any]] = field(default_factory=list)  # (fd, address) of each connection made

    def refuse(self, reason: str, message: str) -> PatchError:
        err = PatchError(reason, message)
        if self.refusal is None:
            self.refusal = err
        return err

    def expire(self) -> None:
        """The deadline passed: refuse, and shut down every connection the fetch made (found by its
        descriptor, checked to be the same connection), which ends any read blocked on one."""
        with _LOCK:
            self.expired = True
            self.refuse("FetchTimeout", f"the fetch did not finish within {self.timeout:g} seconds (--fetch-timeout): "
                        "the source is too slow or stalled")
            conns = list(self.conns)
        for fd, address in conns:
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                continue  # closed already
            try:
                if s.getpeername()[:2] == tuple(address)[:2]:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                s.detach()

    def check(self) -> None:
        """Raise the deadline's refusal once it has passed (the byte loops call this per chunk)."""
        if self.expired and self.refusal is not None:
            raise self.refusal


class EgressRefused(PermissionError):
    """Raised inside socket calls; fetch_adapter turns the recorded refusal into its PatchError."""


_LOCK = threading.Lock()
_ACTIVE: _Guard | None = None
_REAL_CONNECT = socket.socket.connect
_REAL_CONNECT_EX = socket.socket.connect_ex
_REAL_GETADDRINFO = socket.getaddrinfo
_INSTALLED = False


def _check(sock: socket.socket, address: Any) -> None:
    g = _ACTIVE
    if g is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    if g.expired:
        raise EgressRefused(str(g.refusal))
    with _LOCK:
        g.conns.append((sock.fileno(), address))
    text = str(address[0])
    ip = _ip(text)
    if ip is None or text in g.allowed:
        return
    why = g.policy.address_refusal(ip)
    if why:
        host = g.names.get(text)
        err = g.refuse("SourceAddressRefused", f"refused to connect to {host + ' at ' if host else ''}{why}; "
                       f"sources must be reachable from outside the cluster ({_HINT})")
        raise EgressRefused(str(err))


def _connect(self: socket.socket, address: Any) -> None:
    _check(self, address)
    return _REAL_CONNECT(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    _check(self, address)
    return _REAL_CONNECT_EX(self, address)


def _getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    g = _ACTIVE
    name = host.decode() if isinstance(host, bytes) else host
    if g is not None and isinstance(name, str) and _ip(name) is None:
        why = g.policy.host_refusal(name)
        if why:
            err = g.refuse("SourceAddressRefused", f"refused to resolve {why}; {_HINT}")
            raise EgressRefused(str(err))
    res = _REAL_GETADDRINFO(host, *args, **kwargs)
    if g is not None and isinstance(name, str):
        for ai in res:
            addr = str(ai[4][0])
            g.names.setdefault(addr, name)
            if g.policy.host_allowed(name):
                g.allowed.add(addr)
    return res


@contextlib.contextmanager
def guarded(policy: EgressPolicy, timeout: float | None = None) -> Iterator[_Guard]:
    """Check every connection of this process against `policy` while the block runs, and end them
    all after `timeout` seconds (FetchTimeout). One fetch at a time per process (the patcher fetches
    one source); nested use is refused."""
    global _ACTIVE, _INSTALLED
    with _LOCK:
        if _ACTIVE is not None:
            raise RuntimeError("a guarded fetch is already running in this process")
        if not _INSTALLED:
            # monkeypatch on purpose; typeshed types the slot with _socket.socket as self
            socket.socket.connect = _connect  # type: ignore[method-assign,assignment]
            socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign,assignment]
            socket.getaddrinfo = _getaddrinfo
            _INSTALLED = True
        g = _ACTIVE = _Guard(policy, timeout=timeout)
    timer = None
    if timeout is not None:
        timer = threading.Timer(timeout, g.expire)
        timer.daemon = True
        timer.start()
    try:
        yield g
    finally:
        if timer is not None:
            timer.cancel()
        with _LOCK:
            _ACTIVE = None


def current() -> _Guard | None:
    return _ACTIVE


def check_deadline() -> None:
    """Raise FetchTimeout when the running fetch's deadline has passed (a no-op outside a fetch)."""
    g = _ACTIVE
    if g is not None:
        g.check()


# ------------------------------------------------------------------ redirects and credentials

def origin(url: str) -> tuple[str, str, int | None]:
    p = urllib.parse.urlsplit(url)
    scheme = p.scheme.lower()
    try:
        port = p.port
    except ValueError:
        port = None
    return scheme, (p.hostname or "").lower(), port or {"https": 443, "http": 80}.get(scheme)


def check_redirect(first: str, target: str, what: str) -> bool:
    """Raise SourceRedirectRefused when `target` leaves https (when `first` was https) or names a host
    the policy refuses; return whether credentials may go to it (same origin as `first`)."""
    g = _ACTIVE
    a, b = origin(first), origin(target)

    def refuse(message: str, reason: str = "SourceRedirectRefused") -> PatchError:
        return g.refuse(reason, message) if g else PatchError(reason, message)

    if a[0] == "https" and b[0] != "https":
        raise refuse(f"{what}: a redirect to {b[0] or 'a relative'}:// was refused "
                     "(an https source never leaves https)")
    if b[0] not in ("https", "http"):
        raise refuse(f"{what}: a redirect to {b[0]}:// was refused")
    if g is not None and b[1] != a[1]:
        why = g.policy.host_refusal(b[1])
        if why:
            raise refuse(f"{what}: a redirect to another host was refused: {why} ({_HINT})", "SourceAddressRefused")
    return a == b
