"""tests/vllm: vLLM's own LoRA loader (the pinned release, sim/contract.py VLLM_RELEASE) judges the
patcher's outputs and the simulator's verdicts. `make test-vllm` makes the separate environment
(hack/vllm-env.sh) and sets VLMPOOL_VLLM_PYTHON; without it (the main suite) every test here is skipped."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = os.environ.get("VLMPOOL_VLLM_PYTHON")
    if not python:
        pytest.skip("run by `make test-vllm` (needs the pinned vLLM environment, VLMPOOL_VLLM_PYTHON)")
    if not os.access(python, os.X_OK):
        pytest.fail(f"VLMPOOL_VLLM_PYTHON={python} is not an executable (run `bash hack/vllm-env.sh`)")
    return python
