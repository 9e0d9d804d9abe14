"""The admin wire format (vlmpool/adminwire.py): what the operator builds is what the proxy accepts,
byte for byte as it was before the models were shared."""

from __future__ import annotations

import json

import pytest
from vlmtest.proxy import V1, V2

from vlmpool import adminwire
from vlmpool.adminwire import AdapterEntry, DesiredState
from vlmpool.api.objects import Adapter
from vlmpool.manifests import adapter as MA
from vlmpool.names import API_VERSION

ROOT = "/var/lib/vlmpool/adapters"


def _adapter(name: str, version: str | None, served: str | None = None, ts: str = "2026-01-01T00:00:00Z") -> Adapter:
    spec: dict = {"poolRef": {"name": "pool"}, "source": {"uri": "hf://acme/x@v1"}}
    if served:
        spec["servedName"] = served
    obj = {"apiVersion": API_VERSION, "kind": "VLMAdapter",
           "metadata": {"name": name, "namespace": "ns", "creationTimestamp": ts}, "spec": spec}
    if version:
        obj["status"] = {"version": version, "path": f"{ROOT}/{name}/versions/{version}"}
    return Adapter.parse(obj)


def _push_body(concurrency: int, adapters: list[Adapter], generation: int, load_parallelism: int) -> bytes:
    """The body controller/pushing.py sends: desired_state, its load parallelism, the generation first,
    written by aiohttp's json= (json.dumps)."""
    state, _ = MA.desired_state(concurrency, adapters)
    state["load_parallelism"] = load_parallelism
    return json.dumps({"generation": generation, **state}).encode()


def test_the_operators_push_is_the_wire_format_byte_for_byte():
    body = _push_body(16, [_adapter("zeta", V1), _adapter("alpha", V2), _adapter("pending", None)], 7, 4)
    assert body == (
        b'{"generation": 7, "concurrency": 16, "adapters": ['
        b'{"name": "alpha", "version": "00000002", "path": "/var/lib/vlmpool/adapters/alpha/versions/00000002"}, '
        b'{"name": "zeta", "version": "00000001", "path": "/var/lib/vlmpool/adapters/zeta/versions/00000001"}], '
        b'"load_parallelism": 4}')


def test_the_proxy_validates_what_the_operator_builds_into_the_same_entries():
    adapters = [_adapter("zeta", V1), _adapter("alpha", V2, served="served.alpha")]
    body = _push_body(3, adapters, 2**63 - 1, 64)
    state = DesiredState.model_validate_json(body)
    built = [e for a in adapters if (e := MA.desired_entry(a)) is not None]
    assert isinstance(built[0], AdapterEntry)
    assert state.adapters == sorted(built, key=lambda e: e.name)
    assert (state.generation, state.concurrency, state.load_parallelism) == (2**63 - 1, 3, 64)
    assert all(a.version_problem() is None for a in state.adapters)
    assert len(body) <= adminwire.max_state_bytes(len(adapters))


@pytest.mark.parametrize("change", [
    {"generation": -1}, {"generation": 2**63}, {"concurrency": 0}, {"concurrency": adminwire.MAX_CONCURRENCY + 1},
    {"load_parallelism": adminwire.MAX_LOAD_PARALLELISM + 1}, {"extra": 1}, {"generation": "1"},
])
def test_the_proxy_refuses_a_state_out_of_the_format(change):
    body = json.loads(_push_body(1, [_adapter("a", V1)], 1, 1))
    body.update(change)
    with pytest.raises(ValueError):
        DesiredState.model_validate(body)


def test_the_format_module_imports_nothing_of_vlmpool():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(adminwire.__file__).read_text())
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n.split(".")[0] == "vlmpool" or n.startswith(".")]


def test_the_state_answer_is_one_model_both_sides_read():
    """The proxy writes adminwire.StateSnapshot, the operator reads it (controller/push.py): a full answer
    round-trips; unknown fields are ignored (another release's proxy); a field of the wrong type is a
    failed push with why, not a half-read answer."""
    import json

    from vlmpool.adminwire import StateSnapshot
    from vlmpool.controller.push import _result

    answer = {"generation": 3, "applied": True, "converged_generation": 3, "converged": True, "concurrency": 8,
              "load_parallelism": 2, "counts": {"loaded": 1, "failed": 1},
              "adapters": [{"name": "cats", "version": "00000001", "state": "loaded"},
                           {"name": "dogs", "version": "00000003", "state": "failed", "reason": "rank too high",
                            "serving_version": "00000002"}],
              "unloading": [{"name": "cats", "version": "00000000"}]}
    assert StateSnapshot.model_validate(answer).wire() == answer
    r = _result("pod-a", 200, json.dumps({**answer, "from_a_newer_proxy": 1}), 0.1, 3)
    assert r.ok and r.converged and r.generation == 3
    assert r.adapters["dogs"] == answer["adapters"][1] and r.unloading == {"cats": {"00000000"}}
    assert _result("pod-a", 202, json.dumps({**answer, "converged": False}), 0.1, 3).converged is False
    assert _result("pod-a", 409, json.dumps({**answer, "generation": 9}), 0.1, 3).conflict_generation == 9
    bad = _result("pod-a", 200, json.dumps({**answer, "adapters": [{"name": 7}]}), 0.1, 3)
    assert not bad.ok and "not a state answer" in (bad.error or "")
