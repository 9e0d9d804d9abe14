"""A pool's LoRA-affinity routing children (`spec.routing`): the InferencePool and, unless the pool
brings its own, the endpoint picker (manifests/routing.py), created or applied on each pool reconcile
through controller/children.py like the pool's other children (never another's object of the name).

The InferencePool CRD is the Gateway API Inference Extension's, installed by the cluster's admin (or
with its Gateway). When it is missing the pool is not failed: its Service still serves, and the
reconcile reports what to install (a Warning Event)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from vlmpool.controller.children import Child
from vlmpool.kube.errors import NotFound

CRD_MISSING = ("spec.routing needs the InferencePool CRD (inference.networking.k8s.io/v1, Gateway API "
               "Inference Extension) installed in the cluster; the pool is served by its plain Service meanwhile")


async def apply_routing(put: Callable[[Child], Awaitable[Any]], children: list[Child]) -> str | None:
    """Write the routing children (claimed already) in order; the problem to report, or None when all
    were written."""
    for child in children:
        try:
            await put(child)
        except NotFound:
            if child.obj["kind"] == "InferencePool":
                return CRD_MISSING
            raise
    return None
