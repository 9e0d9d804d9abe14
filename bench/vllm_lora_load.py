"""How long vLLM's own add_lora disk read takes for a real-size adapter (the figure behind
bench/scale.py's default --lora-load-ms). Runs under the pinned vLLM's environment, not vlmpool's:

    "$(bash hack/vllm-env.sh | tail -n1)" bench/vllm_lora_load.py [--rank 16] [--repeat 20]

It writes a PEFT LoRA shaped like a Qwen2.5-VL-3B fine-tune (36 layers, hidden 2048, MLP 11008, GQA
k/v 256, the 7 language projections; bf16) and times what WorkerLoRAManager._load_adapter runs on
the CPU: PEFTHelper.from_local_dir, validate_legal and LoRAModel.from_local_checkpoint(device="cpu"),
with pin_memory off (no GPU here; on a GPU host pinning adds to this). The file is read from the page
cache after the first round, as on a node that just wrote it. Prints the median and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"q_proj": (2048, 2048), "k_proj": (2048, 256), "v_proj": (2048, 256), "o_proj": (2048, 2048),
          "gate_proj": (2048, 11008), "up_proj": (2048, 11008), "down_proj": (11008, 2048)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    import torch
    import vllm.lora.lora_model as lm
    from safetensors.torch import save_file
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    lm.PIN_MEMORY = False  # pin_memory() is the only CUDA call on this path (no GPU here)
    d = Path(tempfile.mkdtemp(prefix="vllm-lora-load-"))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(args.layers):
        for mod, (fan_in, fan_out) in SHAPES.items():
            part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            p = f"base_model.model.model.layers.{i}.{part}.{mod}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(args.rank, fan_in, generator=g).to(torch.bfloat16)
            tensors[f"{p}.lora_B.weight"] = (torch.randn(fan_out, args.rank, generator=g) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": list(SHAPES),
        "bias": "none", "task_type": "CAUSAL_LM"}))
    size_mb = (d / "adapter_model.safetensors").stat().st_size / 1e6
    cfg = LoRAConfig(max_lora_rank=max(16, args.rank), max_loras=1)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        helper = PEFTHelper.from_local_dir(str(d), max_position_embeddings=None)
        helper.validate_legal(cfg)
        lm.LoRAModel.from_local_checkpoint(str(d), set(SHAPES), helper, lora_model_id=1, device="cpu",
                                           dtype=torch.bfloat16)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:] or times)
    print(f"adapter {size_mb:.1f} MB (rank {args.rank}, {args.layers} layers x 7 projections): "
          f"first read {times[0] * 1000:.0f} ms, median of the rest {med * 1000:.0f} ms")
    print(json.dumps({"bench": "vllm_lora_load", "vllm": __import__("vllm").__version__, "rank": args.rank,
                      "size_mb": round(size_mb, 1), "first_ms": round(times[0] * 1000, 1),
                      "median_ms": round(med * 1000, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
