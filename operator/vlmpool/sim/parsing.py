"""Request parsing shared by the simulator's routes: JSON error answers, prompts, image data URLs.

The texts follow vLLM's OpenAI server; see :mod:`vlmpool.sim.contract`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from vlmpool.sim import contract

if TYPE_CHECKING:
    from vlmpool.sim.tokens import ModelTokenizer


def json_response(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def error_response(pair: tuple[int, str]) -> web.Response:
    return json_response(*pair)


_WORD = re.compile(r"\S+")
PIECE = re.compile(r"\s*\S+")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


class RequestError(Exception):
    def __init__(self, pair: tuple[int, str]) -> None:
        super().__init__(pair[1])
        self.pair = pair


_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise RequestError(contract.bad_request("Invalid data URL: expected 'data:<mime>;base64,<data>'"))
    mime = header[5:].split(";", 1)[0]
    if ";base64" not in header:
        raise RequestError(contract.bad_request("Invalid data URL: only base64 data URLs are supported"))
    if not mime.startswith("image/"):
        raise RequestError(contract.bad_request(f"Invalid image data URL: media type {mime!r} is not an image"))
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(contract.bad_request(f"Failed to decode base64 image data: {e}")) from None
    if not (data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")):
        raise RequestError(contract.bad_request("Failed to load image: cannot identify image file"))
    return data


@dataclass
class Prompt:
    tokens: int
    images: int
    text: str  # the text the moderation fault looks at
    echo: str  # the last user text, echoed into the answer


def chat_prompt(messages: Any, image_tokens: int, tokenizer: ModelTokenizer | None = None) -> Prompt:
    """The prompt of a chat. Tokens: with the model's tokenizer as vLLM counts them (template applied,
    images expanded), else words plus 4 per message plus ``image_tokens`` per image."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(contract.bad_request("'messages' must be a non-empty list", param="messages"))
    tokens, images = 0, 0
    sizes: list[tuple[int, int] | None] = []
    texts: list[str] = []
    last_user = ""
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise RequestError(contract.bad_request(f"messages[{i}] must be an object with a 'role'",
                                                    param="messages"))
        tokens += 4
        content = msg.get("content")
        parts: list[str] = []
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise RequestError(contract.bad_request(f"messages[{i}].content[{j}] must be an object"))
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise RequestError(contract.bad_request(f"messages[{i}].content[{j}].text must be a string"))
                    parts.append(part["text"])
                elif kind in ("image_url", "video_url"):
                    ref = part.get(kind)
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise RequestError(contract.bad_request(f"messages[{i}].content[{j}].{kind}.url is required"))
                    size = None
                    if kind == "image_url" and url.startswith("data:"):
                        from vlmpool.sim.tokens import image_size

                        size = image_size(decode_data_url(url))
                    sizes.append(size)
                    images += 1
                    tokens += image_tokens
                else:
                    raise RequestError(contract.bad_request(f"Unknown part type: {kind}"))
        elif content is not None:
            raise RequestError(contract.bad_request(f"messages[{i}].content must be a string or a list"))
        text = " ".join(parts)
        tokens += count_words(text)
        texts.append(text)
        if msg.get("role") == "user":
            last_user = text
    if tokenizer is not None:
        try:
            tokens = tokenizer.chat(messages, sizes, image_tokens)
        except Exception:  # noqa: BLE001 - a template that cannot render these messages: count words
            pass
    return Prompt(tokens=tokens, images=images, text="\n".join(texts), echo=last_user)


def completion_prompts(prompt: Any, tokenizer: ModelTokenizer | None = None) -> list[Prompt]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        items = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, list) for x in prompt):
        items = list(prompt)
    else:
        raise RequestError(contract.bad_request(
            "prompt must be a string, a list of strings, or token ids", param="prompt"))
    out = []
    for item in items:
        if isinstance(item, str):
            count = tokenizer.text(item) if tokenizer is not None else count_words(item)
            out.append(Prompt(tokens=max(count, 1), images=0, text=item, echo=item))
        else:
            out.append(Prompt(tokens=max(len(item), 1), images=0, text="", echo=""))
    return out

