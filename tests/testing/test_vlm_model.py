"""`vlmpool testing make-model`: a tiny Qwen2.5-VL written here (nothing downloaded), the same files for the
same seed, loadable by transformers' own classes, with Qwen's chat template and special tokens; adapters
for it from PEFT. (Real vLLM serving it: tests/vllm/test_sim_vs_vllm.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlmpool.testing.vlm_model import SPECIAL_TOKENS, make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "Qwen2.5-VL-tiny")


def test_same_seed_same_files_other_seed_other_weights(model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "vlmpool.cli", "testing", "make-model", str(tmp_path / "again")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "chat_template.jinja"} <= set(names)
    for name in names:
        assert (model_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    other = make_model(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()


def test_transformers_loads_it_and_counts_qwen_chat_tokens(model_dir):
    import torch
    import transformers as tf

    model = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir))
    assert model.dtype == torch.bfloat16 and model.config.text_config.head_dim == 64
    tok = tf.AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.eos_token == "<|im_end|>" and all(tok.convert_tokens_to_ids(t) < 320 for t in SPECIAL_TOKENS)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                  tokenize=True)["input_ids"]
    # system prompt + markers + one token per byte: what real vLLM counts for this chat (68)
    assert len(ids) == 68
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>") and \
        text.endswith("<|im_start|>assistant\n")
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Qwen2_5_VLProcessor" and pre["size"]["longest_edge"] == 64 * 28 * 28


def test_make_adapter_for_it(model_dir, tmp_path):
    from safetensors import safe_open

    out = subprocess.run([sys.executable, "-m", "vlmpool.cli", "testing", "make-adapter", str(tmp_path / "a"),
                          "--model", str(model_dir), "--rank", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    q = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    assert shapes[f"{q}.lora_A.weight"] == [8, 128] and shapes[f"{q}.lora_B.weight"] == [128, 8]
