"""Token counts from the model's own tokenizer, when the model directory has one (optional).

vLLM counts a chat's prompt tokens after its chat template (system prompt, role markers included) and
expands each image placeholder to the image's tokens; a completion's prompt is the tokenizer's ids of the
text. With a tokenizer in the model directory the simulator does the same (transformers' AutoTokenizer,
loaded once at start: a few seconds of import); without one, or when transformers is missing, it counts
words (parsing.py) and stays fast.

Image tokens follow the Qwen2-VL processor family (``preprocessor_config.json``: patch_size, merge_size,
the min/max pixel budget): the image is resized to multiples of patch·merge within the budget
(``smart_resize``, as transformers' Qwen2-VL image processor does) and gives one token per merge² patches.
The image's size is read from its header (PNG, GIF, BMP, JPEG, WebP) without decoding it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from typing import Any

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header, or None when the format or header is not understood."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return w, h
        if data.startswith(b"BM"):
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            kind = data[12:16]
            if kind == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            if kind == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if kind == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
        if data.startswith(b"\xff\xd8"):
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                length = int.from_bytes(data[i + 2:i + 4], "big")
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", data[i + 5:i + 9])
                    return w, h
                i += 2 + length
    except (struct.error, IndexError):
        return None
    return None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize: multiples of ``factor``, area within [min_pixels, max_pixels]."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class ModelTokenizer:
    """The model directory's tokenizer and image-token arithmetic."""

    def __init__(self, tokenizer: Any, processor: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        size = processor.get("size") or {}
        self.patch = int(processor.get("patch_size") or 14)
        self.merge = int(processor.get("merge_size") or 2)
        self.min_pixels = int(processor.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        self.max_pixels = int(processor.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)

    @classmethod
    def load(cls, model: str) -> ModelTokenizer | None:
        """The tokenizer of ``model`` when it is a directory with one; None otherwise (words are counted)."""
        directory = os.path.expanduser(model)
        if not any(os.path.isfile(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
            return None
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as tf_logging

            tf_logging.set_verbosity_error()
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure: count words, say why
            log.warning("model tokenizer not used (%s: %s); counting words", type(e).__name__, e)
            return None
        processor: dict[str, Any] = {}
        try:
            with open(os.path.join(directory, "preprocessor_config.json"), encoding="utf-8") as f:
                processor = json.load(f)
        except (OSError, ValueError):
            pass
        return cls(tokenizer, processor if isinstance(processor, dict) else {})

    def image_tokens(self, size: tuple[int, int] | None, default: int) -> int:
        if size is None or min(size) < 1:
            return default
        w, h = size
        factor = self.patch * self.merge
        h_bar, w_bar = smart_resize(h, w, factor, self.min_pixels, self.max_pixels)
        return (h_bar // self.patch) * (w_bar // self.patch) // (self.merge * self.merge)

    def _ids(self, encoded: Any) -> list[int]:
        if isinstance(encoded, dict) or hasattr(encoded, "keys"):
            return list(encoded["input_ids"])
        return list(encoded)

    def chat(self, messages: list[dict[str, Any]], image_sizes: list[tuple[int, int] | None],
             default_image_tokens: int) -> int:
        """Prompt tokens of a chat: the template applied (generation prompt added), each image's
        placeholder expanded to its tokens."""
        rendered = []
        for msg in messages:
            content = msg.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    kind = part.get("type")
                    if kind == "text":
                        parts.append({"type": "text", "text": part.get("text", "")})
                    elif kind == "image_url":
                        parts.append({"type": "image"})
                    elif kind == "video_url":
                        parts.append({"type": "video"})
                content = parts
            rendered.append({"role": msg.get("role"), "content": content if content is not None else ""})
        ids = self._ids(self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True))
        return len(ids) + sum(self.image_tokens(s, default_image_tokens) - 1 for s in image_sizes)

    def text(self, text: str) -> int:
        return len(self._ids(self.tokenizer(text)))
