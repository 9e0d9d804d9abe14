"""Leader election on the real control plane: LeaderElector candidates on one Lease (under the
operator user, which has only the leader-election Role for leases), then two `vlmpool operator
--leader-elect` processes of which only the leader reconciles, and a takeover after SIGKILL."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest
from vlmtest.operator import BASE, after_more, free_port

from vlmpool.controller.leader import LeaderElectionError, LeaderElector, format_time, parse_time
from vlmpool.kube.client import DEPLOYMENTS, JOBS, LEASES, KubeClient
from vlmpool.kube.config import KubeConfig
from vlmpool.names import API_VERSION
from vlmpool.testing.waiting import wait_until

pytestmark = pytest.mark.apiserver

FAST = dict(lease_duration=3.0, renew_deadline=2.0, retry_period=0.5)
LEASE = "vlmpool-operator"


@pytest.fixture
async def clients(operator_kubeconfig):
    """Clients as the operator user (leases: get/create/update in the test namespace only)."""
    made: list[KubeClient] = []

    def make() -> KubeClient:
        c = KubeClient(KubeConfig.load(operator_kubeconfig), timeout=5)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


def record_attempts(elector: LeaderElector) -> list[tuple[float, bool, str | None]]:
    """Every round the candidate plays from now on: (monotonic time it started, won, the holder it saw).
    What a follower does while the leader renews is observed this way, round by round, not after a sleep."""
    rounds: list[tuple[float, bool, str | None]] = []
    play = elector.try_acquire_or_renew

    async def recorded() -> bool:
        started = time.monotonic()
        won = await play()
        rounds.append((started, won, elector.observed_holder))
        return won
    elector.try_acquire_or_renew = recorded  # type: ignore[method-assign]
    return rounds


async def refused_rounds(rounds: list[tuple[float, bool, str | None]], since: float, span: float) -> list:
    """Wait until the rounds started after `since` cover `span` seconds; returns them."""
    def covered():
        after = [r for r in rounds if r[0] > since]
        return after if after and after[-1][0] - since >= span else None
    return await wait_until(covered, timeout=span + 30, interval=0.1, what=f"rounds over {span:g}s")


async def _cancel(*tasks: asyncio.Task) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_exactly_one_leads_and_the_other_takes_over_after_expiry(clients, namespace, kube):
    a = LeaderElector(clients(), namespace, LEASE, "cand-a", **FAST)
    b = LeaderElector(clients(), namespace, LEASE, "cand-b", **FAST)
    rounds = {e.identity: record_attempts(e) for e in (a, b)}
    stop = asyncio.Event()
    ta, tb = asyncio.create_task(a.acquire(stop)), asyncio.create_task(b.acquire(stop))
    done, _pending = await asyncio.wait({ta, tb}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and next(iter(done)).result() is True
    leader, follower, follower_task = (a, b, tb) if ta in done else (b, a, ta)
    renewing = asyncio.create_task(leader.keep_leading())
    try:
        # The follower keeps trying through several lease durations while the leader renews, and
        # loses every round to the leader.
        played = await refused_rounds(rounds[follower.identity], time.monotonic(), 3 * FAST["lease_duration"])
        assert len(played) >= 3 and all(not won and seen == leader.identity for _, won, seen in played), played
        assert not follower_task.done() and not follower.is_leader and leader.is_leader
        lease = await kube.get(LEASES, LEASE, namespace)
        assert lease["spec"]["holderIdentity"] == leader.identity
        assert lease["spec"]["leaseTransitions"] == 0
        assert lease["spec"]["leaseDurationSeconds"] == 3
        first_acquire = lease["spec"]["acquireTime"]

        # The leader stops renewing without releasing (a crash): the follower takes over once the
        # lease has expired.
        await _cancel(renewing)
        assert await asyncio.wait_for(follower_task, 60) is True
        lease = await kube.get(LEASES, LEASE, namespace)
        assert lease["spec"]["holderIdentity"] == follower.identity
        assert lease["spec"]["leaseTransitions"] == 1
        assert parse_time(lease["spec"]["acquireTime"]) > parse_time(first_acquire)
        # The old holder, coming back, finds the lease held and renewed.
        assert await leader.try_acquire_or_renew() is False and leader.observed_holder == follower.identity
    finally:
        stop.set()
        await _cancel(renewing, ta, tb)


async def test_a_released_lease_is_taken_at_once(clients, namespace, kube):
    slow = dict(lease_duration=60.0, renew_deadline=10.0, retry_period=0.5)
    a = LeaderElector(clients(), namespace, LEASE, "cand-a", **slow)
    b = LeaderElector(clients(), namespace, LEASE, "cand-b", **slow)
    assert await a.acquire() is True
    b_rounds = record_attempts(b)
    stop = asyncio.Event()
    tb = asyncio.create_task(b.acquire(stop))
    try:
        # b tries and loses to a (a holds a 60 s lease) round after round
        await wait_until(lambda: len(b_rounds) >= 3, timeout=30, what="three rounds of b")
        assert all(not won and seen == "cand-a" for _, won, seen in b_rounds), b_rounds
        assert not tb.done()
        assert await a.release() is True and not a.is_leader
        released = (await kube.get(LEASES, LEASE, namespace))["spec"]
        assert not released.get("holderIdentity") and released["leaseDurationSeconds"] == 1
        # Well before the 60 s lease could have expired, b holds it.
        assert await asyncio.wait_for(tb, 30) is True
        lease = (await kube.get(LEASES, LEASE, namespace))["spec"]
        assert lease["holderIdentity"] == "cand-b" and lease["leaseDurationSeconds"] == 60
        assert lease["leaseTransitions"] == 1
        # Releasing what one does not hold changes nothing.
        assert await a.release() is False
        assert (await kube.get(LEASES, LEASE, namespace))["spec"]["holderIdentity"] == "cand-b"
    finally:
        stop.set()
        await _cancel(tb)


class StaleReads(KubeClient):
    """Answers GETs of the Lease with a copy read earlier: its writes then carry an outdated
    resourceVersion, as when another candidate wrote between this one's read and its write."""

    stale: dict | None = None

    async def get_or_none(self, res, name, namespace=None):
        if res is LEASES and self.stale is not None:
            return self.stale
        return await super().get_or_none(res, name, namespace)


async def test_a_write_race_is_lost_with_409_not_won_twice(operator_kubeconfig, clients, namespace, kube):
    # An expired lease of a vanished holder.
    old = format_time(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    await kube.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": LEASE, "namespace": namespace},
                       "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 3, "acquireTime": old,
                                "renewTime": old, "leaseTransitions": 4}}, namespace, LEASES)
    racer_kube = StaleReads(KubeConfig.load(operator_kubeconfig), timeout=5)
    try:
        racer_kube.stale = await racer_kube.get_or_none(LEASES, LEASE, namespace)
        racer = LeaderElector(racer_kube, namespace, LEASE, "racer", **FAST)
        winner = LeaderElector(clients(), namespace, LEASE, "winner", **FAST)
        assert await winner.try_acquire_or_renew() is True
        # The racer also saw the lease expired, but its PUT carries the old resourceVersion: 409.
        assert await racer.try_acquire_or_renew() is False
        lease = (await kube.get(LEASES, LEASE, namespace))["spec"]
        assert lease["holderIdentity"] == "winner" and lease["leaseTransitions"] == 5
    finally:
        await racer_kube.close()

    # Many candidates at once on a fresh lease: exactly one wins.
    await kube.delete(LEASES, LEASE, namespace)
    many = [LeaderElector(clients(), namespace, LEASE, f"c{i}", **FAST) for i in range(5)]
    results = await asyncio.gather(*(c.try_acquire_or_renew() for c in many))
    assert sum(results) == 1
    holder = (await kube.get(LEASES, LEASE, namespace))["spec"]["holderIdentity"]
    assert holder == many[results.index(True)].identity


async def test_a_leader_that_sees_another_holder_stops_leading(clients, namespace, kube):
    a = LeaderElector(clients(), namespace, LEASE, "cand-a", **FAST)
    changes: list[bool] = []
    a.on_change = changes.append
    assert await a.acquire() is True
    renewing = asyncio.create_task(a.keep_leading())
    try:
        lease = await kube.get(LEASES, LEASE, namespace)
        now = format_time(dt.datetime.now(dt.UTC))
        lease["spec"].update(holderIdentity="intruder", renewTime=now, leaseDurationSeconds=600)
        await kube.request("PUT", LEASES.path(namespace, LEASE), body=lease)
        await asyncio.wait_for(renewing, 30)
        assert not a.is_leader and changes == [True, False]
        assert (await kube.get(LEASES, LEASE, namespace))["spec"]["holderIdentity"] == "intruder"
    finally:
        await _cancel(renewing)


def test_settings_are_checked():
    with pytest.raises(LeaderElectionError, match="greater than the renew deadline"):
        LeaderElector(None, "ns", "x", "me", lease_duration=5, renew_deadline=5, retry_period=1)
    with pytest.raises(LeaderElectionError, match="greater than the retry period"):
        LeaderElector(None, "ns", "x", "me", lease_duration=15, renew_deadline=2, retry_period=2)
    with pytest.raises(LeaderElectionError, match="must not be empty"):
        LeaderElector(None, "", "x", "me")


# ---- two operator processes -------------------------------------------------------------------------

def pool_obj(name: str, admin_port: int) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": name},
            "spec": {"model": {"name": BASE, "family": "qwen2_5_vl"}, "replicas": 0,
                     "proxy": {"adminPort": admin_port}}}


def adapter_obj(name: str, pool: str, uri: str) -> dict:
    return {"apiVersion": API_VERSION, "kind": "VLMAdapter", "metadata": {"name": name},
            "spec": {"poolRef": {"name": pool}, "source": {"uri": uri}}}


async def patch_jobs(kube, ns, adapter):
    return await kube.list(JOBS, ns, label_selector=f"vlmpool.io/adapter={adapter}")


def _le_args(namespace: str, identity: str) -> tuple[str, ...]:
    return ("--leader-elect", "--leader-election-namespace", namespace, "--leader-election-identity", identity,
            "--lease-duration", "3", "--renew-deadline", "2", "--retry-period", "0.5")


def _gauge(metrics: str, name: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def _holder(kube, ns):
    lease = await kube.get_or_none(LEASES, LEASE, ns)
    return (lease or {}).get("spec", {}).get("holderIdentity")


async def test_two_operators_one_leader_reconciles_and_a_follower_takes_over(kube, namespace, operator, tmp_path):
    ns = namespace
    ops = {name: await operator(extra_args=_le_args(ns, name), log_name=f"{name}.log") for name in ("op-1", "op-2")}
    leader_name = await wait_until(lambda: _holder(kube, ns), what="a lease holder")
    assert leader_name in ops
    follower_name = next(n for n in ops if n != leader_name)
    leader, follower = ops[leader_name], ops[follower_name]

    async def gauges_settled():
        return (_gauge(await leader.metrics(), "vlmpool_operator_leader") == 1
                and _gauge(await leader.metrics(), "vlmpool_operator_ready") == 1)
    await wait_until(gauges_settled, what="the leader's metrics")
    fm = await follower.metrics()
    assert _gauge(fm, "vlmpool_operator_leader") == 0 and _gauge(fm, "vlmpool_operator_ready") == 0

    # Only the leader reconciles: the pool's Deployment is created once, by the leader.
    await kube.create(pool_obj("vision", free_port()), ns)
    dep = await wait_until(lambda: kube.get(DEPLOYMENTS, "vision", ns), what="the Deployment")
    managers = {m["manager"] for m in dep["metadata"]["managedFields"]}
    assert "vlmpool-operator" in managers
    # The leader renews the Lease 4 more times: the follower, retrying every 0.5 s, found it held throughout
    # and (below) has reconciled nothing by then.
    await lease_renewed(kube, ns, leader_name, 4)
    dep2 = await kube.get(DEPLOYMENTS, "vision", ns)
    assert dep2["metadata"]["uid"] == dep["metadata"]["uid"]
    assert "vlmpool operator starting" in leader.tail(100_000)
    follower_log = follower.tail(100_000)
    assert "vlmpool operator starting" not in follower_log and "vision" not in follower_log
    assert (await follower.metrics()).count('vlmpool_operator_reconciles_total{kind="pool"') == 0

    # SIGKILL the leader (no release): the follower takes over after the lease expires.
    leader.kill()
    await wait_until(lambda: _holder_is(kube, ns, follower_name), timeout=60, what="the follower to take over")

    async def follower_leads():
        m = await follower.metrics()
        return _gauge(m, "vlmpool_operator_leader") == 1 and _gauge(m, "vlmpool_operator_ready") == 1
    await wait_until(follower_leads, timeout=60, what="the new leader's metrics")
    lease = (await kube.get(LEASES, LEASE, ns))["spec"]
    assert lease["leaseTransitions"] >= 1

    # It reconciles: a new adapter gets exactly one patch Job.
    await kube.create(adapter_obj("ad", "vision", f"file://{tmp_path}/ad"), ns)
    (_job,) = await wait_until(lambda: patch_jobs(kube, ns, "ad"), what="the adapter's patch Job")
    # It reconsiders the adapter twice more and makes no second Job.
    await after_more(follower, "vlmpool_operator_reconciles_total", 2, kind="adapter")
    assert len(await patch_jobs(kube, ns, "ad")) == 1

    # A clean stop releases the lease at once.
    follower.stop()
    assert follower.log_path.exists()
    spec = (await kube.get(LEASES, LEASE, ns))["spec"]
    assert not spec.get("holderIdentity") and spec["leaseDurationSeconds"] == 1


async def lease_renewed(kube, ns, holder: str, times: int) -> None:
    """Wait until `holder` has renewed the Lease `times` more times, holding it all along."""
    seen: set[str] = set()

    async def renewed() -> bool:
        spec = (await kube.get(LEASES, LEASE, ns))["spec"]
        assert spec.get("holderIdentity") == holder, f"the lease went to {spec.get('holderIdentity')}"
        seen.add(spec["renewTime"])
        return len(seen) > times
    await wait_until(renewed, timeout=30, interval=0.1, what=f"{times} renewals of the lease by {holder}")


async def _holder_is(kube, ns, name):
    return await _holder(kube, ns) == name


async def test_a_leader_that_loses_the_lease_exits_non_zero(kube, namespace, operator):
    ns = namespace
    op = await operator(extra_args=_le_args(ns, "solo"), log_name="solo.log")
    await wait_until(lambda: _holder_is(kube, ns, "solo"), what="solo to lead")
    lease = await kube.get(LEASES, LEASE, ns)
    lease["spec"].update(holderIdentity="usurper", renewTime=format_time(dt.datetime.now(dt.UTC)),
                         leaseDurationSeconds=600)
    await kube.request("PUT", LEASES.path(ns, LEASE), body=lease)

    async def exited():
        return op.proc.poll() is not None
    await wait_until(exited, timeout=60, what="the operator to exit")
    assert op.proc.returncode == 1
    assert "lost the leader-election lease" in op.tail()
