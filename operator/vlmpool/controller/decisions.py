"""The reconciler's decisions as pure functions: from the objects (dicts, or the typed views of
api/objects.py where a spec is read) and a Job's status and its pods' termination messages to what to
do. No API calls here: pool.py, adapter.py, deletion.py and pushing.py make them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmpool.adminwire import VERSION_RE
from vlmpool.api.adapter import PodLoad, VLMAdapterStatus
from vlmpool.api.objects import Adapter
from vlmpool.controller import status as S
from vlmpool.controller.push import PodResult
from vlmpool.kube.client import ApiError
from vlmpool.manifests.common import (
    A_SPEC_DIGEST,
    COMPONENT_PATCH,
    L_ADAPTER,
    L_COMPONENT,
    L_MANAGED_BY,
    MANAGED_BY,
    MAX_LABEL,
    _trim,
    patch_job_name,
)
from vlmpool.names import ADAPTER_KIND, SERVED_NAME_IS_BASE, served_name_refusal
from vlmpool.patcher.publish import check_version_path, version_path

Cond = tuple[str, str, str, str]  # (type, status, reason, message)
# (pod phase, parsed termination message of the patch container), newest pod first
JobMessages = list[tuple[str, dict[str, Any] | None]]


def failure_reason(err: Exception) -> str:
    """The reason a failed pool reconcile reports (Degraded condition, error metric)."""
    return type(err).__name__ if not isinstance(err, ApiError) else (err.reason or f"HTTP{err.status}")


def controller_owner(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The ownerReference of `kind` that controls `obj`, if any."""
    return next((o for o in obj["metadata"].get("ownerReferences") or []
                 if o.get("kind") == kind and o.get("controller")), None)


def patch_decided(status: dict[str, Any], digest: str) -> bool:
    """The spec with `digest` was patched (or refused) already: its Job never runs again."""
    patched = S.get_condition(status.get("conditions") or [], "Patched") or {}
    return status.get("specDigest") == digest and patched.get("status") in ("True", "False")


def patch_pending(status: dict[str, Any], digest: str) -> bool:
    """The spec with `digest` waits for its Job's result (a result may still be recorded)."""
    c = S.get_condition(status.get("conditions") or [], "Patched")
    return status.get("specDigest") == digest and (c is None or c["status"] == "Unknown")


def job_adapter_ref(job: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(spec digest, VLMAdapter ownerReference) of a patch Job; None for any other Job."""
    meta = job["metadata"]
    digest = (meta.get("annotations") or {}).get(A_SPEC_DIGEST)
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == ADAPTER_KIND), None)
    if not digest or owner is None:
        return None
    return digest, owner


# The labels the Job controller puts on every pod it creates for a Job: the Job's uid (its selector)
JOB_CONTROLLER_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")


def operator_patch_job(job: dict[str, Any], adapter: dict[str, Any]) -> bool:
    """`job` is the patch Job the operator creates for `adapter` and the spec digest the Job names: its
    name is that digest's patch Job name, its labels are the operator's patch labels for this adapter,
    and its controller is the adapter itself (uid)."""
    meta, ameta = job["metadata"], adapter["metadata"]
    digest = (meta.get("annotations") or {}).get(A_SPEC_DIGEST) or ""
    labels = meta.get("labels") or {}
    owner = controller_owner(job, ADAPTER_KIND)
    return (bool(digest) and meta.get("name") == patch_job_name(ameta["name"], digest)
            and labels.get(L_MANAGED_BY) == MANAGED_BY and labels.get(L_COMPONENT) == COMPONENT_PATCH
            and labels.get(L_ADAPTER) == _trim(ameta["name"], MAX_LABEL)
            and owner is not None and owner.get("uid") == ameta.get("uid"))


def pod_of_job(pod: dict[str, Any], job: dict[str, Any]) -> bool:
    """`pod` was created by the Job controller for `job`, as far as the pod says: its controller
    ownerReference is the Job (name and uid), its controller-uid label is the Job's uid (the Job
    controller sets both), and it carries every label of the Job's pod template, vlmpool's among them
    (the chart's admission policy lets only the Job and ReplicaSet controllers create pods with those).
    A pod with the Job's name in an ownerReference but another uid, or without the labels, is not
    believed: its termination message is never read."""
    uid = job["metadata"].get("uid")
    owner = controller_owner(pod, "Job")
    if not uid or owner is None or owner.get("uid") != uid or owner.get("name") != job["metadata"].get("name"):
        return False
    labels = pod["metadata"].get("labels") or {}
    if labels.get(JOB_CONTROLLER_UID_LABELS[0], labels.get(JOB_CONTROLLER_UID_LABELS[1])) != uid:
        return False
    template = ((((job.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {})
    return all(labels.get(k) == v for k, v in template.items())


def job_result_wanted(adapter: dict[str, Any] | None, owner: dict[str, Any], digest: str) -> bool:
    """The adapter still waits for this Job's result: it is the owner (same uid), not being deleted,
    its current spec is the Job's, and no result is recorded yet."""
    if adapter is None or adapter["metadata"]["uid"] != owner.get("uid"):
        return False
    st = adapter.get("status") or {}
    if st.get("specDigest") != digest or adapter["metadata"].get("deletionTimestamp"):
        return False  # an older spec's Job: its result is not wanted any more
    patched = S.get_condition(st.get("conditions") or [], "Patched")
    return patched is None or patched["status"] == "Unknown"


@dataclass(frozen=True)
class JobState:
    complete: bool
    failed: bool
    conditions: dict[str, dict[str, Any]]  # the Job's conditions with status True, by type
    failed_pods: bool  # some pod of the Job failed (status.failed)

    @property
    def finished(self) -> bool:
        """Worth reading the pods' termination messages (a failed pod may carry a final refusal)."""
        return self.complete or self.failed or self.failed_pods


def job_state(job: dict[str, Any], pod_succeeded: bool = False) -> JobState:
    """The Job's state from its conditions; `pod_succeeded`: one of its pods is seen Succeeded, which
    for a single-completion Job means Complete before the Job controller writes it (up to a second
    later: it batches pod updates). A Job that failed meanwhile keeps its Failed."""
    jst = job.get("status") or {}
    jconds = {c["type"]: c for c in jst.get("conditions") or [] if c.get("status") == "True"}
    failed = "Failed" in jconds or "FailureTarget" in jconds
    complete = "Complete" in jconds or "SuccessCriteriaMet" in jconds
    if pod_succeeded and not failed and single_completion(job):
        complete = True
    return JobState(complete=complete, failed=failed, conditions=jconds, failed_pods=bool(jst.get("failed")))


def single_completion(job: dict[str, Any]) -> bool:
    """One pod that exits 0 completes the Job (the patch Job's shape: one completion, one pod at a time)."""
    spec = job.get("spec") or {}
    return spec.get("completions") in (None, 1) and spec.get("parallelism") in (None, 1)


def succeeded_pod_job(pod: dict[str, Any]) -> str | None:
    """The name of the Job that controls `pod` when the pod has Succeeded; None otherwise."""
    if (pod.get("status") or {}).get("phase") != "Succeeded":
        return None
    owner = controller_owner(pod, "Job")
    return owner.get("name") if owner else None


@dataclass(frozen=True)
class PatchSucceeded:
    version: str
    path: str
    summary: dict[str, Any]  # the Job's termination message
    supersedes: str | None  # the adapter's older version, kept on the volume until every pod serves this one


@dataclass(frozen=True)
class PatchFailed:
    reason: str
    message: str
    timed: bool  # the Job's duration counts in the failed-Jobs metric


@dataclass(frozen=True)
class PatchJobFailed:
    """The Job failed without a refusal: its message needs the pods' raw output (failed_job_message)."""

    condition: dict[str, Any]


JobResult = PatchSucceeded | PatchFailed | PatchJobFailed | None


def job_result(job_name: str, state: JobState, messages: JobMessages, *, adapter_root: str, adapter: str,
               old_version: str | None) -> JobResult:
    """What a finished patch Job means for its adapter; None: nothing to record yet (a retryable refusal
    of a Job that has retries left)."""
    if state.complete:
        ok = next((m for phase, m in messages if phase == "Succeeded" and m and m.get("ok")), None)
        if ok is None:
            return PatchFailed("InvalidTerminationMessage", f"Job {job_name} succeeded without a valid JSON "
                               "summary in its termination message", timed=False)
        version, path = ok.get("version"), str(ok.get("path") or "")
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            # Refused here, for this adapter alone: never recorded, so never pushed to its pool's pods.
            return PatchFailed("InvalidVersion", f"Job {job_name} reported version {str(version)[:80]!r}, not of the "
                               f"form the patcher publishes ({VERSION_RE.pattern})", timed=False)
        problem = check_version_path(adapter_root, adapter, version, path)
        if problem:
            return PatchFailed("InvalidTerminationMessage", problem, timed=False)
        # The canonical path is recorded (and pushed), not the reported spelling of it.
        return PatchSucceeded(version, version_path(adapter_root, adapter, version), ok,
                              old_version if old_version and old_version != version else None)
    refusal = next((m for phase, m in messages if m and m.get("ok") is False), None)
    if refusal is not None and (state.failed or refusal.get("reason") not in S.RETRYABLE_PATCH_REASONS):
        return PatchFailed(str(refusal.get("reason") or "PatchRefused"), str(refusal.get("message") or "")[:4000],
                           timed=True)
    if state.failed:
        return PatchJobFailed(state.conditions.get("Failed") or state.conditions.get("FailureTarget") or {})
    return None


def failed_job_message(job_name: str, condition: dict[str, Any], raw_messages: list[str]) -> str:
    tail = next((raw for raw in raw_messages if raw), "")
    msg = f"Job {job_name} failed: {condition.get('reason', '')}: {condition.get('message', '')}"
    if tail:
        msg += f"; last output: {tail[-1500:]}"
    return msg


def patch_job_unfinished(job: dict[str, Any], adapter_uid: str) -> bool:
    """A patch Job of the adapter (owned by its uid) still runs and is not being deleted: stop it."""
    owners = {o.get("uid") for o in job["metadata"].get("ownerReferences") or []}
    jconds = {c["type"] for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    return (adapter_uid in owners and not jconds & {"Complete", "Failed"}
            and not job["metadata"].get("deletionTimestamp"))


def pod_stopped(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def push_generation(last_digest: str | None, last_generation: int, digest: str, persisted: int) -> int:
    """The generation of a push of the state with `digest`: a new state gets the next one; the same
    state keeps its generation unless the pool's status recorded a higher one (operator restart)."""
    if last_digest != digest or last_generation < persisted:
        return max(last_generation, persisted) + (1 if last_digest != digest else 0)
    return last_generation


def recorded_version_problem(adapter: Adapter, adapter_root: str) -> str | None:
    """Why the adapter's recorded version may not be pushed (None: it may, or there is none yet). The
    operator records only versions of the patcher's form at their canonical path; one recorded otherwise
    (by an older operator, or by whoever may write the status) is left out of the push, for this adapter
    alone: the proxy would refuse the whole state for a path it cannot confine."""
    st = adapter.status
    version, path = st.get("version"), st.get("path")
    if not version or not path:
        return None
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        return f"status.version {str(version)[:80]!r} is not of the form the patcher publishes ({VERSION_RE.pattern})"
    want = version_path(adapter_root, adapter.name, version)
    if path != want:
        return f"status.path {str(path)[:200]!r} is not the version's directory {want!r}"
    return None


def left_out_of_push(adapters: list[Adapter], served_base: str, adapter_root: str) -> dict[str, str]:
    """The adapters of a pool left out of its push, each alone, with why (name -> why): a recorded version
    the proxies would refuse (recorded_version_problem), or a served name that is the pool's base model's
    (vlmpool.names.served_name_refusal, the one rule: refused, shown in the adapter's Loaded condition)."""
    return {a.name: why for a in adapters
            if (why := recorded_version_problem(a, adapter_root) or served_name_refusal(a.served_name, served_base))}


def adapter_loads(adapter: Adapter, conflicts: list[str], pushed: dict[str, dict[str, Any]],
                  pods: list[str], results: dict[str, PodResult],
                  invalid: dict[str, str] | None = None) -> tuple[VLMAdapterStatus, list[Cond]]:
    """The adapter's per-pod status fields and Loaded condition after a push of `pushed` (served name ->
    entry) to `pods`; `conflicts` names the adapters left out for a served name another one holds,
    `invalid` those left out for their recorded version (name -> recorded_version_problem) or for a served
    name that is the base model's (name -> vlmpool.names.served_name_refusal)."""
    st = adapter.status
    served = adapter.served_name
    conds: list[Cond] = []
    problem = (invalid or {}).get(adapter.name)
    none_loaded = VLMAdapterStatus(pods=[], loaded_pods=0, desired_pods=len(pods), loaded=f"0/{len(pods)}")
    if problem:
        reason = SERVED_NAME_IS_BASE if problem.startswith(SERVED_NAME_IS_BASE) else "InvalidVersion"
        conds.append(("Loaded", "False", reason, f"not pushed: {problem}"))
        fields = none_loaded
    elif adapter.name in conflicts:
        owner = pushed.get(served)
        conds.append(("Loaded", "False", "ServedNameConflict",
                      f"another adapter of the pool already serves {served!r}"
                      + (f" (version {owner['version']})" if owner else "")))
        fields = none_loaded
    elif st.get("version") and st.get("path"):
        entries, n, failures = S.pod_loads(served, st["version"], pods, results)
        conds.append(("Loaded", *S.loaded_condition(n, len(pods), failures)))
        fields = VLMAdapterStatus(pods=[PodLoad.model_validate(e) for e in entries], loaded_pods=n,
                                  desired_pods=len(pods), loaded=f"{n}/{len(pods)}")
    else:
        fields = VLMAdapterStatus(loaded_pods=0, desired_pods=len(pods), loaded=f"0/{len(pods)}")
    return fields, conds


def version_is(version: str | None) -> Callable[[dict[str, Any]], bool]:
    """only_if for a status write: the adapter's version is still `version`."""
    return lambda cur: cur.get("version") == version


CPU_CACHE_CONDITION = "AdaptersExceedCpuCache"


def cpu_cache_condition(ready: int, max_cpu_loras: int | None, max_loras: int) -> Cond:
    """Whether the pool's Ready adapters fit vLLM's CPU LoRA cache (the seed warned at its registered-adapter
    threshold). vLLM sizes that cache with --max-cpu-loras (default: max_loras); registering more evicts the
    least recently used adapter, and a request for an evicted one makes the engine read it from disk again
    before its batch runs (latency, not an error)."""
    bound = max_cpu_loras if max_cpu_loras is not None else max_loras
    src = "engine.maxCpuLoras" if max_cpu_loras is not None else "engine.maxLoras (maxCpuLoras unset)"
    if ready > bound:
        return (CPU_CACHE_CONDITION, "True", "MoreAdaptersThanCpuCache",
                f"{ready} Ready adapters exceed the engine's CPU LoRA cache of {bound} ({src}): vLLM evicts the "
                "least recently used, and a request for an evicted adapter waits while the engine reads it from "
                "disk again; raise engine.maxCpuLoras (CPU memory: one slot holds one adapter's weights)")
    return (CPU_CACHE_CONDITION, "False", "FitsCpuCache", f"{ready} Ready adapters fit the CPU LoRA cache of {bound}")
