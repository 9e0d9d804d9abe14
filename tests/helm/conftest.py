"""The `helm` fixture of the chart tests (helpers in helmtest.py)."""

from __future__ import annotations

import pytest
from helmtest import Helm, find_helm


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    return Helm(find_helm(), tmp_path_factory.mktemp("helm-home"))
