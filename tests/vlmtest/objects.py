"""Builders of the objects the pure tests feed to vlmpool's typed views and manifest builders: a pool
"vision" and an adapter "invoices" in namespace "ml", as raw objects (`*_obj`) and parsed views."""

from __future__ import annotations

from vlmpool.api.objects import Adapter, Pool
from vlmpool.names import API_VERSION

BASE = "Qwen/Qwen2.5-VL-3B-Instruct"


def pool_obj(**spec) -> dict:
    body = {"model": {"name": BASE, "family": "qwen2_5_vl"}}
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "VLMPool",
            "metadata": {"name": "vision", "namespace": "ml", "uid": "pool-uid"}, "spec": body}


def pool(**spec) -> Pool:
    return Pool.parse(pool_obj(**spec))


def adapter_obj(name: str = "invoices", **spec) -> dict:
    body = {"poolRef": {"name": "vision"}, "source": {"uri": "hf://acme/invoices@v3"}}
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "VLMAdapter",
            "metadata": {"name": name, "namespace": "ml", "uid": "0f1e2d3c-aaaa-bbbb-cccc-000000000000",
                         "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": body}


def adapter(name: str = "invoices", **spec) -> Adapter:
    return Adapter.parse(adapter_obj(name, **spec))
