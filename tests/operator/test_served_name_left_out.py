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
    _, conds = D.adapter_loads(clash, [], {}, ["p0", "p1"], {}, left_out)
    assert conds == [("Loaded", "False", SERVED_NAME_IS_BASE, f"not pushed: {left_out['clash']}")]
    # a served name that only resembles the base, or another pool's base, is served
    assert D.left_out_of_push([_adapter("a", served=BASE.lower())], BASE, ROOT) == {}
    assert D.left_out_of_push([clash], "other-base", ROOT) == {}


async def test_the_operators_push_leaves_it_out_and_pushes_the_others():
    """The operator's push itself applies the rule (a stand-in API server, no pods): the pushed state holds
    the other adapter, and the clashing one is handed to the status step with the rule's reason."""
    from unittest.mock import AsyncMock, MagicMock

    from vlmpool.controller import pushing
    from vlmpool.kube.client import VLMADAPTERS, VLMPOOLS

    pool = {"apiVersion": "v", "kind": "VLMPool", "metadata": {"name": "p", "namespace": "ns", "uid": "u-p"},
            "spec": {"model": {"name": BASE, "family": "qwen2_5_vl"}}, "status": {}}
    adapters = [_adapter("clash", served=BASE), _adapter("cats")]

    class StandIn:
        async def get_or_none(self, res, name, ns):
            assert res is VLMPOOLS
            return pool

        async def list(self, res, ns, **selectors):
            return [a.obj for a in adapters] if res is VLMADAPTERS else []  # no pods, Deployments, ReplicaSets

        async def patch_status(self, *args, **kwargs):
            return {}

    # the pusher without its class's other parts: whatever the push asks besides the API server answers
    # nothing (no pods, no status writes that matter here); what it hands to its status step is recorded
    me = MagicMock()
    me.kube, me.config.adapter_root = StandIn(), ROOT
    me._pool_adapters = AsyncMock(return_value=adapters)
    me._own_pods = AsyncMock(return_value=[])
    me._record_loads = AsyncMock(return_value=False)
    me.status, me.health, me._write_pool_status = AsyncMock(), AsyncMock(), AsyncMock()
    push = next(c._push for c in vars(pushing).values() if isinstance(c, type) and "_push" in vars(c))
    summary = await push(me, "ns", "p", pushing._PoolPush())
    assert summary is not None and [a["name"] for a in summary.state["adapters"]] == ["cats"]
    invalid = me._record_loads.await_args.kwargs["invalid"]
    assert invalid == {"clash": served_name_refusal(BASE, BASE)}
