"""A pool's LoRA-affinity routing children (`spec.routing`): the InferencePool and, unless the pool
brings its own, the endpoint picker (manifests/routing.py), server-side applied on each pool reconcile.

The InferencePool CRD is the Gateway API Inference Extension's, installed by the cluster's admin (or
with its Gateway). When it is missing the pool is not failed: its Service still serves, and the
reconcile reports what to install (a Warning Event)."""

from __future__ import annotations

from typing import Any

from vlmpool.api.objects import Pool
from vlmpool.kube.errors import NotFound
from vlmpool.manifests import routing as MR

CRD_MISSING = ("spec.routing needs the InferencePool CRD (inference.networking.k8s.io/v1, Gateway API "
               "Inference Extension) installed in the cluster; the pool is served by its plain Service meanwhile")


async def apply_routing(kube: Any, pool: Pool) -> str | None:
    """Apply the routing children in order; the problem to report, or None when all were applied."""
    for obj in MR.routing_objects(pool):
        try:
            await kube.apply(obj)
        except NotFound:
            if obj["kind"] == "InferencePool":
                return CRD_MISSING
            raise
    return None
