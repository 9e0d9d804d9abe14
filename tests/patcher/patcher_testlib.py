"""Helpers of the patcher tests (imported by conftest.py and the tests): tiny Qwen VL models and
real PEFT adapters made from them."""

from __future__ import annotations

import json
from pathlib import Path

from vlmpool.testing.adapters import (  # noqa: F401 - re-exported for the patcher tests
    FAMILIES,
    LANG_TARGETS,
    POOL_BASE,
    VISION_TARGETS,
    make_adapter,
    tiny_model,
)


def edit_config(adapter_dir: Path, **changes) -> None:
    p = adapter_dir / "adapter_config.json"
    data = json.loads(p.read_text())
    for k, v in changes.items():
        if v is _DELETE:
            data.pop(k, None)
        else:
            data[k] = v
    p.write_text(json.dumps(data, indent=2))


_DELETE = object()


def load_peft(family: str, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_model(family), str(adapter_dir)).eval()
