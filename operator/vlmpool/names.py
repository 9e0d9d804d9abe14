"""The names of vlmpool's API, in one place: its group and version, its kinds with their plural and
short names, and the rule on the names adapters are served under.

Neutral on purpose: it imports nothing of vlmpool, so the API (the CRD generator), the manifests, the
kube client, the controller, the proxy and the tests all read these names from here. The generated CRDs
(crds/, charts/vlmpool/crds/) spell them too: ``make crds`` writes them from this module.
"""

from __future__ import annotations

GROUP = "vlmpool.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"  # an object's apiVersion

POOL_KIND = "VLMPool"
POOL_PLURAL = "vlmpools"
POOL_SHORT = "vlmp"
ADAPTER_KIND = "VLMAdapter"
ADAPTER_PLURAL = "vlmadapters"
ADAPTER_SHORT = "vlma"

# The reason (condition and error code) of an adapter refused for its served name, and the one rule.
SERVED_NAME_IS_BASE = "ServedNameIsBaseModel"


def served_name_refusal(served: str, base: str | None) -> str | None:
    """Why an adapter may not be served under ``served`` on a pool whose base model is served as ``base``
    (None: it may). A request's ``model`` names either the base or one adapter, so a served name equal to
    the base model's is refused, never silently dropped nor routed to the base."""
    if base is not None and served == base:
        return (f"{SERVED_NAME_IS_BASE}: the served name {served!r} is the pool's base model's name; "
                "give the adapter another spec.servedName")
    return None
