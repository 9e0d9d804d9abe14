"""Names, labels, owner references and digests shared by the manifest builders.

Everything here is pure: objects in, dicts out. No I/O, no clock, no randomness.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vlmpool.adminwire import ADAPTER_ROOT
from vlmpool.names import API_VERSION

# Labels.
L_NAME = "app.kubernetes.io/name"
L_INSTANCE = "app.kubernetes.io/instance"
L_COMPONENT = "app.kubernetes.io/component"
L_MANAGED_BY = "app.kubernetes.io/managed-by"
L_POOL = "vlmpool.io/pool"
L_ADAPTER = "vlmpool.io/adapter"
L_SPEC_DIGEST = "vlmpool.io/spec-digest"
MANAGED_BY = "vlmpool-operator"
A_SPEC_DIGEST = "vlmpool.io/spec-digest"
A_TOKEN_CHECKSUM = "vlmpool.io/admin-token-hash"

COMPONENT_SERVER = "server"
COMPONENT_PATCH = "patch"
COMPONENT_CLEANUP = "cleanup"
COMPONENT_PRUNE = "prune"
A_SUPERSEDED = "vlmpool.io/superseded-version"  # an older version may remain on the volume
A_PRUNED = "vlmpool.io/pruned-for-version"  # the prune Job for this served version was created

# Where the adapter volume is mounted, identically in patch Jobs (read-write) and in the engine
# container (read-only): the path a Job reports is the path vLLM loads.
BASE_WEIGHTS_MOUNT = "/var/lib/vlmpool/base"
ADMIN_TOKEN_DIR = "/var/run/vlmpool/admin"
ADMIN_TOKEN_KEY = "token"
API_KEY_DIR = "/var/run/vlmpool/api-keys"  # the pool's apiKeySecret, mounted whole (so updates arrive)

MAX_LABEL = 63


def _trim(name: str, limit: int) -> str:
    return name[:limit].rstrip("-.")


def short_digest(obj: Any, length: int = 64) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def pool_labels(pool: str, component: str = COMPONENT_SERVER) -> dict[str, str]:
    return {
        L_NAME: "vlmpool",
        L_INSTANCE: _trim(pool, MAX_LABEL),
        L_COMPONENT: component,
        L_MANAGED_BY: MANAGED_BY,
        L_POOL: _trim(pool, MAX_LABEL),
    }


def server_selector(pool: str) -> dict[str, str]:
    return {L_POOL: _trim(pool, MAX_LABEL), L_COMPONENT: COMPONENT_SERVER}


def server_label_selector(pool: str) -> str:
    return ",".join(f"{k}={v}" for k, v in server_selector(pool).items())


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    """A controller owner reference to `obj` (a VLMPool or VLMAdapter as read from the API)."""
    meta = obj["metadata"]
    return {
        "apiVersion": obj.get("apiVersion", API_VERSION),
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


# Object names derived from the owner's name.
def deployment_name(pool: str) -> str:
    return pool


def service_name(pool: str) -> str:
    return pool


def adapter_claim_name(pool: str) -> str:
    return f"{pool}-adapters"


def admin_secret_name(pool: str) -> str:
    return f"{pool}-admin-token"


def patch_job_name(adapter: str, spec_digest: str) -> str:
    # Job names become a pod label value (job-name), so they must fit 63 characters.
    return f"{_trim(adapter, MAX_LABEL - 15)}-patch-{spec_digest[:8]}"


def cleanup_job_name(adapter: str, uid: str) -> str:
    return f"{_trim(adapter, MAX_LABEL - 17)}-cleanup-{uid.replace('-', '')[:8]}"


def prune_job_name(adapter: str, version: str) -> str:
    return f"{_trim(adapter, MAX_LABEL - 15)}-prune-{short_digest(version, 8)}"


def adapter_dir(adapter: str) -> str:
    return f"{ADAPTER_ROOT}/{adapter}"
