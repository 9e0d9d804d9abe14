"""Pushing a pool's desired state to the proxies of its running pods, and following their progress.

One push sends the full state (generation, concurrency, load parallelism, ready adapters) to every
running pod's admin port, in parallel with a bound on concurrency and a timeout per pod. The proxy
accepts it at once (202) and converges in the background; its answer, and later answers to a long poll
of ``GET /admin/v1/state?wait=S&generation=G``, say per adapter whether it is pending, loading, loaded
or failed; those become the adapters' per-pod status.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import ValidationError

from vlmpool.adminwire import StateSnapshot
from vlmpool.manifests.pool import ENGINE_CONTAINER, PROXY_CONTAINER

ADMIN_STATE_PATH = "/admin/v1/state"


@dataclass
class PodResult:
    """Outcome of pushing to one pod."""

    pod: str
    ok: bool
    generation: int | None = None
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)  # served name -> {version, state, reason}
    error: str | None = None
    conflict_generation: int | None = None  # set on 409: the generation the proxy already has
    # served name -> versions the proxy retired but has not confirmed unloaded; None: not reported
    unloading: dict[str, set[str]] | None = None
    seconds: float = 0.0
    converged: bool = True  # the proxy finished converging to `generation` (False: loads queued or running)


def pod_is_pushable(pod: dict[str, Any]) -> bool:
    """A pod can take a push once it runs and has an IP (its proxy container started)."""
    st = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or st.get("phase") != "Running" or not st.get("podIP"):
        return False
    for cs in st.get("containerStatuses") or []:
        if cs.get("name") == PROXY_CONTAINER:
            return "running" in (cs.get("state") or {})
    return True  # no container statuses reported: trust the phase


def pod_fingerprint(pod: dict[str, Any]) -> str:
    """Changes whenever the pod's proxy or engine (re)starts: a new push is then needed."""
    st = pod.get("status") or {}
    parts = [pod["metadata"].get("uid", ""), st.get("podIP", "")]
    for cs in sorted(st.get("containerStatuses") or [], key=lambda c: c.get("name", "")):
        if cs.get("name") in (PROXY_CONTAINER, ENGINE_CONTAINER):
            running = (cs.get("state") or {}).get("running") or {}
            parts += [cs["name"], str(cs.get("restartCount", 0)), cs.get("containerID", ""),
                      running.get("startedAt", "")]
    return "|".join(parts)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _result(name: str, status: int, text: str, dt: float, sent_generation: int) -> PodResult:
    """A PodResult from the proxy's answer to a PUT (200/202/409) or a GET (200) of its state
    (adminwire.StateSnapshot; an answer that is not one is a failed push, with why)."""
    if status not in (200, 202, 409):
        return PodResult(name, False, error=f"HTTP {status}: {text[:300]}", seconds=dt)
    try:
        snap = StateSnapshot.model_validate_json(text or "{}")
    except ValidationError as e:
        return PodResult(name, False, error=f"HTTP {status}: not a state answer: {str(e)[:300]}", seconds=dt)
    if status == 409:
        return PodResult(name, False, error=f"proxy has a newer generation {snap.generation}",
                         conflict_generation=snap.generation, seconds=dt)
    adapters = {a.name: a.wire() for a in snap.adapters}
    unloading: dict[str, set[str]] | None = None
    if snap.unloading is not None:
        unloading = {}
        for u in snap.unloading:
            unloading.setdefault(u.name, set()).add(u.version)
    # a proxy without the converged field answered synchronously (it converged before answering)
    converged = (snap.converged if snap.converged is not None else status == 200) and snap.generation == sent_generation
    return PodResult(name, True, snap.generation, adapters, seconds=dt, unloading=unloading, converged=converged)


async def _call(session: aiohttp.ClientSession, method: str, pod: dict[str, Any], admin_port: int, token: str,
                generation: int, timeout: float, **kw: Any) -> PodResult:
    name = pod["metadata"]["name"]
    url = f"http://{_host(pod['status']['podIP'])}:{admin_port}{ADMIN_STATE_PATH}"
    t0 = time.monotonic()
    try:
        headers = {"Authorization": f"Bearer {token}", "X-Request-Id": f"vlmpool-operator-push-{generation}"}
        async with session.request(method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout),
                                   **kw) as resp:
            return _result(name, resp.status, await resp.text(), time.monotonic() - t0, generation)
    except TimeoutError:
        return PodResult(name, False, error=f"timed out after {timeout:g}s", seconds=time.monotonic() - t0)
    except aiohttp.ClientError as e:
        return PodResult(name, False, error=f"{type(e).__name__}: {e}"[:300], seconds=time.monotonic() - t0)


async def push_to_pod(session: aiohttp.ClientSession, pod: dict[str, Any], admin_port: int, token: str,
                      state: dict[str, Any], timeout: float) -> PodResult:
    return await _call(session, "PUT", pod, admin_port, token, state["generation"], timeout, json=state)


async def poll_pod(session: aiohttp.ClientSession, pod: dict[str, Any], admin_port: int, token: str,
                   generation: int, wait: float, timeout: float) -> PodResult:
    """Long poll: the proxy answers once `generation` converged, or after `wait` seconds."""
    return await _call(session, "GET", pod, admin_port, token, generation, timeout + wait,
                       params={"wait": f"{wait:g}", "generation": str(generation)})


async def push_to_pods(pods: list[dict[str, Any]], admin_port: int, token: str, state: dict[str, Any], *,
                       timeout: float = 10.0, parallelism: int = 16,
                       session: aiohttp.ClientSession | None = None, poll_wait: float | None = None) -> list[PodResult]:
    """PUT `state` to every pod; with `poll_wait`, GET their progress towards state["generation"] instead
    (a long poll of at most that many seconds), and PUT to a pod whose proxy reports an older generation
    (it restarted)."""
    sem = asyncio.Semaphore(max(1, parallelism))
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async def one(pod: dict[str, Any]) -> PodResult:
            async with sem:
                if poll_wait is not None:
                    r = await poll_pod(session, pod, admin_port, token, state["generation"], poll_wait, timeout)
                    if not r.ok or (r.generation is not None and r.generation >= state["generation"]):
                        return r
                return await push_to_pod(session, pod, admin_port, token, state, timeout)

        return list(await asyncio.gather(*(one(p) for p in pods)))
    finally:
        if own:
            await session.close()
