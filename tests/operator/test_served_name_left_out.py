"""One rule for a served name equal to the pool's base model's name (vlmpool.names.served_name_refusal):
the operator leaves such an adapter out of its pool's push, alone, and says why in its Loaded condition
(a stable reason, ServedNameIsBaseModel); the other adapters of the pool are pushed. No cluster needed."""

from __future__ import annotations

from typing import Any

from vlmpool.api.objects import Adapter
from vlmpool.controller import decisions as D
from vlmpool.names import SERVED_NAME_IS_BASE, served_name_refusal

BASE = "Qwen/Qwen2.5-VL-3B-Instruct"
ROOT = "/var/lib/vlmpool/adapters"
VERSION = "0000000a"


def _adapter(name: str, served: str | None = None) -> Adapter:
    spec: dict[str, Any] = {"poolRef": {"name": "p"}, "source": {"uri": f"hf://acme/{name}@v1"}}
    if served is not None:
        spec["servedName"] = served
    status = {"version": VERSION, "path": f"{ROOT}/{name}/versions/{VERSION}"}
    return Adapter.parse({"metadata": {"name": name, "namespace": "ns", "uid": "u-" + name},
                          "spec": spec, "status": status})


def test_the_rule():
    assert served_name_refusal("cats", BASE) is None
    assert served_name_refusal(BASE, None) is None  # the base is not known: nothing to compare
    why = served_name_refusal(BASE, BASE)
    assert why is not None and why.startswith(SERVED_NAME_IS_BASE) and repr(BASE) in why


def test_an_adapter_served_as_the_base_is_left_out_alone_with_its_reason():
    clash, fine = _adapter("clash", served=BASE), _adapter("cats")
    left_out = D.left_out_of_push([clash, fine], BASE, ROOT)
    assert left_out == {"clash": served_name_refusal(BASE, BASE)}  # refused, and only it
    fields, conds = D.adapter_loads(clash, [], {}, ["p0", "p1"], {}, left_out)
    assert fields["loaded"] == "0/2" and fields["pods"] == []
    assert conds == [("Loaded", "False", SERVED_NAME_IS_BASE, f"not pushed: {left_out['clash']}")]
    # a served name that only resembles the base, or another pool's base, is served
    assert D.left_out_of_push([_adapter("a", served=BASE.lower())], BASE, ROOT) == {}
    assert D.left_out_of_push([clash], "other-base", ROOT) == {}


async def test_the_operators_push_leaves_it_out_and_pushes_the_others():
    """The reconciler's push itself applies the rule (a stand-in API server, no pods): the pushed state
    holds the other adapter, the clashing one gets its Loaded condition with the rule's reason."""
    from vlmpool.controller.pushing import _PoolPush
    from vlmpool.controller.reconciler import Reconciler
    from vlmpool.kube.client import VLMADAPTERS, VLMPOOLS

    pool = {"apiVersion": "v", "kind": "VLMPool", "metadata": {"name": "p", "namespace": "ns", "uid": "u-p"},
            "spec": {"model": {"name": BASE, "family": "qwen2_5_vl"}}, "status": {}}
    adapters = [_adapter("clash", served=BASE).obj, _adapter("cats").obj]
    written: dict[str, list] = {}

    class StandIn:
        async def get_or_none(self, res, name, ns):
            assert res is VLMPOOLS
            return pool

        async def list(self, res, ns, **selectors):
            return adapters if res is VLMADAPTERS else []  # no pods, Deployments or ReplicaSets

        async def patch_status(self, *args, **kwargs):
            return {}

    class Recording(Reconciler):
        async def _write_adapter_status(self, adapter, fields, conds=(), only_if=None):
            written[adapter["metadata"]["name"]] = list(conds)
            return adapter

        async def _write_pool_status(self, pool, fields, conds=()):
            return pool

    r = Recording(kube=StandIn())  # type: ignore[arg-type]
    r.config.adapter_root = ROOT
    summary = await r._push("ns", "p", _PoolPush())
    assert summary is not None and [a["name"] for a in summary.state["adapters"]] == ["cats"]
    assert written["clash"] == [("Loaded", "False", SERVED_NAME_IS_BASE,
                                 f"not pushed: {served_name_refusal(BASE, BASE)}")]
    assert all(c[2] != SERVED_NAME_IS_BASE for c in written["cats"])
