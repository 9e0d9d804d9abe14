"""Tiny models of every vision-language family (the real transformers classes, configs with the real
layouts shrunk, random init, nothing downloaded) and real PEFT adapters saved from them. The family list,
their test base models and vision targets come from the one family table (vlmpool/families.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmpool import families as _table

FAMILIES = _table.VLM_FAMILIES
POOL_BASE = {name: _table.FAMILIES[name].test_model for name in FAMILIES}
LANG_TARGETS = list(_table.FAMILIES["qwen2_vl"].module_names)
VISION_TARGETS = {name: list(_table.FAMILIES[name].vision_targets) for name in FAMILIES}

_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
_SMALL = {k: v for k, v in _TEXT.items() if k != "rope_parameters"}  # families without multimodal RoPE


def tiny_model(family: str, seed: int = 0):
    """A tiny model of the family: same module tree as the real checkpoints, random weights (the
    same for the same seed, so a fresh copy of the base is one call away)."""
    import torch
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    tokens: dict[str, Any] = dict(bos_token_id=None, eos_token_id=None, image_token_id=250, video_token_id=251,
                  vision_start_token_id=252, vision_end_token_id=253)
    cfg: Any  # each family's model class takes its own config class: no common static type says so
    cls: Any
    if family == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(text_config=dict(_TEXT),
                               vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2), **tokens)
        cls = tf.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(text_config=dict(_TEXT),
                                  vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                                     num_heads=2, fullatt_block_indexes=[0]), **tokens)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif family == "qwen3_vl":
        cfg = tf.Qwen3VLConfig(text_config=dict(_TEXT, head_dim=16),
                               vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                                  num_heads=2, deepstack_visual_indexes=[1],
                                                  num_position_embeddings=64), **tokens)
        cls = tf.Qwen3VLForConditionalGeneration
    elif family == "qwen3_5":  # one Gated DeltaNet (linear attention) layer, then one full-attention layer
        cfg = tf.Qwen3_5Config(text_config=dict(_TEXT, head_dim=16, layer_types=["linear_attention", "full_attention"],
                                                linear_num_key_heads=2, linear_num_value_heads=4,
                                                linear_key_head_dim=16, linear_value_head_dim=16),
                               vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                                  num_heads=2, num_position_embeddings=64), **tokens)
        cls = tf.Qwen3_5ForConditionalGeneration
    elif family == "gemma3":
        cfg = tf.Gemma3Config(text_config=dict(_SMALL, head_dim=16),
                              vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=32, patch_size=8),
                              mm_tokens_per_image=4, image_token_index=250, boi_token_index=251, eoi_token_index=252)
        cls = tf.Gemma3ForConditionalGeneration
    elif family == "mistral3":
        cfg = tf.Mistral3Config(text_config=dict(_SMALL, head_dim=16, model_type="mistral"),
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, head_dim=16, image_size=32, patch_size=8),
                                image_token_index=250)
        cls = tf.Mistral3ForConditionalGeneration
    else:
        raise ValueError(family)
    return cls(cfg).eval()


def _saved_model(family: str, directory: Path):
    import transformers as tf

    tf.logging.set_verbosity_error()
    classes: dict[str, Any] = {"qwen2_vl": tf.Qwen2VLForConditionalGeneration,
                               "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
               "qwen3_vl": tf.Qwen3VLForConditionalGeneration}
    if family not in classes:
        raise ValueError(f"model_dir is supported for {', '.join(classes)}, not {family}")
    return classes[family].from_pretrained(str(directory)).float().eval()


def make_adapter(family: str, out: Path, *, targets=None, r: int = 8, alpha: int = 16, dora: bool = False,
                 rslora: bool = False, modules_to_save=None, train_vision: bool = False, seed: int = 1,
                 base_name: str | None = "default", magnitude_jitter: float = 0.2,
                 train_vision_magnitude: bool = False, model_dir: str | Path | None = None) -> Path:
    """Save a real PEFT adapter for the tiny model, as if trained: language lora_B and DoRA
    magnitudes randomised; vision lora_B (and magnitudes) left at PEFT's init unless train_vision
    (train_vision_magnitude). ``model_dir``: a saved model of the family instead (e.g. the one
    :func:`vlmpool.testing.vlm_model.make_model` writes for the real engine)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = tiny_model(family) if model_dir is None else _saved_model(family, Path(model_dir))
    markers = _table.FAMILIES[family].vision_markers
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets or LANG_TARGETS), use_dora=dora,
                     use_rslora=rslora, modules_to_save=modules_to_save, lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            vision = any(m in name for m in markers)
            if "lora_B" in name and (train_vision or not vision):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name and (train_vision_magnitude or not vision):
                p.mul_(1 + magnitude_jitter * torch.rand(p.shape, generator=g))
    pm.save_pretrained(str(out))
    if base_name is not None:
        cfg_path = Path(out) / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = POOL_BASE[family] if base_name == "default" else base_name
        cfg_path.write_text(json.dumps(data, indent=2))
    return Path(out)


def write_lora(directory: Path, *, base: str, rank: int = 8, hidden: int = 32, layers: int = 2,
               seed: int = 0) -> Path:
    """A small PEFT LoRA directory in the Qwen2.5-VL layout vLLM (and the simulator) load, written
    directly with safetensors (no model, no peft: fast for tests that only need a loadable adapter)."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for mod in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.language_model.layers.{layer}.self_attn.{mod}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=g)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=g) * 0.01
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "base_model_name_or_path": base, "task_type": "CAUSAL_LM",
    }))
    return directory
