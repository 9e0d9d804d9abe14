"""The names of vlmpool's API, in one place: its group and version, its kinds with their plural and
short names.

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
