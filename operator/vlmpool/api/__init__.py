"""The typed API of vlmpool (group vlmpool.io, version v1alpha1): the one source of truth for the CRDs."""

from vlmpool.api.adapter import VLMAdapterSpec, VLMAdapterStatus
from vlmpool.api.pool import VLMPoolSpec, VLMPoolStatus

__all__ = ["VLMAdapterSpec", "VLMAdapterStatus", "VLMPoolSpec", "VLMPoolStatus"]
