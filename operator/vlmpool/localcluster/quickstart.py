"""The quickstart that `vlmpool dev` applies: one pool, one adapter, and what it is made of.

Two engines. `sim` (the default, fast): the vLLM simulator, no weights, the adapter a tiny PEFT LoRA of
the simulator's Qwen2.5-VL shape. `vllm`: vLLM itself (its CPU build, images/vllm-cpu; the real node only),
serving a tiny Qwen2.5-VL made here (random weights, the real architecture, tokenizer and processor:
`vlmpool testing make-model`) that pools reach through `spec.model.weights` — a claim bound to a volume
holding it, as a platform team provisions weights — and the adapter a PEFT LoRA of that very model.

Pure manifests and files: the callers (localcluster/cli.py on the process kubelet, localcluster/realnode.py
on a running cluster) apply them and wait.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from vlmpool.names import API_VERSION
from vlmpool.pins import VLLM_RELEASE

QUICKSTART_NS = "default"
POOL = "demo"
ADAPTER = "demo-adapter"
ENGINES = ("sim", "vllm")
BASE_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"  # the adapters' base_model_name_or_path (testing.adapters)
WEIGHTS_CLAIM = "demo-weights"
# The engine image hack/node.sh builds and imports with NODE_ENGINE=vllm (images/build.sh names it so).
DEFAULT_VLLM_IMAGE = f"ghcr.io/vlmpool/vllm-cpu:{VLLM_RELEASE}"
# The real engine on 2 shared CPU cores: small context and batch, images of at most 64 patches
# (the tiny model's vision tower is random: a few image tokens are as good a check as many).
VLLM_MAX_MODEL_LEN = 1024
VLLM_START_SECONDS = 900


def pool_manifest(replicas: int, engine: str = "sim", image: str | None = None) -> dict[str, Any]:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "sim":
        spec: dict[str, Any] = {
            "model": {"name": BASE_MODEL, "servedName": "qwen2.5-vl-3b", "family": "qwen2_5_vl"},
            "replicas": replicas,
            "engine": {"gpus": 1, "maxLoras": 4, "maxCpuLoras": 8, "maxLoraRank": 64},
            "proxy": {"concurrency": 16},
        }
    else:
        spec = {
            "model": {"name": BASE_MODEL, "servedName": "tiny-vl", "family": "qwen2_5_vl",
                      "weights": {"claimName": WEIGHTS_CLAIM, "path": "/model"},
                      "images": {"minPixels": 4 * 28 * 28, "maxPixels": 64 * 28 * 28}},
            "replicas": replicas,
            "engine": {"image": image or DEFAULT_VLLM_IMAGE, "imagePullPolicy": "IfNotPresent", "gpus": 1,
                       "maxLoras": 2, "maxCpuLoras": 4, "maxLoraRank": 8, "maxModelLen": VLLM_MAX_MODEL_LEN,
                       "startupTimeoutSeconds": VLLM_START_SECONDS,
                       "extraArgs": ["--max-num-seqs", "4", "--dtype", "bfloat16"]},
            "proxy": {"concurrency": 4},
        }
    return {"apiVersion": API_VERSION, "kind": "VLMPool", "metadata": {"name": POOL, "namespace": QUICKSTART_NS},
            "spec": spec}


def adapter_manifest(adapter_uri: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "VLMAdapter", "metadata": {"name": ADAPTER, "namespace": QUICKSTART_NS},
            "spec": {"poolRef": {"name": POOL}, "source": {"uri": adapter_uri}}}


def quickstart_manifests(adapter_uri: str, replicas: int, engine: str = "sim", image: str | None = None) -> list[dict]:
    return [pool_manifest(replicas, engine, image), adapter_manifest(adapter_uri)]


def weights_volume(host_dir: Path) -> list[dict[str, Any]]:
    """A read-only volume holding `host_dir` (the directory that has `model/`) and the claim bound to it:
    how the quickstart pool reaches its weights (`spec.model.weights.claimName`)."""
    pv = f"{QUICKSTART_NS}-{POOL}-weights"
    return [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                  "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(host_dir), "type": "Directory"},
                  "claimRef": {"namespace": QUICKSTART_NS, "name": WEIGHTS_CLAIM}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": WEIGHTS_CLAIM, "namespace": QUICKSTART_NS},
         "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]


def open_for_pods(root: Path, levels: int = 2) -> None:
    """Pods run as uid 65532 and read these through hostPath volumes: safetensors writes 0600 and
    temporary directories are 0700, so open `root`, what it holds and `levels` parents above it."""
    for p in (*root.parents[:levels], root, *root.rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)


def make_material(state_dir: Path, engine: str) -> tuple[Path, Path | None]:
    """The quickstart's files under `state_dir/quickstart`, made once: the adapter (and for the real engine
    the model it fine-tunes). Returns (adapter dir, weights dir or None)."""
    from vlmpool.testing.adapters import make_adapter

    root = Path(state_dir).resolve() / "quickstart"
    if engine == "sim":
        src = root / ADAPTER
        if not (src / "adapter_model.safetensors").exists():
            print("generating a tiny PEFT LoRA adapter for Qwen2.5-VL ...", flush=True)
            make_adapter("qwen2_5_vl", src, r=8, alpha=16)
        open_for_pods(src)
        return src, None
    from vlmpool.testing.vlm_model import make_model

    weights, src = root / "weights", root / f"{ADAPTER}-vllm"
    if not (weights / "model" / "config.json").exists():
        print("making a tiny Qwen2.5-VL for the real engine (random weights, real architecture) ...", flush=True)
        make_model(weights / "model", seed=0)
    if not (src / "adapter_model.safetensors").exists():
        print("generating a PEFT LoRA adapter of that model ...", flush=True)
        make_adapter("qwen2_5_vl", src, r=8, alpha=16, seed=1, model_dir=weights / "model")
    open_for_pods(weights)
    open_for_pods(src)
    return src, weights


def png_data_url(size: int = 64) -> str:
    from vlmpool.testing.images import png

    return "data:image/png;base64," + base64.b64encode(png(size, size)).decode()


def image_chat(base_url: str, model: str = ADAPTER, timeout: float = 120) -> dict[str, Any]:
    """One image chat through the pool's API (`base_url` ends in /v1), as a newcomer's first call: the
    answer's status, the model it names and its token counts (random weights: the text means nothing)."""
    import urllib.error
    import urllib.request

    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "text", "text": "Describe the image."}]}]}
    req = urllib.request.Request(base_url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return {"status": e.code, "error": e.read().decode(errors="replace")[:500]}
    return {"status": status, "model": data.get("model"), "usage": data.get("usage"),
            "content": (data.get("choices") or [{}])[0].get("message", {}).get("content")}


def smoke_line(result: dict[str, Any]) -> str:
    """image_chat's result in one line for a person."""
    if result.get("status") != 200:
        return f"HTTP {result.get('status')}: {result.get('error', '')}"
    usage = result.get("usage") or {}
    return (f"HTTP 200, model {result.get('model')}, {usage.get('prompt_tokens')} prompt tokens (image included), "
            f"{usage.get('completion_tokens')} generated")
