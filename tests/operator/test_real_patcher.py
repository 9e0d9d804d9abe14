"""The whole adapter path with real parts: the patch Job's container runs the real `vlmpool patch`
on a real PEFT adapter (saved from a tiny Qwen2.5-VL model), the operator reads its termination
message, pushes the version to a real proxy whose engine is the real simulator, and the cleanup Job's
command really removes the files after the unload."""

from __future__ import annotations

import json

import pytest
from test_adapter import adapter_obj, adapter_status, patch_jobs, pool_obj, start_pool_pods
from vlmtest.operator import admin_state, free_port, run_job_pod, wait_job_pod

from vlmpool.kube.client import EVENTS, JOBS, VLMADAPTERS
from vlmpool.testing.waiting import wait_until

pytestmark = pytest.mark.apiserver


def make_peft_adapter(out, r: int = 8):
    """A real PEFT LoRA adapter of a tiny Qwen2.5-VL (real transformers classes, random init)."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": [2, 3, 3]})
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, fullatt_block_indexes=[0]),
        bos_token_id=None, eos_token_id=None, image_token_id=250, video_token_id=251,
        vision_start_token_id=252, vision_end_token_id=253)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                          lora_dropout=0.0))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.05)
    pm.save_pretrained(out)
    data = json.loads((out / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = "Qwen/Qwen2.5-VL-3B-Instruct"
    (out / "adapter_config.json").write_text(json.dumps(data))
    return out


async def test_real_patch_job_to_served_adapter_and_real_cleanup(kube, namespace, operator, adapter_root, tmp_path,
                                                                 pod_processes):
    ns = namespace
    src = make_peft_adapter(tmp_path / "peft")
    await operator()
    admin_port = free_port()
    await kube.create(pool_obj("pool", 1, admin_port, free_port(), free_port()), ns)
    token, ips = await start_pool_pods(kube, ns, "pool", 1, tmp_path, pod_processes)
    await kube.create(adapter_obj("receipts", "pool", f"file://{src}"), ns)
    (job,) = await wait_until(lambda: patch_jobs(kube, ns, "receipts"), what="the patch Job")
    pod = await wait_job_pod(kube, ns, job["metadata"]["name"])
    assert await run_job_pod(kube, pod, tmp_path) == 0

    st = await wait_until(lambda: adapter_status(kube, ns, "receipts", phase="Ready"), timeout=90, what="Ready")
    assert st["loaded"] == "1/1" and st["path"] == f"{adapter_root}/receipts/versions/{st['version']}"
    assert (adapter_root / "receipts" / "versions" / st["version"] / "adapter_config.json").is_file()
    assert st["report"]["tensorsKept"] > 0 and st["report"]["rank"] == 8
    assert st["report"]["declaredBase"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    (ip,) = ips.values()
    (a,) = (await admin_state(ip, admin_port, token))["adapters"]
    assert (a["name"], a["version"], a["state"]) == ("receipts", st["version"], "loaded")

    # Events tell the story on the adapter.
    events = await kube.list(EVENTS, ns, field_selector="involvedObject.name=receipts")
    reasons = {e["reason"] for e in events}
    assert {"PatchJobCreated", "Ready"} <= reasons, reasons
    assert {e["source"].get("component") for e in events} == {"vlmpool-operator"}

    await kube.delete(VLMADAPTERS, "receipts", ns)
    (cj,) = await wait_until(lambda: kube.list(JOBS, ns, label_selector="app.kubernetes.io/component=cleanup"),
                             what="the cleanup Job")
    assert (await admin_state(ip, admin_port, token))["adapters"] == []
    pod = await wait_job_pod(kube, ns, cj["metadata"]["name"])
    assert await run_job_pod(kube, pod, tmp_path) == 0
    assert not (adapter_root / "receipts").exists()
    await wait_until(lambda: _gone(kube, ns), what="the adapter to be gone")


async def _gone(kube, ns):
    return await kube.get_or_none(VLMADAPTERS, "receipts", ns) is None
