"""engine.towerConnectorLora: the engine gets vLLM's --enable-tower-connector-lora, the patch Job
--tower-connector-lora, and it is a patch input (a new version) only when on."""

from __future__ import annotations

from vlmtest.objects import adapter, pool

from vlmpool.manifests import adapter as MA
from vlmpool.manifests.pool import engine_args


def test_tower_connector_lora_flags_and_digest():
    off, on = pool(), pool(engine={"towerConnectorLora": True})
    assert "--enable-tower-connector-lora" not in engine_args(off.spec)
    assert "--enable-tower-connector-lora" in engine_args(on.spec)
    assert "--tower-connector-lora" not in MA.patch_args(adapter(), off)
    assert "--tower-connector-lora" in MA.patch_args(adapter(), on)
    # off: the digest of every existing adapter is what it was; on: a new patch input
    assert "towerConnectorLora" not in MA.patch_inputs(adapter(), off)
    assert MA.spec_digest(adapter(), on) != MA.spec_digest(adapter(), off)
