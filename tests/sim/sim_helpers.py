"""Helpers for the simulator tests: real adapter directories (adapter_config.json + safetensors
written with torch) and a hand-built PNG."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

QWEN_LM = "base_model.model.model.language_model.layers.{i}.self_attn.{m}"


def write_adapter(
    path: Path,
    *,
    r: int = 8,
    modules: list[str] | None = None,
    config: dict[str, Any] | None = None,
    rank_in_tensors: int | None = None,
    hidden: int = 16,
    extra_tensors: dict[str, Any] | None = None,
) -> Path:
    """Write a small but real LoRA adapter: adapter_config.json and adapter_model.safetensors."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                           "target_modules": ["q_proj", "v_proj"], "bias": "none",
                           "base_model_name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct"}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    modules = modules if modules is not None else [QWEN_LM.format(i=0, m="q_proj"), QWEN_LM.format(i=0, m="v_proj")]
    rt = rank_in_tensors or r
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in modules:
        tensors[f"{m}.lora_A.weight"] = torch.randn(rt, hidden, generator=g)
        tensors[f"{m}.lora_B.weight"] = torch.randn(hidden, rt, generator=g)
    tensors.update(extra_tensors or {})
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def png_bytes(width: int = 2, height: int = 2) -> bytes:
    """A valid PNG image, built by hand (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
