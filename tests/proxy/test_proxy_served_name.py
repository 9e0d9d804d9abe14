"""The proxy applies the same rule as the operator (vlmpool.names.served_name_refusal) to an adapter named
as the base model: a pushed state naming it is refused with the rule's reason, and an entry that reaches the
registry anyway (the base was not known when the state was checked) is failed with that reason, never
dropped silently (it would vanish from the pushed state's report)."""

from __future__ import annotations

from vlmtest.proxy import BASE, V1

from vlmpool.adminwire import DesiredState
from vlmpool.names import SERVED_NAME_IS_BASE, served_name_refusal


def spec(name, version, path):
    return {"name": name, "version": version, "path": path}


async def test_a_state_naming_the_base_is_refused_with_the_rules_reason(proxy, admin, adapters):
    status, body = await admin.put({"generation": 1, "concurrency": 4,
                                    "adapters": [spec(BASE, V1, adapters("a", V1))]})
    assert status == 400 and body["error"]["code"] == "invalid_state"
    assert body["error"]["message"] == f"invalid state: {served_name_refusal(BASE, BASE)}"


async def test_an_entry_named_as_the_base_is_failed_never_dropped(proxy, adapters):
    registry = proxy.proxy.registry
    state = DesiredState.model_validate({"generation": 1, "concurrency": 4, "adapters": [
        spec(BASE, V1, adapters("a", V1)), spec("cats", V1, adapters("cats", V1))]})
    assert registry.apply(state, None)
    report = {a["name"]: a for a in registry.snapshot()["adapters"]}
    assert set(report) == {BASE, "cats"}  # both reported: the clash is not silently left out
    assert report[BASE]["state"] == "failed" and report[BASE]["reason"].startswith(SERVED_NAME_IS_BASE)
    assert report["cats"]["state"] != "failed"
