"""A pool's children are created only when absent, changed only when already the pool's own.

Every child of a pool (adapter PVC, admin-token Secret, Deployment, Service and the routing children)
goes through :func:`claim` then :func:`put`; nothing else in the operator writes them. A child is the
pool's own when its first ownerReference is the pool's, as controller, with the pool's uid (the one
:func:`vlmpool.manifests.common.owner_reference` writes). Another team's object of the same name (a
Service, a Secret, a Role, ...) is never changed: the pool reports the conflict instead, and since it
never gets the pool's ownerReference the garbage collector never deletes it with the pool.

How, with the rights the operator has anyway (create and patch on each child kind; no get, so no
Secret is ever read):

- **Whose is it.** A JSON patch of two ``test`` operations (the first ownerReference's uid is the
  pool's, and it is the controller). It changes nothing: 200 and the object (its uid) when it is
  the pool's, 422 when it is anyone else's (the test failed, or the object has no ownerReference), 404
  when there is no such object.
- **Absent: create.** A plain POST, so an object that appeared since (a race) fails AlreadyExists and
  is checked again, never taken over. The create's field ownership is then handed to the operator's
  server-side apply manager (operation Update -> Apply, as ``kubectl``'s client-side-apply upgrade
  does), so a field the pool later drops is removed by the next apply.
- **The pool's own: server-side apply** as before, with ``metadata.uid`` set to the uid the check
  saw: the apiserver refuses the apply if the object was deleted (409) or replaced (422) in between.

All of a pool's children are checked before any is written (:func:`claim`): a conflict on one leaves
the others as they were. Cost: one request per child for the check plus one for the write (two on
creation); no per-adapter request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmpool.kube.client import Conflict, Invalid, KubeClient, NotFound, resource_for

REASON = "ChildConflict"


class ChildConflict(Exception):
    """Children of the pool's names exist and are not the pool's: nothing was written."""

    def __init__(self, pool: str, conflicts: list[str]):
        self.conflicts = conflicts
        super().__init__(f"not the pool's own, left untouched: {'; '.join(conflicts)} (another object already "
                         f"has the name; rename the pool or remove that object: VLMPool {pool} creates it then)")


@dataclass
class Child:
    obj: dict[str, Any]
    uid: str | None  # the existing object's uid when it is the pool's own; None when absent


def describe(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']} {meta.get('namespace', '')}/{meta['name']}"


def _ownership_test(pool_uid: str) -> list[dict[str, Any]]:
    return [{"op": "test", "path": "/metadata/ownerReferences/0/uid", "value": pool_uid},
            {"op": "test", "path": "/metadata/ownerReferences/0/controller", "value": True}]


async def _whose(kube: KubeClient, obj: dict[str, Any], pool_uid: str) -> tuple[bool, str | None]:
    """(exists, uid if the pool's own). A foreign object is (True, None)."""
    meta = obj["metadata"]
    try:
        got = await kube.patch(resource_for(obj), meta["name"], _ownership_test(pool_uid), meta["namespace"],
                               patch_type="json")
    except NotFound:
        return False, None
    except Invalid:
        return True, None
    return True, got["metadata"]["uid"]


async def claim(kube: KubeClient, pool: dict[str, Any], objs: list[dict[str, Any]]) -> list[Child]:
    """Check every child before any is written; ChildConflict names each one that is not the pool's."""
    pool_uid = pool["metadata"]["uid"]
    out, conflicts = [], []
    for obj in objs:
        exists, uid = await _whose(kube, obj, pool_uid)
        if exists and uid is None:
            conflicts.append(describe(obj))
        out.append(Child(obj, uid))
    if conflicts:
        raise ChildConflict(pool["metadata"]["name"], conflicts)
    return out


async def put(kube: KubeClient, pool: dict[str, Any], child: Child) -> dict[str, Any]:
    """Create the child (absent) or apply it (the pool's own); ChildConflict when it turned out to be
    another's (it appeared, or was replaced, since claim())."""
    pool_uid = pool["metadata"]["uid"]
    obj, uid = child.obj, child.uid
    for _ in range(3):
        if uid is None:
            try:
                return await _create(kube, obj)
            except Conflict:  # AlreadyExists: someone's since claim()
                pass
        else:
            body = {**obj, "metadata": {**obj["metadata"], "uid": uid}}
            try:
                return await kube.apply(body)
            except (Conflict, Invalid) as e:
                # 409: gone since; 422: immutable uid (replaced since), or a real validation error
                if isinstance(e, Invalid) and "uid" not in str(e):
                    raise
        exists, uid = await _whose(kube, obj, pool_uid)
        if exists and uid is None:
            raise ChildConflict(pool["metadata"]["name"], [describe(obj)])
    raise Conflict(409, "Conflict", f"{describe(obj)} kept changing under the operator")


async def _create(kube: KubeClient, obj: dict[str, Any]) -> dict[str, Any]:
    created = await kube.create(obj)
    meta = created["metadata"]
    entries = meta.get("managedFields") or []
    mine = [e for e in entries if e.get("manager") == kube.field_manager and e.get("operation") == "Update"
            and not e.get("subresource")]
    if not mine:
        return created
    handed = [dict(e, operation="Apply") if e in mine else e for e in entries]
    try:
        return await kube.patch(resource_for(obj), meta["name"], [
            {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
            {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]},
            {"op": "replace", "path": "/metadata/managedFields", "value": handed}], meta["namespace"],
            patch_type="json")
    except (Invalid, NotFound, Conflict):
        # Changed (or gone) since: the create stands; the next apply co-owns its fields.
        return created
