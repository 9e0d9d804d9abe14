"""The typed views of api/objects.py: a spec is validated once, in parse; the builders only read it."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError
from vlmtest.objects import adapter_obj, pool_obj

from vlmpool.api.adapter import VLMAdapterSpec
from vlmpool.api.objects import Adapter, Pool
from vlmpool.api.pool import VLMPoolSpec
from vlmpool.manifests import adapter as MA
from vlmpool.manifests import pool as MP
from vlmpool.manifests import routing as MR


@pytest.fixture
def validations(monkeypatch) -> list[str]:
    """Every model_validate of a VLMPoolSpec or VLMAdapterSpec, by class name."""
    calls: list[str] = []
    for cls in (VLMPoolSpec, VLMAdapterSpec):
        orig = cls.model_validate

        def counting(obj, *a, _orig=orig, _name=cls.__name__, **kw):
            calls.append(_name)
            return _orig(obj, *a, **kw)

        monkeypatch.setattr(cls, "model_validate", counting)
    return calls


def test_specs_are_parsed_once_and_the_builders_only_read_them(validations):
    p = Pool.parse(pool_obj(routing={}))
    a = Adapter.parse(adapter_obj())
    assert validations == ["VLMPoolSpec", "VLMAdapterSpec"]
    MP.adapter_pvc(p), MP.admin_secret(p, "t"), MP.deployment(p, "h"), MP.service(p), MP.endpoint(p)
    MR.routing_objects(p)
    MA.patch_job(a, p), MA.cleanup_job(a, p), MA.prune_job(a, p, "v1"), MA.spec_digest(a, p)
    MA.desired_state(4, [a])
    assert validations == ["VLMPoolSpec", "VLMAdapterSpec"]


def test_views_carry_the_raw_object_and_the_typed_spec():
    obj = pool_obj(replicas=3)
    obj["metadata"].update(generation=5)
    obj["status"] = {"replicas": 1}
    p = Pool.parse(obj)
    assert p.obj is obj and isinstance(p.spec, VLMPoolSpec) and p.spec.replicas == 3
    assert (p.name, p.namespace, p.uid, p.generation) == ("vision", "ml", "pool-uid", 5)
    assert p.metadata is obj["metadata"] and p.status == {"replicas": 1}
    assert Pool.parse(pool_obj()).status == {} and Pool.parse(pool_obj()).generation is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.spec = Pool.parse(pool_obj()).spec  # type: ignore[misc]


def test_invalid_specs_raise_pydantic_validation_errors():
    with pytest.raises(ValidationError, match="cannot both be 0"):
        Pool.parse(pool_obj(rollout={"maxSurge": 0, "maxUnavailable": 0}))
    with pytest.raises(ValidationError):
        Pool.parse({"metadata": {"name": "empty", "namespace": "ml"}})  # no spec: spec.model is required
    with pytest.raises(ValidationError):
        Adapter.parse(adapter_obj(source={"uri": "ftp://x/y"}))


def test_served_names():
    base = pool_obj()["spec"]["model"]["name"]
    assert Pool.parse(pool_obj()).served_name == base  # unset: the model's name
    named = pool_obj(model={"name": base, "family": "qwen2_5_vl", "servedName": "qwen-vl"})
    assert Pool.parse(named).served_name == "qwen-vl"
    assert Adapter.parse(adapter_obj("invoices")).served_name == "invoices"  # unset: the object's name
    assert Adapter.parse(adapter_obj("invoices", servedName="inv-v3")).served_name == "inv-v3"


def test_with_obj_reuses_the_parsed_spec_unless_the_spec_changed(validations):
    a = Adapter.parse(adapter_obj())
    newer = adapter_obj()
    newer["status"] = {"phase": "Ready"}
    b = a.with_obj(newer)
    assert b.obj is newer and b.spec is a.spec and b.status == {"phase": "Ready"}
    assert validations == ["VLMAdapterSpec"]
    c = a.with_obj(adapter_obj(servedName="renamed"))
    assert c.served_name == "renamed" and validations == ["VLMAdapterSpec"] * 2
    p = Pool.parse(pool_obj())
    assert p.with_obj(pool_obj()).spec is p.spec
    assert p.with_obj(pool_obj(replicas=2)).spec.replicas == 2
