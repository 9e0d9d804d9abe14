"""Fixtures for the simulator tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sim_helpers import write_adapter


@pytest.fixture
def adapter(tmp_path):
    """adapter(name, **kw) -> path of a freshly written adapter directory."""
    def make(name: str = "a", **kw: Any) -> Path:
        return write_adapter(tmp_path / name, **kw)
    return make


@pytest.fixture
def fast_config():
    """SimConfig factory with quick latencies and runtime LoRA on."""
    from vlmpool.sim.server import SimConfig

    def make(**kw: Any) -> SimConfig:
        base: dict[str, Any] = dict(model="Qwen/Qwen2.5-VL-3B-Instruct", served_model_name="qwen-base",
                                    enable_lora=True, runtime_lora=True, ttft_ms=1, tpot_ms=0)
        base.update(kw)
        return SimConfig(**base)
    return make
