"""KubeClient's one place for errors: classification into types and bounded retries, against a real
loopback HTTP server that answers 429/5xx (with and without Retry-After) before it answers 200."""

from __future__ import annotations

import datetime as dt
import email.utils
import itertools
import time

import aiohttp
import pytest
import yaml
from aiohttp import web

from vlmpool.kube import errors as E
from vlmpool.kube.client import PODS, KubeClient
from vlmpool.kube.config import KubeConfig


class Flaky:
    """Answers the queued (status, headers) pairs in order, then 200; records every request."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, dict[str, str]]] = []
        self.requests: list[tuple[float, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((time.monotonic(), request.method))
        if self.queue:
            status, headers = self.queue.pop(0)
            return web.json_response({"kind": "Status", "reason": f"R{status}", "message": f"m{status}",
                                      "code": status}, status=status, headers=headers)
        return web.json_response({"kind": "Pod", "metadata": {"name": "p"}})


@pytest.fixture
async def flaky(tmp_path):
    srv = Flaky()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", srv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    kc = tmp_path / "kc"
    kc.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "c"}}],
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{runner.addresses[0][1]}"}}],
        "users": [{"name": "c", "user": {"token": "t"}}]}))
    async with KubeClient(KubeConfig.load(kc), timeout=5) as kube:
        yield srv, kube
    await runner.cleanup()


def gaps(srv: Flaky) -> list[float]:
    times = [t for t, _ in srv.requests]
    return [b - a for a, b in itertools.pairwise(times)]


async def test_429_retry_after_is_honoured(flaky):
    srv, kube = flaky
    srv.queue = [(429, {"Retry-After": "1"}), (503, {"Retry-After": "0"})]
    out = await kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"}})
    assert out["metadata"]["name"] == "p" and len(srv.requests) == 3  # POST retried: the server said so
    assert gaps(srv)[0] >= 0.95 and gaps(srv)[1] < 0.5


async def test_retry_after_http_date(flaky):
    srv, kube = flaky
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    srv.queue = [(503, {"Retry-After": email.utils.format_datetime(when, usegmt=True)})]
    await kube.get(PODS, "p", "n")
    assert len(srv.requests) == 2 and 0.9 <= gaps(srv)[0] <= 2.5  # a whole-second date: 1-2 s ahead


async def test_5xx_without_retry_after_retries_only_idempotent_requests(flaky):
    srv, kube = flaky
    srv.queue = [(500, {}), (502, {})]
    assert (await kube.get(PODS, "p", "n"))["metadata"]["name"] == "p"
    assert len(srv.requests) == 3 and all(g < 1.0 for g in gaps(srv))  # backoff, not Retry-After
    srv.requests.clear()
    srv.queue = [(500, {})]
    with pytest.raises(E.ServerError) as ei:  # a POST may have been carried out: not sent twice
        await kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"}})
    assert len(srv.requests) == 1 and (ei.value.status, ei.value.reason, ei.value.message) == (500, "R500", "m500")
    srv.requests.clear()
    srv.queue = [(500, {})]
    await kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"}})
    assert len(srv.requests) == 2  # server-side apply is idempotent


async def test_retries_are_bounded(flaky):
    srv, kube = flaky
    srv.queue = [(429, {"Retry-After": "0"})] * 10
    with pytest.raises(E.TooManyRequests):
        await kube.get(PODS, "p", "n")
    assert len(srv.requests) == kube.attempts == 5


@pytest.mark.parametrize("status,cls", [(400, E.BadRequest), (403, E.Forbidden), (404, E.NotFound),
                                        (409, E.Conflict), (410, E.Gone), (422, E.Invalid)])
async def test_answers_are_typed_and_not_retried(flaky, status, cls):
    srv, kube = flaky
    srv.queue = [(status, {})]
    with pytest.raises(cls) as ei:
        await kube.get(PODS, "p", "n")
    assert isinstance(ei.value, E.ApiError) and ei.value.status == status and len(srv.requests) == 1


async def test_no_answer_is_api_unavailable_chained(tmp_path):
    kc = tmp_path / "kc"
    with socket_bound() as port:  # a port nobody listens on
        kc.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "c"}}],
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "c", "user": {"token": "t"}}]}))
        async with KubeClient(KubeConfig.load(kc), timeout=2, attempts=3) as kube:
            t0 = time.monotonic()
            with pytest.raises(E.ApiUnavailable) as ei:
                await kube.get(PODS, "p", "n")
            assert isinstance(ei.value.__cause__, aiohttp.ClientError) and time.monotonic() - t0 < 5


def test_parse_retry_after():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert E.parse_retry_after("7") == 7.0 and E.parse_retry_after(None) is None
    assert E.parse_retry_after("Thu, 01 Jan 2026 00:00:05 GMT", now=now) == 5.0
    assert E.parse_retry_after("soon") is None


class socket_bound:
    """Reserve a loopback port with a bound but not listening socket: connections are refused."""

    def __enter__(self) -> int:
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.s.close()
