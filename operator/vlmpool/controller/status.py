"""Pure status logic: conditions, the adapter's phase, per-pod load results, the pool's status.

An adapter's phase is derived from its conditions: each part writes the conditions it owns, and the
status writer (statuswriter.py) recomputes the phase at every write:
- ``Patched``: Unknown while the patch Job runs, True with the version, False with the refusal.
- ``Loaded``: True when every running pod of the pool serves the version.
- ``Ready``: the summary (mirrors phase Ready).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from vlmpool.api.adapter import PatchSummary
from vlmpool.api.pool import VLMPoolStatus
from vlmpool.controller.push import PodResult
from vlmpool.manifests.common import server_label_selector

RETRYABLE_PATCH_REASONS = {"SourceUnavailable", "LockTimeout"}


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(conds: list[dict[str, Any]], ctype: str) -> dict[str, Any] | None:
    return next((c for c in conds or [] if c.get("type") == ctype), None)


def set_condition(conds: list[dict[str, Any]] | None, ctype: str, status: str, reason: str, message: str = "",
                  generation: int | None = None) -> list[dict[str, Any]]:
    """Return a new condition list with `ctype` set; lastTransitionTime moves only when status does."""
    out = [dict(c) for c in conds or [] if c.get("type") != ctype]
    old = get_condition(conds or [], ctype)
    cond: dict[str, Any] = {"type": ctype, "status": status, "reason": reason, "message": message[:32000],
                            "lastTransitionTime": old["lastTransitionTime"]
                            if old and old.get("status") == status and old.get("lastTransitionTime") else now()}
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    order = {"Ready": 0, "Patched": 1, "Loaded": 2, "PoolFound": 3, "Progressing": 4, "Stalled": 5, "Degraded": 6}
    out.sort(key=lambda c: (order.get(c["type"], 99), c["type"]))
    return out


def adapter_phase(status: dict[str, Any], deleting: bool = False) -> tuple[str, str, str]:
    """(phase, reason, message) from the adapter's conditions."""
    if deleting:
        return "Deleting", "Deleting", "unloading from the pool's pods, then removing the adapter's files"
    conds = status.get("conditions") or []
    pool = get_condition(conds, "PoolFound")
    if pool and pool["status"] == "False":
        return "Pending", pool["reason"], pool["message"]
    patched = get_condition(conds, "Patched")
    if patched is None:
        return "Pending", "Waiting", "waiting for the patch Job"
    if patched["status"] == "Unknown":
        return "Patching", patched["reason"], patched["message"]
    if patched["status"] == "False":
        return "Failed", patched["reason"], patched["message"]
    loaded = get_condition(conds, "Loaded")
    if loaded is None or loaded["status"] == "Unknown":
        return "Registering", "Registering", "pushing the version to the pool's pods"
    if loaded["status"] == "True":
        return "Ready", loaded["reason"], loaded["message"]
    if loaded["reason"] in ("LoadFailed", "ServedNameConflict"):
        return "Failed", loaded["reason"], loaded["message"]
    return "Registering", loaded["reason"], loaded["message"]


def with_phase(status: dict[str, Any], generation: int | None, deleting: bool = False) -> dict[str, Any]:
    phase, reason, message = adapter_phase(status, deleting)
    status = dict(status)
    status.update(phase=phase, reason=reason, message=message)
    status["conditions"] = set_condition(status.get("conditions"), "Ready", "True" if phase == "Ready" else "False",
                                         reason, message, generation)
    return status


def pod_loads(served: str, version: str | None, pods: list[str], results: dict[str, PodResult]
              ) -> tuple[list[dict[str, Any]], int, list[str]]:
    """Per-pod load entries for one adapter: (entries, loaded count, failure reasons)."""
    entries: list[dict[str, Any]] = []
    loaded = 0
    failures: list[str] = []
    for pod in pods:
        r = results.get(pod)
        if r is None or not r.ok:
            entries.append({"pod": pod, "state": "pending",
                            "message": ((r.error if r else None) or "not pushed yet")[:2000]})
            continue
        a = r.adapters.get(served)
        if a and a.get("state") == "loaded" and a.get("version") == version:
            entries.append({"pod": pod, "state": "loaded", "version": version})
            loaded += 1
        elif a and a.get("state") == "failed":
            reason = str(a.get("reason") or "load failed")[:2000]
            entries.append({"pod": pod, "state": "failed", "version": a.get("version"), "message": reason})
            failures.append(f"{pod}: {reason}")
        elif a and a.get("version") == version and a.get("state") in ("pending", "loading"):
            # the proxy converges in the background: queued, or its engine call runs
            why = "loading on the proxy" if a["state"] == "loading" else "queued on the proxy"
            entries.append({"pod": pod, "state": a["state"], "version": version,
                            "message": f"{why}: {a['reason']}"[:2000] if a.get("reason") else why})
        else:
            entries.append({"pod": pod, "state": "pending", "message": "not reported by the proxy"})
    return entries, loaded, failures


def unloads_unconfirmed(served: str, version: str | None, pods: list[str], results: dict[str, PodResult]
                        ) -> list[str]:
    """Pods whose proxy has not confirmed the unload of every version of `served` other than `version`
    (a proxy that does not report its pending unloads counts as unconfirmed). Older version directories
    may be deleted only when this is empty: vLLM re-reads a registered adapter's directory when its CPU
    LRU evicted it."""
    out = []
    for pod in pods:
        r = results.get(pod)
        if r is None or not r.ok or r.unloading is None or (r.unloading.get(served, set()) - {version}):
            out.append(pod)
    return out


def loaded_condition(loaded: int, running: int, failures: list[str]) -> tuple[str, str, str]:
    if running == 0:
        return "False", "NoRunningPods", "the pool has no running pods yet"
    if loaded == running:
        return "True", "Loaded", f"loaded on {loaded}/{running} pods"
    if failures and loaded == 0:
        return "False", "LoadFailed", "; ".join(failures)[:4000]
    if failures:
        return "False", "PartiallyLoaded", f"loaded on {loaded}/{running} pods; " + "; ".join(failures)[:4000]
    return "False", "Loading", f"loaded on {loaded}/{running} pods"


def unschedulable(pod: dict[str, Any]) -> str | None:
    """The scheduler's reason when `pod` is Pending because no node can take it (None otherwise)."""
    st = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or st.get("phase") != "Pending":
        return None
    cond = get_condition(st.get("conditions") or [], "PodScheduled")
    if cond is None or cond.get("status") != "False":
        return None
    return f"{cond.get('reason') or 'Unschedulable'}: {cond.get('message') or 'no node fits'}"


def stalled_condition(dep: dict[str, Any], pods: Sequence[dict[str, Any]]) -> tuple[str, str, str, str]:
    """The pool's Stalled condition: True while pods cannot be scheduled (a roll or scale-up on a full
    GPU cluster: the scheduler's reason, by pod) or the Deployment passed its progress deadline."""
    stuck = sorted((p["metadata"]["name"], why) for p in pods if (why := unschedulable(p)))
    if stuck:
        shown = "; ".join(f"{name}: {why}" for name, why in stuck[:3]) + ("; ..." if len(stuck) > 3 else "")
        hint = ""
        if int(((dep.get("spec") or {}).get("strategy") or {}).get("rollingUpdate", {}).get("maxSurge") or 0):
            hint = " (spec.rollout.maxSurge adds pods beyond the replicas: on a full cluster they cannot fit)"
        return ("Stalled", "True", "PodsUnschedulable", f"{len(stuck)} pod(s) Pending: {shown}{hint}")
    prog = get_condition((dep.get("status") or {}).get("conditions") or [], "Progressing")
    if prog and prog.get("status") == "False" and prog.get("reason") == "ProgressDeadlineExceeded":
        return ("Stalled", "True", "ProgressDeadlineExceeded", prog.get("message") or "the rollout made no progress")
    return ("Stalled", "False", "Progressing", "no pod of the pool is waiting for a node")


def deployment_status(pool: dict[str, Any], dep: dict[str, Any] | None, pods: Sequence[dict[str, Any]] = ()
                      ) -> tuple[VLMPoolStatus, list[tuple[str, str, str, str]]]:
    """(fields, conditions) of the pool's status from its Deployment and its pods: replicas/readyReplicas/
    ready and the Ready/Progressing/Stalled conditions."""
    desired = (pool.get("spec") or {}).get("replicas", 1)
    st = (dep or {}).get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    replicas = int(st.get("replicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    fields = VLMPoolStatus(replicas=replicas, ready_replicas=ready, ready=f"{ready}/{desired}",
                           selector=server_label_selector(pool["metadata"]["name"]))
    if dep is None:
        return fields, [("Ready", "False", "DeploymentMissing", "the pool's Deployment does not exist yet"),
                        ("Progressing", "True", "Creating", "creating the pool's objects")]
    conds = []
    dep_current = st.get("observedGeneration", 0) >= dep["metadata"].get("generation", 0)
    rolled = dep_current and updated == desired and replicas == desired and ready == desired
    if ready >= desired and desired > 0:
        conds.append(("Ready", "True", "PodsReady", f"{ready}/{desired} pods ready"))
    elif desired == 0:
        conds.append(("Ready", "False", "ScaledToZero", "replicas is 0"))
    else:
        conds.append(("Ready", "False", "PodsNotReady", f"{ready}/{desired} pods ready"))
    if rolled:
        conds.append(("Progressing", "False", "RolledOut", "every pod runs the current spec"))
    else:
        conds.append(("Progressing", "True", "RollingOut", f"{updated}/{desired} pods updated, {ready} ready"))
    conds.append(stalled_condition(dep, pods))
    return fields, conds


def parse_termination_message(text: str | None) -> dict[str, Any] | None:
    """The patcher's JSON summary, or None when the message is absent or not that JSON (e.g. the log
    tail FallbackToLogsOnError put there after a crash)."""
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("ok"), bool) else None


def report_summary(msg: dict[str, Any]) -> dict[str, Any]:
    """The PatchSummary fields of a patcher's success message, type-checked (bad fields dropped)."""
    return PatchSummary.from_message(msg)
