from __future__ import annotations

import pytest

from vlmpool.localcluster.kubelet import NodeConfig
from vlmpool.localcluster.runtime import mounts_supported


@pytest.fixture(scope="module")
def local_node(control_plane, tmp_path_factory):
    ok, why = mounts_supported()
    if not ok:
        pytest.skip(f"process kubelet unavailable here: {why}")
    from vlmpool.localcluster.node import LocalNode

    node = LocalNode(control_plane.kubeconfig, tmp_path_factory.mktemp("node"), NodeConfig(gpus=2))
    node.start()
    yield node
    node.stop()
