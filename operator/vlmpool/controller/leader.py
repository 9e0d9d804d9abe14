"""Lease-based leader election (coordination.k8s.io/v1), as client-go's leaderelection package does it.

Several operator replicas share one Lease object. The holder renews ``spec.renewTime`` every retry
period; another replica takes the Lease only when it is absent, released (no holder) or expired
(``renewTime + leaseDurationSeconds`` is in the past). Every write is a PUT carrying the
``metadata.resourceVersion`` that was read, so when two replicas race, the apiserver accepts one and
answers the other 409 Conflict: that one lost the race and tries again one retry period later.

A leader that cannot renew for longer than the renew deadline (or sees another holder in the
Lease) stops leading; the operator then stops kopf and exits non-zero, and the Deployment restarts
it as a follower (what controller-runtime does). On a clean shutdown the leader releases the Lease
(clears ``holderIdentity``, ``leaseDurationSeconds: 1``) so a successor takes over at once.

The renew deadline must be shorter than the lease duration: a leader that has not renewed for the
renew deadline gives up before anyone else may consider the Lease expired.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from vlmpool.kube.client import LEASES, Conflict, KubeClient

log = logging.getLogger("vlmpool.leader")

MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"


class LeaderElectionError(ValueError):
    """Invalid leader-election settings."""


def check_timings(lease_duration: float, renew_deadline: float, retry_period: float) -> None:
    """lease duration > renew deadline > retry period > 0, else LeaderElectionError."""
    if retry_period <= 0 or renew_deadline <= 0 or lease_duration <= 0:
        raise LeaderElectionError("lease duration, renew deadline and retry period must be > 0")
    if lease_duration <= renew_deadline:
        raise LeaderElectionError(
            f"the lease duration ({lease_duration:g}s) must be greater than the renew deadline "
            f"({renew_deadline:g}s)")
    if renew_deadline <= retry_period:
        raise LeaderElectionError(
            f"the renew deadline ({renew_deadline:g}s) must be greater than the retry period "
            f"({retry_period:g}s)")


def default_identity() -> str:
    """The pod name ($POD_NAME, from the downward API), else hostname plus a random suffix (two
    processes on one host must not share an identity)."""
    pod = os.environ.get("POD_NAME", "").strip()
    if pod:
        return pod
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def format_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime(MICROTIME)


def parse_time(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    s = s.strip()
    for fmt in (MICROTIME, "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(s, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
    try:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    """One candidate for one Lease. ``await acquire()`` blocks until this candidate leads (or the stop
    event is set); ``await keep_leading()`` renews until leadership is lost and then returns;
    ``await release()`` gives the Lease up."""

    def __init__(self, kube: KubeClient, namespace: str, name: str, identity: str | None = None, *,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 on_change: Callable[[bool], None] | None = None):
        if not name:
            raise LeaderElectionError("the lease name must not be empty")
        if not namespace:
            raise LeaderElectionError("the lease namespace must not be empty")
        check_timings(lease_duration, renew_deadline, retry_period)
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_change = on_change
        self.observed_holder: str | None = None
        self._leading = False
        self._last_renew = 0.0  # monotonic time of the last successful acquire/renew

    # ---- state -------------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self._leading

    def _set_leading(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            log.info("%s %s lease %s/%s", self.identity, "acquired" if leading else "lost",
                     self.namespace, self.name)
            if self.on_change is not None:
                self.on_change(leading)

    def _expired(self, spec: dict[str, Any], now: dt.datetime) -> bool:
        renew = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
        if renew is None:
            return True
        duration = spec.get("leaseDurationSeconds") or self.lease_duration
        return renew + dt.timedelta(seconds=float(duration)) < now

    def _lease_body(self, spec: dict[str, Any], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        meta = {"name": self.name, "namespace": self.namespace}
        if metadata is not None:
            meta = {**metadata}
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    # ---- one attempt -------------------------------------------------------------------------------
    async def try_acquire_or_renew(self) -> bool:
        """One round: create the Lease, take it over (expired or released) or renew it (ours).
        True when this candidate holds the Lease afterwards. Conflicts (409) answer False; other API
        errors propagate."""
        now = _utcnow()
        lease = await self.kube.get_or_none(LEASES, self.name, self.namespace)
        duration = max(1, round(self.lease_duration))
        if lease is None:
            spec: dict[str, Any] = {"holderIdentity": self.identity, "leaseDurationSeconds": duration,
                                    "acquireTime": format_time(now), "renewTime": format_time(now),
                                    "leaseTransitions": 0}
            try:
                await self.kube.create(self._lease_body(spec), self.namespace, LEASES)
            except Conflict:  # another candidate created it first
                return False
            self.observed_holder = self.identity
            return True
        spec = dict(lease.get("spec") or {})
        holder = spec.get("holderIdentity") or ""
        self.observed_holder = holder or None
        if holder and holder != self.identity and not self._expired(spec, now):
            return False
        new = {**spec, "holderIdentity": self.identity, "leaseDurationSeconds": duration,
               "renewTime": format_time(now)}
        if holder != self.identity:
            new["acquireTime"] = format_time(now)
            new["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        meta = lease["metadata"]
        body = self._lease_body(new, {"name": self.name, "namespace": self.namespace,
                                      "resourceVersion": meta["resourceVersion"]})
        try:
            await self.kube.request("PUT", LEASES.path(self.namespace, self.name), body=body,
                                    params={"fieldManager": self.kube.field_manager})
        except Conflict:  # someone wrote the Lease since we read it: lost this round
            log.debug("%s: lease %s/%s changed under us (409)", self.identity, self.namespace, self.name)
            return False
        self.observed_holder = self.identity
        return True

    # ---- loops -------------------------------------------------------------------------------------
    async def _sleep(self, stop: asyncio.Event | None) -> bool:
        """Wait one retry period (with a little jitter, as client-go); True when stop was set."""
        delay = self.retry_period * (1 + random.uniform(0, 0.2))
        if stop is None:
            await asyncio.sleep(delay)
            return False
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return True
        except TimeoutError:
            return False

    async def _attempt(self) -> bool:
        try:
            return await asyncio.wait_for(self.try_acquire_or_renew(), timeout=self.renew_deadline)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreachable apiserver is retried like a conflict
            log.warning("%s: lease %s/%s: %s: %s", self.identity, self.namespace, self.name, type(e).__name__, e)
            return False

    async def acquire(self, stop: asyncio.Event | None = None) -> bool:
        """Try every retry period until this candidate holds the Lease (True) or stop is set (False)."""
        logged = False
        while True:
            if stop is not None and stop.is_set():
                return False
            if await self._attempt():
                self._last_renew = time.monotonic()
                self._set_leading(True)
                return True
            if not logged and self.observed_holder:
                log.info("%s: waiting for lease %s/%s (held by %s)", self.identity, self.namespace, self.name,
                         self.observed_holder)
                logged = True
            if await self._sleep(stop):
                return False

    async def keep_leading(self) -> None:
        """Renew every retry period; return when leadership is lost: renewals failed for longer than
        the renew deadline, or the Lease names another holder."""
        if not self._leading:
            raise RuntimeError("keep_leading() before acquire()")
        try:
            while True:
                await self._sleep(None)
                if await self._attempt():
                    self._last_renew = time.monotonic()
                    continue
                if self.observed_holder and self.observed_holder != self.identity:
                    log.error("%s: lease %s/%s is now held by %s", self.identity, self.namespace, self.name,
                              self.observed_holder)
                    return
                if time.monotonic() - self._last_renew > self.renew_deadline:
                    log.error("%s: could not renew lease %s/%s for %.1fs (renew deadline %.1fs)", self.identity,
                              self.namespace, self.name, time.monotonic() - self._last_renew, self.renew_deadline)
                    return
        finally:
            self._set_leading(False)

    async def release(self) -> bool:
        """Give the Lease up if we hold it: no holder, leaseDurationSeconds 1, so the next candidate
        takes it on its next try. True when released."""
        try:
            lease = await asyncio.wait_for(self.kube.get_or_none(LEASES, self.name, self.namespace),
                                           timeout=self.renew_deadline)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return False
            now = format_time(_utcnow())
            spec = {**lease["spec"], "leaseDurationSeconds": 1, "renewTime": now, "acquireTime": now}
            spec.pop("holderIdentity", None)
            body = self._lease_body(spec, {"name": self.name, "namespace": self.namespace,
                                           "resourceVersion": lease["metadata"]["resourceVersion"]})
            await asyncio.wait_for(self.kube.request("PUT", LEASES.path(self.namespace, self.name), body=body,
                                                     params={"fieldManager": self.kube.field_manager}),
                                   timeout=self.renew_deadline)
            log.info("%s released lease %s/%s", self.identity, self.namespace, self.name)
            return True
        except Exception as e:  # noqa: BLE001 - best effort: the Lease then expires on its own
            log.warning("%s: releasing lease %s/%s failed: %s", self.identity, self.namespace, self.name, e)
            return False
        finally:
            self._set_leading(False)
