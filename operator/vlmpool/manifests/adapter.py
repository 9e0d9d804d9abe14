"""Manifests of a VLMAdapter's Jobs: the patch Job (one per spec digest) and the cleanup Job.

Pure functions of the views of api/objects.py (Adapter, Pool: objects with parsed specs). The spec
digest covers every input that changes what the patcher produces (the adapter's source, DoRA policy
and base check, and the pool's base model, family, served name, max rank and base weights), so equal
digests mean equal Jobs and the Job name
``<adapter>-patch-<digest8>`` can be created-if-absent: exactly one Job per wanted version, also
across operator restarts.
"""

from __future__ import annotations

from typing import Any

from vlmpool import __version__
from vlmpool.adminwire import AdapterEntry, state_wire
from vlmpool.api.adapter import VLMAdapterSpec
from vlmpool.api.objects import Adapter, Pool
from vlmpool.api.pool import VLMPoolSpec
from vlmpool.manifests.common import (
    A_SPEC_DIGEST,
    ADAPTER_ROOT,
    BASE_WEIGHTS_MOUNT,
    COMPONENT_CLEANUP,
    COMPONENT_PATCH,
    COMPONENT_PRUNE,
    L_ADAPTER,
    L_SPEC_DIGEST,
    MAX_LABEL,
    _trim,
    cleanup_job_name,
    owner_reference,
    patch_job_name,
    pool_labels,
    prune_job_name,
    short_digest,
)
from vlmpool.manifests.pool import POD_SECURITY, claim_name, container_security
from vlmpool.patcher.egress import ENV_ALLOW
from vlmpool.patcher.options import DEFAULT_MAX_FILE_BYTES, DORA_MATHS_POLICIES, argv
from vlmpool.patcher.sources import file as file_source
from vlmpool.patcher.sources import registry as sources

PATCH_CONTAINER = "patch"
TERMINATION_LOG = "/dev/termination-log"
DIGEST_SCHEMA = "vlmpool.io/patch-inputs/v1"

# Defaults of the Jobs (documented in docs/operator.md).
PATCH_BACKOFF_LIMIT = 2
PATCH_DEADLINE_SECONDS = 3600
JOB_TTL_SECONDS = 3600
CLEANUP_DEADLINE_SECONDS = 600
# A remote fetch ends at half the Job's deadline (the patcher's --fetch-timeout): a source that
# trickles cannot hold a patch slot for the Job's whole hour, and what is left is for the patch.
PATCH_FETCH_TIMEOUT_SECONDS = PATCH_DEADLINE_SECONDS // 2

# The image of the patch, prune and cleanup Jobs when the operator has no --patch-image: the patcher
# image of this release (images/Dockerfile target patcher), never a pool's (a tenant's) image.
DEFAULT_PATCH_IMAGE = f"ghcr.io/vlmpool/vlmpool-patcher:{__version__}"

_GI = 1024**3


def _gib(n: int) -> str:
    return f"{-(-n // _GI)}Gi"


# Bounds of a patch Job, derived from the patcher's own limits (--max-file-bytes is the patcher's
# default; the operator never raises it). Scratch (/tmp, an emptyDir): the downloaded archive and the
# extracted adapter files, each at most --max-file-bytes, plus 1 GiB for the rest (the config, HOME);
# the container's ephemeral storage 1 GiB more (its logs). Memory: the weights are read and the patched
# weights built in memory (at most one --max-file-bytes each), plus 1 GiB for the interpreter, the
# libraries and the DoRA maths.
PATCH_SCRATCH_LIMIT = _gib(2 * DEFAULT_MAX_FILE_BYTES + _GI)
PATCH_EPHEMERAL_LIMIT = _gib(2 * DEFAULT_MAX_FILE_BYTES + 2 * _GI)
PATCH_MEMORY_LIMIT = _gib(2 * DEFAULT_MAX_FILE_BYTES + _GI)


def patch_resources() -> dict[str, Any]:
    return {"requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"},
            "limits": {"memory": PATCH_MEMORY_LIMIT, "ephemeral-storage": PATCH_EPHEMERAL_LIMIT}}


def cleanup_resources() -> dict[str, Any]:
    """Prune and cleanup Jobs only remove directories on the adapter volume."""
    return {"requests": {"cpu": "50m", "memory": "64Mi", "ephemeral-storage": "16Mi"},
            "limits": {"memory": "256Mi", "ephemeral-storage": "64Mi"}}

# The patcher image runs as uid/gid 65532 (images/Dockerfile): fsGroup makes the adapter volume
# writable for it on storage that is root-owned, and readable by the engines through the group.
# Pod Security Standards `restricted`: the same pod context as the pool's pods; the root filesystem is
# read-only and /tmp (scratch, HOME) an emptyDir.
JOB_POD_SECURITY = POD_SECURITY
JOB_TMP = "/tmp"

# The keys of a credentials Secret that reach the patch container (as env), one by one: a Secret
# can never set anything else there (a proxy, $VLMPOOL_SOURCE_ALLOW, PYTHONPATH, ...).
CREDENTIAL_KEYS = sources.credential_keys()
SOURCE_ALLOW_ENV = ENV_ALLOW
# file:// sources are off unless a cluster admin named node directories (the controller asks first).
file_source_refusal = file_source.refusal


def patch_inputs(adapter: Adapter, pool: Pool) -> dict[str, Any]:
    spec, pspec = adapter.spec, pool.spec
    inputs = {
        "schema": DIGEST_SCHEMA,
        "adapter": adapter.name,
        "source": spec.source.to_wire(),
        "dora": spec.dora.to_wire(),
        "baseModelCheck": spec.base_model_check,
        "poolBase": pspec.model.name,
        "servedBase": pspec.served_name(),
        "family": pspec.model.family,
        "maxRank": pspec.engine.max_lora_rank,
        "baseWeights": pspec.model.weights.to_wire() if pspec.model.weights else None,
    }
    if pspec.engine.tower_connector_lora:  # only when on: the digests of existing adapters stay as they were
        inputs["towerConnectorLora"] = True
    if spec.declared_base:  # only when set (as dora.maxError inside "dora"): existing digests stay
        inputs["declaredBase"] = spec.declared_base
    return inputs


def spec_digest(adapter: Adapter, pool: Pool) -> str:
    return short_digest(patch_inputs(adapter, pool))


def _labels(adapter: Adapter, component: str) -> dict[str, str]:
    labels = pool_labels(adapter.spec.pool_ref.name, component)
    labels[L_ADAPTER] = _trim(adapter.name, MAX_LABEL)
    return labels


def patch_args(adapter: Adapter, pool: Pool, adapter_root: str = ADAPTER_ROOT) -> list[str]:
    """`vlmpool patch`'s arguments for the adapter on the pool: only options the patcher declares
    (vlmpool.patcher.options), by their declared flags."""
    spec, pspec = adapter.spec, pool.spec
    values: list[tuple[str, str | bool]] = [
        ("source", spec.source.uri),
        ("adapter", adapter.name),
        ("root", adapter_root),
        ("pool_base", pspec.model.name),
        ("family", pspec.model.family),
        ("served_base", pspec.served_name()),
        ("max_rank", str(pspec.engine.max_lora_rank)),
        ("dora_policy", spec.dora.policy),
        ("base_check", spec.base_model_check),
        ("termination_log", TERMINATION_LOG),
        ("fetch_timeout", str(PATCH_FETCH_TIMEOUT_SECONDS)),
    ]
    if spec.dora.policy == "svd" and spec.dora.rank is not None:
        values.append(("svd_rank", str(spec.dora.rank)))
    if spec.declared_base:
        values.append(("declared_variant", spec.declared_base))
    if spec.dora.policy in DORA_MATHS_POLICIES and spec.dora.max_error is not None:
        values.append(("dora_max_error", repr(float(spec.dora.max_error))))
    if pspec.engine.tower_connector_lora:
        values.append(("tower_connector_lora", True))
    if pspec.model.weights is not None and spec.dora.policy in DORA_MATHS_POLICIES:
        values.append(("base_weights", (BASE_WEIGHTS_MOUNT + "/" + pspec.model.weights.path.strip("/")).rstrip("/")))
    if spec.source.sha256:
        values.append(("sha256", spec.source.sha256))
    job_source = sources.job_source(spec.source.uri)
    if job_source is not None:
        values += job_source.options
    return ["patch", *argv(values)]


def _job(adapter: Adapter, pspec: VLMPoolSpec, name: str, labels: dict[str, str],
         containers: list[dict[str, Any]], volumes: list[dict[str, Any]], *, backoff_limit: int,
         deadline_seconds: int, ttl_seconds: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The Job shell shared by the patch, cleanup and prune Jobs: owned by the adapter, never
    restarted in place, no API token, the restricted security context (the patcher's uid/fsGroup,
    read-only root), and the pool's node placement."""
    metadata: dict[str, Any] = {"name": name, "namespace": adapter.namespace, "labels": labels}
    if annotations:
        metadata["annotations"] = annotations
    metadata["ownerReferences"] = [owner_reference(adapter.obj)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": backoff_limit,
            "activeDeadlineSeconds": deadline_seconds,
            "ttlSecondsAfterFinished": ttl_seconds,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": JOB_POD_SECURITY,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "containers": containers,
                    "volumes": volumes,
                    **_scheduling(pspec),
                },
            },
        },
    }


def patch_image_for(spec: VLMAdapterSpec, patch_image: str | None, dora_image: str | None) -> str | None:
    """The patch Job's image: DoRA maths (svd, strip's measured error) needs torch, which only the
    patcher-dora image carries; everything else runs on the torch-free patcher."""
    if dora_image and spec.dora.policy in DORA_MATHS_POLICIES:
        return dora_image
    return patch_image


def patch_job(adapter: Adapter, pool: Pool, *, image: str | None = None,
              adapter_root: str = ADAPTER_ROOT,
              backoff_limit: int = PATCH_BACKOFF_LIMIT, deadline_seconds: int = PATCH_DEADLINE_SECONDS,
              ttl_seconds: int = JOB_TTL_SECONDS, source_allow: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The Job that runs `vlmpool patch` for the adapter's current spec on the pool. `source_allow`
    is the cluster admin's egress allow-list (hosts, CIDRs) for the fetch. A file:// source must have
    passed file_source_refusal first."""
    spec, pspec = adapter.spec, pool.spec
    digest = spec_digest(adapter, pool)
    name = adapter.name
    labels = _labels(adapter, COMPONENT_PATCH)
    labels[L_SPEC_DIGEST] = digest[:MAX_LABEL]
    mounts: list[dict[str, Any]] = [{"name": "adapters", "mountPath": adapter_root},
                                    {"name": "tmp", "mountPath": JOB_TMP}]  # scratch and HOME
    volumes: list[dict[str, Any]] = [
        {"name": "adapters", "persistentVolumeClaim": {"claimName": claim_name(pool)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": PATCH_SCRATCH_LIMIT}},
    ]
    if pspec.model.weights is not None and spec.dora.policy in DORA_MATHS_POLICIES:
        # svd needs the base weights; strip uses them (when present) to measure its error.
        mounts.append({"name": "base-weights", "mountPath": BASE_WEIGHTS_MOUNT, "readOnly": True})
        volumes.append({"name": "base-weights", "persistentVolumeClaim": {
            "claimName": pspec.model.weights.claim_name, "readOnly": True}})
    job_source = sources.job_source(spec.source.uri)
    if job_source is not None:  # a volume source (pvc://, file://), mounted read-only
        mounts.append(job_source.mount)
        volumes.append(job_source.volume)
    container: dict[str, Any] = {
        "name": PATCH_CONTAINER,
        "image": image or DEFAULT_PATCH_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["vlmpool"],
        "args": patch_args(adapter, pool, adapter_root),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": patch_resources(),
        "securityContext": container_security(),
        # Always set (empty too): an explicit env entry, which no Secret can override.
        "env": [{"name": SOURCE_ALLOW_ENV, "value": ",".join(source_allow)}, {"name": "HOME", "value": JOB_TMP}],
    }
    if spec.source.credentials_secret is not None:
        secret = spec.source.credentials_secret.name
        container["env"] += [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k, "optional": True}}}
                             for k in CREDENTIAL_KEYS]
    return _job(adapter, pspec, patch_job_name(name, digest), labels, [container], volumes,
                annotations={A_SPEC_DIGEST: digest}, backoff_limit=backoff_limit,
                deadline_seconds=deadline_seconds, ttl_seconds=ttl_seconds)


def _scheduling(pspec: VLMPoolSpec) -> dict[str, Any]:
    # Jobs need the adapter volume; with a ReadWriteOnce claim they must land where the pool runs,
    # so they share the pool's node selector and tolerations (not its GPU resources).
    out: dict[str, Any] = {}
    if pspec.scheduling.node_selector:
        out["nodeSelector"] = dict(pspec.scheduling.node_selector)
    if pspec.scheduling.tolerations:
        out["tolerations"] = [t.to_wire() for t in pspec.scheduling.tolerations]
    return out


def cleanup_job(adapter: Adapter, pool: Pool, *, image: str | None = None,
                adapter_root: str = ADAPTER_ROOT, ttl_seconds: int = JOB_TTL_SECONDS) -> dict[str, Any]:
    """The Job that removes `<root>/<adapter>` (every version) after every pod confirmed its unload:
    `vlmpool patch cleanup` (the patcher owns the volume's layout and its lock)."""
    pspec = pool.spec
    name = adapter.name
    labels = _labels(adapter, COMPONENT_CLEANUP)
    container = {
        "name": "cleanup",
        "image": image or DEFAULT_PATCH_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["vlmpool"],
        "args": ["patch", "cleanup", "--root", adapter_root, "--adapter", name],
        "volumeMounts": [{"name": "adapters", "mountPath": adapter_root}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": cleanup_resources(),
        "securityContext": container_security(),
    }
    volumes = [{"name": "adapters", "persistentVolumeClaim": {"claimName": claim_name(pool)}}]
    return _job(adapter, pspec, cleanup_job_name(name, adapter.uid), labels, [container], volumes,
                backoff_limit=3, deadline_seconds=CLEANUP_DEADLINE_SECONDS, ttl_seconds=ttl_seconds)


def prune_job(adapter: Adapter, pool: Pool, keep_version: str, *, image: str | None = None,
              adapter_root: str = ADAPTER_ROOT, ttl_seconds: int = JOB_TTL_SECONDS) -> dict[str, Any]:
    """The Job that removes the adapter's versions other than `keep_version` (and `current`), run
    once every pod serves `keep_version`, i.e. confirmed it no longer serves the older ones:
    `vlmpool patch prune`, under the patcher's publish lock."""
    job = cleanup_job(adapter, pool, image=image, adapter_root=adapter_root, ttl_seconds=ttl_seconds)
    name = adapter.name
    labels = _labels(adapter, COMPONENT_PRUNE)
    job["metadata"].update(name=prune_job_name(name, keep_version), labels=labels)
    tpl = job["spec"]["template"]
    tpl["metadata"]["labels"] = labels
    c = tpl["spec"]["containers"][0]
    c["name"] = "prune"
    c["args"] = ["patch", "prune", "--root", adapter_root, "--adapter", name, "--keep", keep_version]
    return job


def desired_entry(adapter: Adapter) -> AdapterEntry | None:
    """The adapter's entry in its pool's pushed state, or None if it has nothing to serve (no
    version yet, or being deleted). Always the immutable versions/<version> path, never `current`."""
    if adapter.metadata.get("deletionTimestamp"):
        return None
    st = adapter.status
    if not st.get("version") or not st.get("path"):
        return None
    return AdapterEntry.of(adapter.served_name, st["version"], st["path"])


def desired_state(concurrency: int, adapters: list[Adapter]) -> tuple[dict[str, Any], list[str]]:
    """The state pushed to every pod: concurrency and the adapters that have a version, sorted by
    served name. Two adapters may not share a served name on one pool: the older one (by creation
    time, then name) keeps it; the names of the others are returned as conflicts."""
    def age(a: Adapter) -> tuple[str, str]:
        return (a.metadata.get("creationTimestamp") or "", a.name)

    by_name: dict[str, AdapterEntry] = {}
    conflicts: list[str] = []
    for a in sorted(adapters, key=age):
        e = desired_entry(a)
        if e is None:
            continue
        if e.name in by_name:
            conflicts.append(a.name)
            continue
        by_name[e.name] = e
    return state_wire(concurrency, (by_name[k] for k in sorted(by_name))), conflicts
