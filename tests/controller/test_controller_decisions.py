"""The reconciler's decisions (vlmpool.controller.decisions) without an apiserver: objects in, what to do out."""

from __future__ import annotations

from typing import Any

import pytest

from vlmpool.api.objects import Adapter
from vlmpool.controller import decisions as D
from vlmpool.controller.push import PodResult
from vlmpool.kube.client import ApiError
from vlmpool.manifests.common import A_SPEC_DIGEST
from vlmpool.names import API_VERSION

ROOT = "/adapters"
UID = "u-1"
V1, V2, V3 = "0000000a", "0000000b", "0000000c"  # versions of the patcher's form


def _cond(type_: str, status: str, reason: str = "R") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": ""}


def _adapter(status: dict[str, Any] | None = None, *, uid: str = UID, deleting: bool = False,
             served: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "inv", "namespace": "ns", "uid": uid}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec: dict[str, Any] = {"poolRef": {"name": "p"}, "source": {"uri": "hf://acme/inv@v1"}}
    if served:
        spec["servedName"] = served
    return {"metadata": meta, "spec": spec, "status": status or {}}


def _job(conditions: list[dict[str, Any]] = (), failed: int = 0, *, digest: str | None = "d1",
         owner_kind: str = "VLMAdapter", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "inv-patch-d1", "namespace": "ns",
                            "ownerReferences": [{"kind": owner_kind, "name": "inv", "uid": UID, "controller": True}]}
    if digest:
        meta["annotations"] = {A_SPEC_DIGEST: digest}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"conditions": list(conditions), "failed": failed}}


def _ok(version: str = V2, path: str | None = None) -> dict[str, Any]:
    return {"ok": True, "version": version, "path": path or f"{ROOT}/inv/versions/{version}", "tensors_kept": 4}


def _result(job: dict[str, Any], messages: D.JobMessages, old_version: str | None = None) -> D.JobResult:
    return D.job_result("inv-patch-d1", D.job_state(job), messages, adapter_root=ROOT, adapter="inv",
                        old_version=old_version)


def test_failure_reason_names_the_api_reason_or_the_exception():
    assert D.failure_reason(ValueError("x")) == "ValueError"
    assert D.failure_reason(ApiError(422, "Invalid", "bad")) == "Invalid"
    assert D.failure_reason(ApiError(500, "", "boom")) == "HTTP500"


def test_controller_owner_needs_kind_and_controller():
    dep = {"metadata": {"ownerReferences": [{"kind": "VLMPool", "name": "a"},
                                            {"kind": "VLMPool", "name": "b", "controller": True}]}}
    assert D.controller_owner(dep, "VLMPool")["name"] == "b"
    assert D.controller_owner(dep, "VLMAdapter") is None
    assert D.controller_owner({"metadata": {}}, "VLMPool") is None


@pytest.mark.parametrize(("status", "decided", "pending"), [
    ({}, False, False),
    ({"specDigest": "d1"}, False, True),
    ({"specDigest": "d1", "conditions": [_cond("Patched", "Unknown")]}, False, True),
    ({"specDigest": "d1", "conditions": [_cond("Patched", "True")]}, True, False),
    ({"specDigest": "d1", "conditions": [_cond("Patched", "False")]}, True, False),
    ({"specDigest": "d0", "conditions": [_cond("Patched", "True")]}, False, False),
])
def test_patch_decided_and_pending(status, decided, pending):
    assert D.patch_decided(status, "d1") is decided
    assert D.patch_pending(status, "d1") is pending


def test_only_patch_jobs_of_an_adapter_have_a_result_to_copy():
    assert D.job_adapter_ref(_job())[0] == "d1"
    assert D.job_adapter_ref(_job(digest=None)) is None
    assert D.job_adapter_ref(_job(owner_kind="VLMPool")) is None


def test_job_result_wanted_only_by_its_current_undecided_owner():
    owner = _job()["metadata"]["ownerReferences"][0]
    running = {"specDigest": "d1", "conditions": [_cond("Patched", "Unknown")]}
    assert D.job_result_wanted(_adapter(running), owner, "d1")
    assert not D.job_result_wanted(None, owner, "d1")
    assert not D.job_result_wanted(_adapter(running, uid="other"), owner, "d1")  # a re-created adapter
    assert not D.job_result_wanted(_adapter(running), owner, "d0")  # an older spec's Job
    assert not D.job_result_wanted(_adapter(running, deleting=True), owner, "d1")
    done = {"specDigest": "d1", "conditions": [_cond("Patched", "True")]}
    assert not D.job_result_wanted(_adapter(done), owner, "d1")  # recorded already


def test_job_state():
    assert not D.job_state(_job()).finished
    assert not D.job_state(_job([_cond("Complete", "False")])).finished
    st = D.job_state(_job([_cond("SuccessCriteriaMet", "True")]))
    assert st.complete and not st.failed and st.finished
    st = D.job_state(_job([_cond("FailureTarget", "True")]))
    assert st.failed and not st.complete
    st = D.job_state(_job(failed=1))  # a pod failed, the Job retries: read its refusal
    assert st.finished and not st.failed and not st.complete


def test_a_succeeded_pod_completes_a_single_completion_job_early():
    running = _job()
    st = D.job_state(running, pod_succeeded=True)
    assert st.complete and st.finished and not st.failed
    assert not D.job_state(running).complete  # the Job's own word alone: not yet
    failed = D.job_state(_job([_cond("Failed", "True")]), pod_succeeded=True)
    assert failed.failed and not failed.complete  # a Job that failed meanwhile (deadline) keeps its Failed
    for spec in ({"completions": 2}, {"parallelism": 2}, {"completions": None, "parallelism": 3}):
        assert not D.job_state({**running, "spec": spec}, pod_succeeded=True).complete, spec
    assert D.job_state({**running, "spec": {"completions": 1, "parallelism": 1}}, pod_succeeded=True).complete


def test_succeeded_pod_job():
    def pod(phase: str, owners: list[dict[str, Any]]) -> dict[str, Any]:
        return {"metadata": {"name": "inv-patch-d1-x", "ownerReferences": owners}, "status": {"phase": phase}}

    job_owner = {"kind": "Job", "name": "inv-patch-d1", "controller": True}
    assert D.succeeded_pod_job(pod("Succeeded", [job_owner])) == "inv-patch-d1"
    for phase in ("Pending", "Running", "Failed", ""):
        assert D.succeeded_pod_job(pod(phase, [job_owner])) is None, phase
    assert D.succeeded_pod_job(pod("Succeeded", [])) is None
    assert D.succeeded_pod_job(pod("Succeeded", [{**job_owner, "controller": False}])) is None
    assert D.succeeded_pod_job(pod("Succeeded", [{**job_owner, "kind": "ReplicaSet"}])) is None


def test_a_complete_job_reports_its_version():
    job = _job([_cond("Complete", "True")])
    res = _result(job, [("Succeeded", _ok())], old_version=V1)
    assert res == D.PatchSucceeded(V2, f"{ROOT}/inv/versions/{V2}", _ok(), supersedes=V1)
    assert _result(job, [("Succeeded", _ok())], old_version=V2).supersedes is None
    assert _result(job, [("Succeeded", _ok())]).supersedes is None
    # the newest succeeded pod with ok=True counts; failed pods before it do not
    res = _result(job, [("Failed", {"ok": False, "reason": "SourceUnavailable"}), ("Succeeded", _ok(V3))])
    assert isinstance(res, D.PatchSucceeded) and res.version == V3
    # the canonical path is recorded, not the reported spelling of it
    res = _result(job, [("Succeeded", _ok(V2, f"{ROOT}//inv/versions/{V2}/"))])
    assert isinstance(res, D.PatchSucceeded) and res.path == f"{ROOT}/inv/versions/{V2}"


@pytest.mark.parametrize("version", ["v2", "0000000B", "0000000b\n", "0000000", "a" * 65, " 0000000b", 12345678,
                                     None, "../0000000b", "0000000b/.."])
def test_a_version_not_of_the_patchers_form_fails_the_adapter_alone(version):
    msg = _ok(V2, f"{ROOT}/inv/versions/{version}")
    msg["version"] = version
    res = _result(_job([_cond("Complete", "True")]), [("Succeeded", msg)])
    assert isinstance(res, D.PatchFailed) and res.reason == "InvalidVersion" and not res.timed, res
    assert "[0-9a-f]{8,64}" in res.message


@pytest.mark.parametrize("messages", [[], [("Succeeded", None)], [("Succeeded", {"ok": False})],
                                      [("Failed", _ok())]])
def test_a_complete_job_without_a_summary_failed(messages):
    res = _result(_job([_cond("Complete", "True")]), messages)
    assert isinstance(res, D.PatchFailed) and res.reason == "InvalidTerminationMessage" and not res.timed
    assert "without a valid JSON summary" in res.message


@pytest.mark.parametrize(("version", "path"), [(V2, f"{ROOT}/inv/current"), (V2, f"{ROOT}/other/versions/{V2}"),
                                               (V2, f"{ROOT}/inv/versions/{V1}")])
def test_a_reported_path_outside_the_adapters_versions_is_refused(version, path):
    res = _result(_job([_cond("Complete", "True")]), [("Succeeded", _ok(version, path or f"{ROOT}/inv/x"))])
    assert isinstance(res, D.PatchFailed) and res.reason == "InvalidTerminationMessage" and not res.timed


def test_refusals_final_or_retryable():
    final = {"ok": False, "reason": "BaseModelMismatch", "message": "m" * 5000}
    res = _result(_job(failed=1), [("Failed", final)])
    assert res == D.PatchFailed("BaseModelMismatch", "m" * 4000, timed=True)
    retry = {"ok": False, "reason": "SourceUnavailable", "message": "503"}
    assert _result(_job(failed=1), [("Failed", retry)]) is None  # the Job retries it
    res = _result(_job([_cond("Failed", "True")], failed=3), [("Failed", retry)])
    assert res == D.PatchFailed("SourceUnavailable", "503", timed=True)  # out of retries
    assert _result(_job(failed=1), [("Failed", {"ok": False})]) == D.PatchFailed("PatchRefused", "", timed=True)


def test_a_failed_job_without_a_refusal_reports_its_condition_and_output():
    cond = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many"}
    res = _result(_job([cond], failed=2), [("Failed", None)])
    assert res == D.PatchJobFailed(cond)
    assert _result(_job([_cond("FailureTarget", "True")]), []) == D.PatchJobFailed(_cond("FailureTarget", "True"))
    msg = D.failed_job_message("j", cond, ["", "x" * 2000 + "END"])
    assert msg.startswith("Job j failed: BackoffLimitExceeded: too many; last output: ")
    assert msg.endswith("END") and len(msg.split("last output: ")[1]) == 1500
    assert D.failed_job_message("j", {}, []) == "Job j failed: : "


def test_patch_jobs_to_stop_on_delete():
    assert D.patch_job_unfinished(_job(), UID)
    assert D.patch_job_unfinished(_job(failed=1), UID)
    assert not D.patch_job_unfinished(_job(), "someone-else")
    assert not D.patch_job_unfinished(_job([_cond("Complete", "True")]), UID)
    assert not D.patch_job_unfinished(_job([_cond("Failed", "True")]), UID)
    assert not D.patch_job_unfinished(_job(deleting=True), UID)
    assert D.pod_stopped({"status": {"phase": "Succeeded"}}) and D.pod_stopped({"status": {"phase": "Failed"}})
    assert not D.pod_stopped({"status": {"phase": "Running"}}) and not D.pod_stopped({})


def test_push_generation():
    assert D.push_generation(None, 0, "a", 0) == 1  # first push
    assert D.push_generation("a", 1, "a", 1) == 1  # same state: same generation
    assert D.push_generation("a", 1, "b", 1) == 2  # new state
    assert D.push_generation(None, 0, "a", 7) == 8  # restarted operator: past the recorded generation
    assert D.push_generation("a", 3, "a", 7) == 7  # same state, a higher generation was recorded
    assert D.push_generation("a", 9, "a", 7) == 9


def _set(fields):
    """The status fields a typed change sets, as written (camelCase)."""
    return fields.model_dump(by_alias=True, exclude_unset=True, mode="json")


def test_adapter_loads():
    pods = ["p0", "p1"]
    results = {"p0": PodResult("p0", True, 1, {"inv": {"name": "inv", "version": "v1", "state": "loaded"}}),
               "p1": PodResult("p1", False, error="timeout")}
    ready = _adapter({"version": "v1", "path": f"{ROOT}/inv/versions/v1"})
    fields, conds = D.adapter_loads(Adapter.parse(ready), [], {}, pods, results)
    assert fields.loaded_pods == 1 and fields.loaded == "1/2" and fields.desired_pods == 2
    assert [p.pod for p in fields.pods] == pods and conds[0][:2] == ("Loaded", "False")
    fields, conds = D.adapter_loads(Adapter.parse(ready), ["inv"], {"inv": {"version": "v9"}}, pods, results)
    assert _set(fields) == {"pods": [], "loadedPods": 0, "desiredPods": 2, "loaded": "0/2"}
    assert conds == [("Loaded", "False", "ServedNameConflict",
                      "another adapter of the pool already serves 'inv' (version v9)")]
    fields, conds = D.adapter_loads(Adapter.parse(_adapter()), [], {}, pods, results)
    assert (_set(fields), conds) == ({"loadedPods": 0, "desiredPods": 2, "loaded": "0/2"}, [])


def test_version_is():
    assert D.version_is("v1")({"version": "v1"}) and not D.version_is("v1")({"version": "v2"})
    assert D.version_is(None)({})


def test_patch_slots_go_round_robin_over_namespaces_in_creation_order_within_one():
    from vlmpool.controller.jobgate import fair_order

    a = [(f"2026-01-01T00:00:0{i}Z", "a", f"a{i}") for i in range(4)]
    b = [("2026-01-01T00:00:09Z", "b", "b0"), ("2026-01-01T00:00:09Z", "b", "b1")]
    # A holds two Jobs, B none: B's adapters come first, then the namespaces alternate
    assert [e[2] for e in fair_order(a + b, {("a", "x"), ("a", "y")})] == ["b0", "b1", "a0", "a1", "a2", "a3"]
    # nothing running: turns alternate, the older adapter first at each turn
    assert [e[2] for e in fair_order(reversed(a + b), set())] == ["a0", "b0", "a1", "b1", "a2", "a3"]
    # a namespace alone: creation order, every slot
    assert fair_order(a, set()) == a


def _patch_job_and_pod() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(adapter, its patch Job as the operator builds it and the apiserver stores it, the Job controller's
    pod of it)."""
    from vlmpool.api.objects import Pool
    from vlmpool.manifests import adapter as MA

    pool = Pool.parse({"apiVersion": API_VERSION, "kind": "VLMPool",
                       "metadata": {"name": "p", "namespace": "ns", "uid": "pool-uid"},
                       "spec": {"model": {"name": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl"}}})
    adapter = {**_adapter(), "apiVersion": API_VERSION, "kind": "VLMAdapter"}
    job = MA.patch_job(Adapter.parse(adapter), pool)
    name = job["metadata"]["name"]
    job["metadata"]["uid"] = "job-uid"
    selector = {"batch.kubernetes.io/controller-uid": "job-uid", "batch.kubernetes.io/job-name": name,
                "controller-uid": "job-uid", "job-name": name}  # the apiserver adds these to the template
    job["spec"]["template"]["metadata"]["labels"].update(selector)
    pod = {"metadata": {"name": f"{name}-x7k2p", "namespace": "ns",
                        "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
                        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": "job-uid",
                                             "controller": True, "blockOwnerDeletion": True}]},
           "status": {"phase": "Succeeded"}}
    return adapter, job, pod


def test_a_pod_is_believed_only_as_the_job_controllers_pod_of_that_job():
    _, job, pod = _patch_job_and_pod()
    assert D.pod_of_job(pod, job)

    def forged(change) -> dict[str, Any]:
        p = {"metadata": {**pod["metadata"], "labels": dict(pod["metadata"]["labels"]),
                          "ownerReferences": [dict(o) for o in pod["metadata"]["ownerReferences"]]}}
        change(p["metadata"])
        return p

    owner = lambda **kw: lambda m: m["ownerReferences"][0].update(kw)  # noqa: E731
    assert not D.pod_of_job(forged(owner(uid="other-uid")), job)  # the Job's name, another uid
    assert not D.pod_of_job(forged(owner(name="other-job")), job)
    assert not D.pod_of_job(forged(owner(controller=False)), job)
    assert not D.pod_of_job(forged(lambda m: m.pop("ownerReferences")), job)
    # the right ownerReference, but not the Job controller's labels
    assert not D.pod_of_job(forged(lambda m: m["labels"].update({"batch.kubernetes.io/controller-uid": "x"})), job)
    assert not D.pod_of_job(forged(lambda m: [m["labels"].pop(k) for k in D.JOB_CONTROLLER_UID_LABELS]), job)
    assert not D.pod_of_job(forged(lambda m: m["labels"].pop("app.kubernetes.io/managed-by")), job)
    assert not D.pod_of_job(forged(lambda m: m["labels"].update({"vlmpool.io/adapter": "other"})), job)
    # the legacy label alone (an older Job controller) still identifies it
    assert D.pod_of_job(forged(lambda m: m["labels"].pop("batch.kubernetes.io/controller-uid")),
                        {**job, "spec": {"template": {"metadata": {"labels": {}}}}})
    assert not D.pod_of_job(pod, {**job, "metadata": {**job["metadata"], "uid": ""}})


def test_only_the_operators_patch_job_of_the_adapter_is_read():
    adapter, job, _ = _patch_job_and_pod()
    assert D.operator_patch_job(job, adapter)

    def changed(change) -> dict[str, Any]:
        j = {**job, "metadata": {**job["metadata"], "labels": dict(job["metadata"]["labels"]),
                                 "annotations": dict(job["metadata"]["annotations"])}}
        change(j["metadata"])
        return j

    assert not D.operator_patch_job(changed(lambda m: m.update(name="inv-patch-00000000")), adapter)
    assert not D.operator_patch_job(changed(lambda m: m["labels"].update({"app.kubernetes.io/component": "x"})),
                                    adapter)
    assert not D.operator_patch_job(changed(lambda m: m["labels"].pop("app.kubernetes.io/managed-by")), adapter)
    assert not D.operator_patch_job(changed(lambda m: m["annotations"].clear()), adapter)
    assert not D.operator_patch_job(changed(lambda m: m.update(ownerReferences=[])), adapter)
    assert not D.operator_patch_job(job, {**adapter, "metadata": {**adapter["metadata"], "uid": "re-created"}})


def test_a_recorded_version_the_proxies_would_refuse_is_left_out_for_its_adapter_alone():
    good = Adapter.parse(_adapter({"version": V1, "path": f"{ROOT}/inv/versions/{V1}"}))
    assert D.recorded_version_problem(good, ROOT) is None
    assert D.recorded_version_problem(Adapter.parse(_adapter()), ROOT) is None  # nothing recorded yet
    for version, path in [("v1", f"{ROOT}/inv/versions/v1"), (V1 + "\n", f"{ROOT}/inv/versions/{V1}\n"),
                          (V1, f"{ROOT}/inv/versions/{V1}/."), (V1, f"{ROOT}/other/versions/{V1}"), (V1, "/x")]:
        bad = Adapter.parse(_adapter({"version": version, "path": path}))
        assert D.recorded_version_problem(bad, ROOT), (version, path)
    bad = Adapter.parse(_adapter({"version": "v1", "path": f"{ROOT}/inv/versions/v1"}))
    fields, conds = D.adapter_loads(bad, [], {}, ["p0"], {}, {"inv": D.recorded_version_problem(bad, ROOT)})
    assert _set(fields) == {"pods": [], "loadedPods": 0, "desiredPods": 1, "loaded": "0/1"}
    assert conds[0][:3] == ("Loaded", "False", "InvalidVersion") and "'v1'" in conds[0][3]
