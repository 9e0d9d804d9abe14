"""What the simulated model "says" beyond its echo: crop-describe's panel answers, thinking, and the
reasoning split vLLM's reasoning parser does.

Panels: a prompt that lists zoom panels the way the proxy's crop-describe does (``- A: class=person,
bbox=[...]`` under ``Zoom panels:``) is answered with a ``CROPS:`` block, one ``<letter>: <class>: ...``
line per panel, then a ``SCENE:`` line; deterministic, so tests check the proxy's parse.

Thinking (``--thinking``, a sim flag: the model is a thinking one, e.g. Qwen3.5): unless the request's
``chat_template_kwargs.enable_thinking`` is false, the generated text opens with the thought and
``</think>``; the chat template pre-fills ``<think>``, so the generated text itself lacks the opening tag
(the roboflow seed's observation for qwen3_5). With ``enable_thinking`` false the template closes an
empty block in the prompt and the model answers directly.

Reasoning split (``--reasoning-parser NAME``, vLLM 0.32's qwen3 parser engine): with thinking enabled
(``chat_template_kwargs.enable_thinking``, default true) the parser starts in its reasoning state: text up
to the first ``</think>`` (a ``<think>`` tag dropped) is ``message.reasoning``, the rest ``content``
(None when empty; with no ``</think>`` at all, everything is reasoning). With thinking disabled all of it
is content. ``include_reasoning: false`` drops the reasoning. Streamed, each delta carries either
``reasoning`` or ``content``; the tags themselves produce no delta.
"""

from __future__ import annotations

import re
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"
_PANEL = re.compile(r"^- ([A-Z]): class=(.+?), bbox=\[", re.MULTILINE)


def panels_in(prompt: str) -> list[tuple[str, str]]:
    """(letter, class) of each zoom panel the prompt lists."""
    if "Zoom panels:" not in prompt:
        return []
    block = prompt.split("Zoom panels:", 1)[1]
    return _PANEL.findall(block)


def crop_answer(panels: list[tuple[str, str]], header: str) -> str:
    lines = ["CROPS:"] + [f"{letter}: {cls}: sim saw panel {letter}" for letter, cls in panels]
    lines.append(f"SCENE: {header} panels={len(panels)}")
    return "\n".join(lines)


def thinking_enabled(body: dict[str, Any]) -> bool:
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("enable_thinking") is not None:
        return bool(kwargs["enable_thinking"])
    return True  # the Qwen3 templates' and vLLM's qwen3 parser's default


def with_thought(answer: str, images: int) -> str:
    """The generated text of a thinking model: thought, ``</think>``, answer (``<think>`` pre-filled)."""
    return f"sim thought about {images} image(s)\n{THINK_END}\n\n{answer}"


def split_reasoning(text: str, enabled: bool) -> tuple[str | None, str | None]:
    """(reasoning, content) as vLLM's qwen3 parser returns them for a whole answer."""
    if not enabled:
        return None, text or None
    head, sep, tail = text.partition(THINK_END)
    reasoning = head.replace(THINK_START, "")
    content = tail.replace(THINK_END, "") if sep else ""
    return reasoning or None, content or None


class StreamSplitter:
    """The same split for streamed pieces: each piece becomes a reasoning or a content delta (or none, for
    the tags themselves, which the sim emits as pieces of their own or at a piece's start)."""

    def __init__(self, enabled: bool) -> None:
        self.in_reasoning = enabled

    def delta(self, piece: str) -> dict[str, str] | None:
        if self.in_reasoning:
            if THINK_END in piece:
                self.in_reasoning = False
                before, _, after = piece.partition(THINK_END)
                before = before.replace(THINK_START, "")
                if before:  # the sim's pieces never carry text after the tag: "\n</think>" is one piece
                    return {"reasoning": before}
                return {"content": after} if after else None
            piece = piece.replace(THINK_START, "")
            return {"reasoning": piece} if piece else None
        piece = piece.replace(THINK_END, "")
        return {"content": piece} if piece else None
