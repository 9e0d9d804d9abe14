"""Good and bad adapter directories on which the simulator's verdict must equal vLLM's own loader's.

Each entry: (id, family, expected verdict of vLLM for the record, writer arguments). The verdict column is
documentation only: the test compares the simulator with what vLLM actually answers, and prints both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LM = "base_model.model.model.language_model.layers.{i}.{m}"
LEGACY = "base_model.model.model.layers.{i}.{m}"
VLLM_LAYOUT = "base_model.model.language_model.model.layers.{i}.{m}"
HIDDEN = 16


def write(path: Path, *, r: int = 8, modules=None, config: dict[str, Any] | None = None, rank_in_tensors=None,
          extra: dict[str, tuple[int, ...]] | None = None, drop_config: tuple[str, ...] = (),
          weights: bool = True) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
                           "bias": "none", "task_type": "CAUSAL_LM"}
    cfg.update(config or {})
    for k in drop_config:
        cfg.pop(k, None)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    if not weights:
        return path
    if modules is None:
        modules = [LM.format(i=0, m="self_attn.q_proj"), LM.format(i=0, m="self_attn.v_proj")]
    rt = rank_in_tensors or r
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in modules:
        tensors[f"{m}.lora_A.weight"] = torch.randn(rt, HIDDEN, generator=g)
        tensors[f"{m}.lora_B.weight"] = torch.randn(HIDDEN, rt, generator=g)
    for key, shape in (extra or {}).items():
        tensors[key] = torch.ones(shape)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


ALL7 = [LM.format(i=i, m=m) for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]

CORPUS: list[tuple[str, str, str, dict[str, Any]]] = [
    # ---- loaded by vLLM
    ("plain-qv", "qwen2_5_vl", "ok", {}),
    ("all-projections", "qwen2_5_vl", "ok", {"modules": ALL7}),
    ("legacy-layers-qwen2", "qwen2_vl", "ok", {"modules": [LEGACY.format(i=0, m="self_attn.q_proj")]}),
    ("legacy-layers-qwen3", "qwen3_vl", "ok", {"modules": [LEGACY.format(i=0, m="self_attn.q_proj")]}),
    ("vllm-layout", "qwen3_vl", "ok", {"modules": [VLLM_LAYOUT.format(i=0, m="self_attn.q_proj")]}),
    ("vision-tower-qwen2", "qwen2_vl", "ok", {"modules": [LM.format(i=0, m="self_attn.q_proj"),
                                                         "base_model.model.model.visual.blocks.0.attn.qkv",
                                                         "base_model.model.model.visual.blocks.0.mlp.fc1",
                                                         "base_model.model.model.visual.merger.mlp.0"]}),
    ("vision-tower-qwen3", "qwen3_vl", "ok", {"modules": [LM.format(i=0, m="self_attn.q_proj"),
                                                         "base_model.model.model.visual.blocks.0.mlp.linear_fc1"]}),
    ("rank-pattern", "qwen2_5_vl", "ok",
     {"r": 8, "rank_in_tensors": 4, "config": {"rank_pattern": {"q_proj": 4, "v_proj": 4}}}),
    ("alpha-pattern", "qwen2_5_vl", "ok", {"config": {"alpha_pattern": {"q_proj": 64}}}),
    ("init-eva", "qwen2_5_vl", "ok", {"config": {"init_lora_weights": "eva"}}),
    ("rank-mismatch-loads", "qwen2_5_vl", "ok", {"r": 8, "rank_in_tensors": 4}),  # fits the buffers: loads and serves
    ("nonexistent-module", "qwen2_5_vl", "ok", {"modules": [LM.format(i=99, m="self_attn.q_proj")]}),
    ("embedding-qwen3", "qwen3_vl", "ok", {"modules": [LM.format(i=0, m="self_attn.q_proj")],
                                          "extra": {"base_model.model.lm_head.lora_embedding_A": (8, HIDDEN)}}),
    # ---- refused by vLLM
    ("dora", "qwen2_5_vl", "refused", {"config": {"use_dora": True}}),
    ("dora-and-rank", "qwen2_5_vl", "refused", {"r": 128, "config": {"use_dora": True}}),
    ("modules-to-save", "qwen2_5_vl", "refused", {"config": {"modules_to_save": ["lm_head"]}}),
    ("lora-bias", "qwen2_5_vl", "refused", {"config": {"lora_bias": True}}),
    ("init-pissa", "qwen2_5_vl", "refused", {"config": {"init_lora_weights": "pissa_niter_4"}}),
    ("alora", "qwen2_5_vl", "refused", {"config": {"alora_invocation_tokens": [5, 6]}}),
    ("layer-replication", "qwen2_5_vl", "refused", {"config": {"layer_replication": [[0, 1]]}}),
    ("bdlora", "qwen2_5_vl", "refused", {"config": {"use_bdlora": {"nblocks": 2}}}),
    ("qalora", "qwen2_5_vl", "refused", {"config": {"use_qalora": True}}),
    ("bias-all", "qwen2_5_vl", "refused", {"config": {"bias": "all"}}),
    ("rank-zero", "qwen2_5_vl", "refused", {"r": 0, "rank_in_tensors": 1}),
    ("rank-pattern-zero", "qwen2_5_vl", "refused", {"config": {"rank_pattern": {"q_proj": 0}}}),
    ("rank-over-max", "qwen2_5_vl", "refused", {"r": 128}),
    ("rank-pattern-over-max", "qwen2_5_vl", "refused", {"config": {"rank_pattern": {"q_proj": 128}}}),
    ("missing-target-modules", "qwen2_5_vl", "refused", {"drop_config": ("target_modules",)}),
    ("magnitude-without-dora", "qwen2_5_vl", "refused",
     {"extra": {LM.format(i=0, m="self_attn.q_proj") + ".lora_magnitude_vector": (HIDDEN,)}}),
    ("lora-b-bias", "qwen2_5_vl", "refused",
     {"extra": {LM.format(i=0, m="self_attn.q_proj") + ".lora_B.bias": (HIDDEN,)}}),
    ("norm-module", "qwen2_5_vl", "refused", {"modules": [LM.format(i=0, m="input_layernorm")]}),
    ("lm-head-qwen2", "qwen2_5_vl", "refused", {"modules": ["base_model.model.lm_head"]}),
    ("no-weights", "qwen2_5_vl", "refused", {"weights": False}),
    ("missing-directory", "qwen2_5_vl", "refused", {}),  # never written
]


def build(root: Path) -> list[dict[str, Any]]:
    cases = []
    for cid, family, _verdict, kw in CORPUS:
        path = root / cid
        if cid != "missing-directory":
            write(path, **kw)
        cases.append({"id": f"corpus/{cid}", "family": family, "path": str(path), "max_lora_rank": 64})
    return cases
