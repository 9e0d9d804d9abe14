"""The one status writer (controller/statuswriter.py): typed changes, one owner per condition."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pydantic
import pytest

from vlmpool.api.adapter import VLMAdapterStatus
from vlmpool.api.pool import VLMPoolStatus
from vlmpool.controller import statuswriter as W
from vlmpool.controller.common import Events
from vlmpool.controller.reconciler import Controller
from vlmpool.kube.client import VLMADAPTERS, VLMPOOLS

ARCHITECTURE = Path(__file__).parents[2] / "docs" / "architecture.md"


class FakeKube:
    """Records the status patches; answers with the object patched."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, str, dict[str, Any]]] = []

    async def patch(self, res, name, body, namespace=None, subresource=None):
        assert subresource == "status"
        self.patches.append((res.plural, name, body))
        return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "2"},
                "status": body["status"]}

    async def patch_status(self, res, name, status, namespace=None):
        return await self.patch(res, name, {"status": status}, namespace, subresource="status")

    async def get_or_none(self, res, name, namespace=None):
        return None


def _obj(name: str = "a", status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "generation": 3, "resourceVersion": "1"},
            "status": status or {}}


def _writer() -> tuple[FakeKube, W.StatusWriter, list[tuple[str, str]]]:
    kube = FakeKube()
    posted: list[tuple[str, str]] = []
    events = Events(lambda body, type_, reason, message: posted.append((type_, reason)))
    return kube, W.StatusWriter(kube, events), posted  # type: ignore[arg-type]


async def test_a_typed_change_is_written_as_the_status_model_spells_it():
    kube, writer, posted = _writer()
    adapters = writer.owned_by(W.ADAPTERS)
    await adapters.adapter(_obj(), VLMAdapterStatus(observed_generation=3, served_name="inv", spec_digest="d"),
                           [("PoolFound", "True", "PoolFound", "served by VLMPool p")])
    ((plural, name, body),) = kube.patches
    assert (plural, name) == (VLMADAPTERS.plural, "a")
    assert body["metadata"] == {"resourceVersion": "1"}
    st = body["status"]
    assert {k: st[k] for k in ("observedGeneration", "servedName", "specDigest")} == {
        "observedGeneration": 3, "servedName": "inv", "specDigest": "d"}
    assert st["phase"] == "Pending" and [c["type"] for c in st["conditions"]] == ["Ready", "PoolFound"]
    assert posted == [("Normal", "Pending")]
    # recording a version resets Loaded in the same write (the pusher's results come after the push)
    kube.patches.clear()
    await adapters.adapter(_obj(), VLMAdapterStatus(version="v1", path="/p"), [("Patched", "True", "Patched", "v1")])
    ((_, _, body),) = kube.patches
    loaded = next(c for c in body["status"]["conditions"] if c["type"] == "Loaded")
    assert (loaded["status"], loaded["reason"]) == ("Unknown", "Registering")
    assert body["status"]["phase"] == "Registering"
    # an unlocked merge of fields only
    kube.patches.clear()
    await writer.owned_by(W.PUSHER).pool_fields("ns", "p", VLMPoolStatus(desired_state_generation=4))
    assert kube.patches == [(VLMPOOLS.plural, "p", {"status": {"desiredStateGeneration": 4}})]


async def test_a_misspelled_or_mistyped_status_field_is_refused_before_any_write():
    kube, writer, _ = _writer()
    adapters = writer.owned_by(W.ADAPTERS)
    with pytest.raises(pydantic.ValidationError):
        VLMAdapterStatus(servd_name="inv")  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        VLMAdapterStatus.model_validate({"servedNmae": "inv"})
    with pytest.raises(pydantic.ValidationError):
        VLMPoolStatus.model_validate({"adaptersReady": "1/1", "adapters": {"totl": 1}})
    # at the writer: a raw dict (the old way, whose misspelled keys the apiserver pruned) ...
    with pytest.raises(W.StatusRefused):
        await adapters.adapter(_obj(), {"servedNmae": "inv"})  # type: ignore[arg-type]
    # ... a change altered after it was made (pydantic does not validate an assignment) ...
    change = VLMAdapterStatus(loaded_pods=1)
    change.loaded_pods = "one"  # type: ignore[assignment]
    with pytest.raises(pydantic.ValidationError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic's serializer warns of the str where an int belongs
        await adapters.adapter(_obj(), change)
    # ... a field the writer derives, and a pool change given for an adapter
    with pytest.raises(W.StatusRefused):
        await adapters.adapter(_obj(), VLMAdapterStatus(phase="Ready"))
    with pytest.raises(W.StatusRefused):
        await adapters.adapter(_obj(), VLMPoolStatus(replicas=1))  # type: ignore[arg-type]
    assert kube.patches == []


async def test_each_condition_is_written_by_its_owner_alone():
    kube, writer, _ = _writer()
    for kind, owners in W.CONDITION_OWNERS.items():
        write = (lambda h, c: h.adapter(_obj(), None, [c])) if kind == "VLMAdapter" else (
            lambda h, c: h.pool(_obj(), None, [c]))
        for ctype, owner in owners.items():
            for part in W.PARTS:
                if part != owner:
                    with pytest.raises(W.StatusRefused, match=ctype):
                        await write(writer.owned_by(part), (ctype, "True", "R", "m"))
    assert kube.patches == []
    # a condition type nobody owns (a misspelling), a status that is not one
    with pytest.raises(W.StatusRefused, match="no condition 'Loadd'"):
        await writer.owned_by(W.PUSHER).adapter(_obj(), None, [("Loadd", "True", "Loaded", "")])
    with pytest.raises(W.StatusRefused, match="status 'true'"):
        await writer.owned_by(W.HEALTH).pool(_obj(), None, [("Degraded", "true", "R", "")])
    with pytest.raises(W.StatusRefused):
        writer.owned_by("someone")
    assert kube.patches == []
    # the owner writes it
    await writer.owned_by(W.HEALTH).pool(_obj(), None, [("Degraded", "True", "PushFailed", "1/1 pods")])
    assert [c["type"] for c in kube.patches[0][2]["status"]["conditions"]] == ["Degraded"]


def test_the_assembly_gives_each_part_its_own_handle():
    parts = Controller(kube=None)  # type: ignore[arg-type]
    handles = {"pools": parts.pools.status, "adapters": parts.adapters.status, "pusher": parts.pusher.status,
               "health": parts.health.status, "deleter": parts.deleter.status}
    assert {k: h.owner for k, h in handles.items()} == {
        "pools": W.POOLS, "adapters": W.ADAPTERS, "pusher": W.PUSHER, "health": W.HEALTH, "deleter": W.DELETER}
    assert len({id(h.writer) for h in handles.values()}) == 1  # one writer


def test_the_condition_owner_table_in_the_docs_is_the_writers():
    """docs/architecture.md's table of condition owners says what CONDITION_OWNERS says."""
    text = ARCHITECTURE.read_text()
    rows = re.findall(r"^\| (VLMAdapter|VLMPool) \| `([A-Za-z]+)` \| ([a-z ]+) \|", text, re.M)
    assert rows, "no condition owner table in docs/architecture.md"
    documented: dict[str, dict[str, str]] = {}
    for kind, ctype, owner in rows:
        documented.setdefault(kind, {})[ctype] = owner.strip()
    assert documented == W.CONDITION_OWNERS
