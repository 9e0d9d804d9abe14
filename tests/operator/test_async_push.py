"""The asynchronous push seen from the operator (issue 12), on the real control plane with real proxy +
simulator processes: the operator follows a slow convergence and writes per-adapter, per-pod progress;
a proxy restarted mid-convergence ends converged; patch Jobs stay within --max-patch-jobs and start in
the adapters' creation order, namespaces taking turns. Not timed: every wait has a deadline."""

from __future__ import annotations

import aiohttp
import pytest
from test_adapter import adapter_obj, complete_patch, ok_message, patch_jobs, pool_obj, start_pool_pods
from vlmtest.operator import (
    admin_state,
    after_more,
    free_port,
    now,
    report_terminated,
    wait_job_condition,
    wait_job_pod,
    write_adapter,
)

from vlmpool.kube.client import JOBS, VLMADAPTERS
from vlmpool.testing.waiting import wait_until

pytestmark = pytest.mark.apiserver

N = 10
LOAD_MS = 600


async def sim_stats(ip: str, engine_port: int) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"http://{ip}:{engine_port}/sim/stats") as r:
        assert r.status == 200
        return await r.json()


async def statuses(kube, ns):
    return {a["metadata"]["name"]: a.get("status") or {} for a in await kube.list(VLMADAPTERS, ns)}


async def test_operator_follows_a_slow_convergence_and_a_restarted_proxy(kube, namespace, operator, adapter_root,
                                                                         tmp_path, pod_processes):
    ns = namespace
    # a long resync: progress after a push comes from the operator following the convergence
    await operator(resync=60, extra_args=("--progress-wait", "0.5", "--max-patch-jobs", str(N)))
    admin_port, engine_port = free_port(), free_port()
    pool = pool_obj("slow", 1, admin_port, engine_port, free_port())
    pool["spec"]["engine"].update(loadParallelism=1, extraArgs=["--lora-load-ms", str(LOAD_MS)])
    await kube.create(pool, ns)
    token, ips = await start_pool_pods(kube, ns, "slow", 1, tmp_path, pod_processes)
    ip = next(iter(ips.values()))
    await wait_until(lambda: admin_state(ip, admin_port, token), what="the first push")

    # N adapters, all patched at once (their Jobs played here): one push wants N slow loads, 1 at a time
    names = [f"ad{i}" for i in range(N)]
    for n in names:
        await kube.create(adapter_obj(n, "slow", f"file://{tmp_path}/src"), ns)
    jobs = {}
    for n in names:
        jobs[n] = (await wait_until(lambda n=n: patch_jobs(kube, ns, n), what=f"{n}'s Job"))[0]["metadata"]["name"]
    for i, n in enumerate(names):
        pod = await wait_job_pod(kube, ns, jobs[n])
        write_adapter(adapter_root / n / "versions" / "00000001", seed=i)
        await report_terminated(kube, pod, 0, ok_message(adapter_root, n, "00000001"))
    for n in names:
        await wait_job_condition(kube, ns, jobs[n], "Complete")

    # per-adapter progress in status while the proxy converges: some Ready, some still queued or loading
    async def mixed():
        st = await statuses(kube, ns)
        ready = [n for n in names if st[n].get("phase") == "Ready"]
        waiting = [n for n in names if (st[n].get("pods") or [{}])[0].get("state") in ("pending", "loading")
                   and "on the proxy" in (st[n]["pods"][0].get("message") or "")]
        return (ready, waiting, st) if ready and waiting else None

    ready, waiting, st = await wait_until(mixed, timeout=60, interval=0.1, what="a partly converged pool")
    w = st[waiting[0]]
    assert w["phase"] == "Registering" and w["loaded"] == "0/1"
    assert st[ready[0]]["loaded"] == "1/1" and st[ready[0]]["pods"][0]["state"] == "loaded"

    # the proxy restarts mid-convergence (the kubelet has not reported it): the operator finds the proxy
    # without its generation and pushes again; the pool ends converged
    proxy_state = await admin_state(ip, admin_port, token)
    assert not proxy_state["converged"] and proxy_state["counts"]["loaded"] < N
    pod_processes[0].restart(1)

    async def all_ready():
        st = await statuses(kube, ns)
        return st if all(st[n].get("phase") == "Ready" and st[n].get("loaded") == "1/1" for n in names) else None

    # liveness, not speed (N slow loads after the restart; CI shares two cores with other suites)
    await wait_until(all_ready, timeout=120, interval=0.3, what="every adapter Ready after the restart")
    final = await wait_until(lambda: admin_state(ip, admin_port, token), what="the restarted proxy's state")
    assert final["converged"] and final["counts"]["loaded"] == N
    stats = await sim_stats(ip, engine_port)
    internals = sorted(f"{n}@00000001" for n in names)
    assert sorted(stats["loaded_adapters"]) == internals
    assert stats["adapter_disk_loads"] == {i: 1 for i in internals}  # nothing loaded twice


async def test_patch_jobs_stay_within_the_bound_in_creation_order(kube, namespace, operator, adapter_root, tmp_path):
    ns = namespace
    bound = 2
    await kube.create(pool_obj("jobs", 0, free_port(), free_port(), free_port()), ns)
    # created one per second (creationTimestamp has seconds) against the names' order, all before the
    # operator starts: it meets them in list (name) order and must still start them oldest first
    names = [f"q{i}" for i in reversed(range(5))]
    for n in names:
        created = await kube.create(adapter_obj(n, "jobs", f"file://{tmp_path}/src"), ns)
        async def next_second(c=created):
            return now() > c["metadata"]["creationTimestamp"]

        await wait_until(next_second, interval=0.05, what="the next second")
    op = await operator(extra_args=("--max-patch-jobs", str(bound)))

    async def unfinished():
        # a Job holds its slot until its pod succeeded (status.succeeded) or it is Complete/Failed
        jobs = await kube.list(JOBS, ns, label_selector="app.kubernetes.io/component=patch")
        return [j for j in jobs if not (j.get("status") or {}).get("succeeded") and not any(
            c.get("type") in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget") and c.get("status") == "True"
            for c in (j.get("status") or {}).get("conditions") or [])]

    def adapter_of(job):
        return job["metadata"]["labels"]["vlmpool.io/adapter"]

    started: list[str] = []
    before_admission: dict[str, str] = {}  # the queued adapters' resourceVersions one step earlier
    for step in range(len(names)):
        # the next ones in line get a Job (at most `bound` unfinished), the rest say they are queued
        want = min(bound, len(names) - step)
        alive = await wait_until(lambda want=want: _exactly(unfinished(), want), timeout=60,
                                 what=f"{want} unfinished patch Jobs")
        started += sorted((adapter_of(j) for j in alive if adapter_of(j) not in started), key=names.index)
        assert started == names[:len(started)], started  # FIFO by creation (Jobs that start together: any order)
        queued = names[step + want:]
        if queued:
            async def said_queued(queued=queued):
                st = await statuses(kube, ns)
                conds = {n: next((c for c in st[n].get("conditions") or [] if c["type"] == "Patched"), {})
                         for n in queued}
                return conds if all(c.get("reason") == "PatchJobQueued" for c in conds.values()) else None

            conds = await wait_until(said_queued, timeout=30, what="the queued adapters' condition")
            assert f"waiting for one of the {bound} patch Job slots" in conds[queued[-1]]["message"]
            assert (await kube.get(VLMADAPTERS, queued[0], ns))["status"]["phase"] == "Patching"
            versions = {n: (await kube.get(VLMADAPTERS, n, ns))["metadata"]["resourceVersion"] for n in queued}
            if step == 2:
                # An admission went by (step 1's Job finished; step 0's first push has given every
                # adapter its loaded counts): the adapters still in line are reconciled again by their
                # resync and their status is not rewritten (a place in line in the message would be:
                # N queued adapters x every resync).
                await after_more(op, "vlmpool_operator_reconciles_total", by=2 * len(queued),
                                 kind="adapter", result="queued")
                after = {n: (await kube.get(VLMADAPTERS, n, ns))["metadata"]["resourceVersion"] for n in queued}
                assert after == versions and before_admission.items() >= versions.items(), \
                    (before_admission, versions, after)
            before_admission = versions
        # finish the oldest running Job: the next adapter in line gets its slot
        first = next(j for j in alive if adapter_of(j) == started[step])
        await complete_patch(kube, ns, first["metadata"]["name"], adapter_root, started[step], "00000001", seed=step)
        assert len(await unfinished()) <= bound
    assert started == names
    await wait_until(lambda: _exactly(unfinished(), 0), what="every Job finished")


async def _exactly(coro, n, bound=2):
    items = await coro
    assert len(items) <= bound, [j["metadata"]["name"] for j in items]  # never over the bound
    return (items or True) if len(items) == n else None  # True: none, as wanted


async def test_a_succeeded_patch_pod_is_recorded_before_its_job_completes_and_the_job_frees_its_slot(
        kube, namespace, operator, adapter_root, tmp_path, control_plane):
    """The Job controller marks a Job Complete up to a second after its pod succeeded (it batches pod
    updates); the operator records the result from the pod at once. With the controller manager
    paused, the Job cannot complete, so a recorded version can only come from the pod. Once the Job
    completes, its slot of --max-patch-jobs goes to the next adapter in line by the Job watch alone
    (the resync is far away)."""
    ns = namespace
    await kube.create(pool_obj("fast", 0, free_port(), free_port(), free_port()), ns)
    await operator(resync=600, extra_args=("--max-patch-jobs", "1"))
    await kube.create(adapter_obj("first", "fast", f"file://{tmp_path}/src"), ns)
    job = (await wait_until(lambda: patch_jobs(kube, ns, "first"), what="first's patch Job"))[0]
    pod = await wait_job_pod(kube, ns, job["metadata"]["name"])
    await kube.create(adapter_obj("second", "fast", f"file://{tmp_path}/src"), ns)

    async def queued():
        st = (await statuses(kube, ns)).get("second") or {}
        return any(c["type"] == "Patched" and c.get("reason") == "PatchJobQueued" for c in st.get("conditions") or [])

    await wait_until(queued, what="second queued behind first's Job")
    write_adapter(adapter_root / "first" / "versions" / "00000001")
    with control_plane.paused("kube-controller-manager"):
        await report_terminated(kube, pod, 0, ok_message(adapter_root, "first", "00000001"))

        async def recorded():
            st = (await statuses(kube, ns))["first"]
            return st if st.get("version") == "00000001" else None

        st = await wait_until(recorded, timeout=30, what="first's version recorded from its pod")
        patched = next(c for c in st["conditions"] if c["type"] == "Patched")
        assert patched["status"] == "True", patched
        conds = (await kube.get(JOBS, job["metadata"]["name"], ns)).get("status", {}).get("conditions") or []
        assert not [c for c in conds if c["type"] in ("Complete", "SuccessCriteriaMet")], conds
        assert await patch_jobs(kube, ns, "second") == []  # the unfinished Job still holds the only slot
    await wait_job_condition(kube, ns, job["metadata"]["name"], "Complete")
    await wait_until(lambda: patch_jobs(kube, ns, "second"), timeout=30, what="second's Job after first's completed")


async def test_patch_slots_are_shared_fairly_between_namespaces(kube, namespace, other_namespace, operator,
                                                                adapter_root, tmp_path):
    """One tenant's burst does not stall another tenant's patching (issue 23): with --max-patch-jobs 2,
    namespace A queues five adapters first and holds both slots (a namespace alone uses every slot);
    then B queues one. The next slot that frees goes to B's adapter, while A's queue still waits;
    within A, adapters keep their creation order."""
    a, b = namespace, other_namespace
    await kube.create(pool_obj("pa", 0, free_port(), free_port(), free_port()), a)
    await kube.create(pool_obj("pb", 0, free_port(), free_port(), free_port()), b)
    names_a = [f"a{i}" for i in range(5)]
    for n in names_a:
        await kube.create(adapter_obj(n, "pa", f"file://{tmp_path}/src"), a)
    await operator(extra_args=("--max-patch-jobs", "2", "--namespace", b))

    async def alive():
        return {(ns, j["metadata"]["labels"]["vlmpool.io/adapter"]): j for ns in (a, b)
                for j in await kube.list(JOBS, ns, label_selector="app.kubernetes.io/component=patch")
                if not (j.get("status") or {}).get("succeeded") and not any(
                    c.get("type") in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")
                    and c.get("status") == "True" for c in (j.get("status") or {}).get("conditions") or [])}

    async def exactly(want):
        jobs = await alive()
        assert len(jobs) <= 2, sorted(jobs)  # never over the bound
        return jobs if set(jobs) == want else None

    async def queued(ns, name):
        st = (await kube.get(VLMADAPTERS, name, ns)).get("status") or {}
        return any(c["type"] == "Patched" and c.get("reason") == "PatchJobQueued"
                   for c in st.get("conditions") or [])

    jobs = await wait_until(lambda: exactly({(a, "a0"), (a, "a1")}), timeout=60, what="a0 and a1's Jobs")
    for n in names_a[2:]:
        await wait_until(lambda n=n: queued(a, n), timeout=30, what=f"{n} queued")
    await kube.create(adapter_obj("b0", "pb", f"file://{tmp_path}/src"), b)
    await wait_until(lambda: queued(b, "b0"), timeout=30, what="b0 queued behind A's Jobs")

    # a0 finishes: its slot goes to B's adapter, though A's a2 was created (and queued) earlier
    await complete_patch(kube, a, jobs[(a, "a0")]["metadata"]["name"], adapter_root, "a0", "00000001")
    jobs = await wait_until(lambda: exactly({(a, "a1"), (b, "b0")}), timeout=60, what="b0's Job before a2's")
    assert all([await patch_jobs(kube, a, n) == [] for n in names_a[2:]])  # A's queue has not drained

    # a1 finishes: B has a Job and nothing queued, so A's next adapter in creation order comes
    await complete_patch(kube, a, jobs[(a, "a1")]["metadata"]["name"], adapter_root, "a1", "00000001", seed=1)
    await wait_until(lambda: exactly({(b, "b0"), (a, "a2")}), timeout=60, what="a2's Job")
