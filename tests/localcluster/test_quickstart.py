"""The quickstart `vlmpool dev` applies, for each engine: what the pool asks for is valid and reaches its
weights through the claim made beside it, and the process kubelet refuses the real engine at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlmpool.api.objects import Adapter, Pool
from vlmpool.localcluster import quickstart as qs
from vlmpool.manifests.pool import deployment
from vlmpool.pins import VLLM_RELEASE

VLMPOOL = str(Path(sys.executable).with_name("vlmpool"))


def _with_uid(obj: dict) -> dict:
    return {**obj, "metadata": {**obj["metadata"], "uid": "u1"}}


@pytest.mark.parametrize("engine", qs.ENGINES)
def test_the_quickstart_is_a_valid_pool_and_adapter(engine):
    pool_obj, adapter_obj = qs.quickstart_manifests("file:///srv/a", 2, engine)
    pool, adapter = Pool.parse(_with_uid(pool_obj)), Adapter.parse(_with_uid(adapter_obj))
    assert adapter.spec.pool_ref.name == pool.name == qs.POOL
    assert pool.spec.replicas == 2


def test_the_real_engine_pool_runs_the_engine_image_on_the_claimed_weights():
    pool_obj = qs.pool_manifest(1, "vllm")
    assert pool_obj["spec"]["engine"]["image"] == qs.DEFAULT_VLLM_IMAGE
    assert qs.DEFAULT_VLLM_IMAGE.endswith(":" + VLLM_RELEASE)
    pv, pvc = qs.weights_volume(Path("/srv/quickstart/weights"))
    assert pvc["metadata"]["name"] == pool_obj["spec"]["model"]["weights"]["claimName"] == qs.WEIGHTS_CLAIM
    assert pv["spec"]["claimRef"] == {"namespace": qs.QUICKSTART_NS, "name": qs.WEIGHTS_CLAIM}
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    dep = deployment(Pool.parse(_with_uid(pool_obj)))
    pod = dep["spec"]["template"]["spec"]
    engine = next(c for c in pod["containers"] if c["name"] == "engine")
    assert engine["image"] == qs.DEFAULT_VLLM_IMAGE
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert qs.WEIGHTS_CLAIM in claims
    assert qs.pool_manifest(1, "vllm", image="reg/x:1")["spec"]["engine"]["image"] == "reg/x:1"
    with pytest.raises(ValueError, match="engine must be one of"):
        qs.pool_manifest(1, "tgi")


def test_smoke_line_says_what_answered():
    ok = qs.smoke_line({"status": 200, "model": "demo-adapter", "usage": {"prompt_tokens": 40, "completion_tokens": 5}})
    assert ok.startswith("HTTP 200, model demo-adapter, 40 prompt tokens")
    assert qs.smoke_line({"status": 404, "error": "no such model"}) == "HTTP 404: no such model"


def test_the_process_kubelet_refuses_the_real_engine_at_once(tmp_path):
    res = subprocess.run([VLMPOOL, "dev", "--engine", "vllm", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "the process kubelet runs no images" in res.stdout
    assert not (tmp_path / "control-plane").exists()  # nothing was started
