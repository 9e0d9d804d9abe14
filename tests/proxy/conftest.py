"""Fixtures for the proxy tests (see tests/vlmtest/proxy.py): the real simulator with a request log, the
real proxy in front of it, real adapter directories, and the openai SDK as client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vlmtest.proxy import Admin, proxy_config, sim, write_adapter  # noqa: F401 - sim: a fixture

from vlmpool.proxy.server import RunningProxy, run_proxy


@pytest.fixture
async def proxy(sim):  # noqa: F811 - sim: the imported fixture
    async with run_proxy(proxy_config(sim.url)) as p:
        yield p


@pytest.fixture
def admin(proxy: RunningProxy) -> Admin:
    return Admin(proxy.admin_url)


@pytest.fixture
def client(proxy: RunningProxy):
    import openai

    c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c


@pytest.fixture
def adapters(tmp_path: Path):
    """adapters(name, version) -> path of a fresh valid adapter directory (immutable per version)."""
    made: dict[tuple[str, str], Path] = {}

    def make(name: str, version: str, **kw: Any) -> str:
        key = (name, version)
        if key not in made:
            made[key] = write_adapter(tmp_path / name / "versions" / version, seed=len(made), **kw)
        return str(made[key])

    return make
