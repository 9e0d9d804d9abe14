"""crop-describe's text work (trio-core's router, seed notes §2.7): the prompt around the composite, and
the answer read back: think blocks stripped (or split off as the thinking), the ``CROPS:`` lines matched
to the panels, the description and entities read from the SCENE/ACTIVITIES/NOTABLE lines or a JSON
object. The engine's answer is the model's text: nothing here trusts its shape."""

from __future__ import annotations

import json
import re
from typing import Any

from .crops import Detection, Panel

MAX_HINTS = 8
DESCRIPTION_CHARS = 300

DEFAULT_SCENE_PROMPT = (
    "You are a careful visual analyst. Look at the image and answer in exactly these lines:\n"
    "SCENE: one sentence on what the scene is\n"
    "ACTIVITIES: what the people, vehicles or animals are doing\n"
    "NOTABLE: anything unusual, or \"nothing unusual\"\n"
    'JSON: {"people_count": <int>, "vehicle_count": <int>, '
    '"persons": [{"appearance": "...", "action": "...", "location": "..."}], '
    '"vehicles": [{"type": "...", "color": "...", "make": "...", "action": "..."}], '
    '"scene_type": "...", "activity_level": "quiet|moderate|busy", "mood": "calm|tense|active"}'
)


def _box(d: Detection) -> str:
    x1, y1, x2, y2 = d.box
    return f"[{x1}, {y1}, {x2}, {y2}]"


def panel_block(panels: list[Panel]) -> str:
    """The context block before the scene prompt when the image is a composite."""
    lines = [
        "The image is a composite: the full frame is on the left and labelled zoom panels are on the right. "
        "The letter tags on the boxes in the full frame match the panels. Use the panels for appearance "
        "details and the full frame for location and activity.",
        "Zoom panels:",
    ]
    for p in panels:
        conf = f", confidence={p.det.confidence:.2f}" if p.det.confidence is not None else ""
        lines.append(f"- {p.label}: class={p.det.cls}, bbox={_box(p.det)}{conf}")
    lines.append("Before SCENE, write a block that starts with the line CROPS: followed by one line per panel, "
                 "in this form:")
    lines.extend(f"{p.label}: {p.det.cls}: [short phrase]" for p in panels)
    return "\n".join(lines)


def hint_block(dets: list[Detection]) -> str:
    """trio's YOLO hint: detections listed as hints when no panel is shown."""
    lines = ["YOLO detections (use them as visual hints; verify everything against the image):"]
    for d in dets[:MAX_HINTS]:
        conf = f", confidence={d.confidence:.2f}" if d.confidence is not None else ""
        lines.append(f"- track_id={d.track_id}, class={d.cls}, bbox={_box(d)}{conf}")
    return "\n".join(lines)


def build_prompt(scene_prompt: str, panels: list[Panel], dets: list[Detection], schema_mode: bool) -> str:
    """Panel context (when there are panels), else trio's YOLO hint (detections given, not in schema mode,
    and the prompt not already carrying "YOLO detections"), then the scene prompt."""
    prompt = scene_prompt.strip() or DEFAULT_SCENE_PROMPT
    if panels:
        return panel_block(panels) + "\n\n" + prompt
    if dets and not schema_mode and "YOLO detections" not in prompt:
        return hint_block(dets) + "\n\n" + prompt
    return prompt


# -- the answer -------------------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def strip_thinking(text: str) -> str:
    """trio's ``_strip_thinking``: closed blocks removed; for a dangling ``<think>``, the text after the
    last ``</think>`` if there is one, else the text before ``<think>``; a lone ``</think>`` stays."""
    text = _THINK.sub("", text)
    if "<think>" in text:
        text = text.rsplit("</think>", 1)[1] if "</think>" in text else text.split("<think>", 1)[0]
    return text.strip()


def split_thinking(text: str, prefilled: bool) -> tuple[str, str]:
    """(thinking, answer), roboflow's qwen3_5 split: with a template that pre-fills ``<think>``
    (``prefilled``) the opening tag is put back first; the first closed block's inside is the thinking;
    with no closing tag (max tokens hit) all of it is, and the answer is empty."""
    t = text.lstrip()
    if prefilled and not t.startswith("<think>") and "</think>" in t:
        t = "<think>" + t
    m = re.search(r"<think>(.*?)</think>", t, re.DOTALL)
    if m:
        return m.group(1).strip(), strip_thinking(t)
    if t.startswith("<think>"):
        return t[len("<think>"):].strip(), ""
    return "", strip_thinking(t)


def crop_lines(text: str, panels: list[Panel]) -> dict[str, str]:
    """Per panel (by letter), the first line anywhere in the text that reads ``[-|*] <letter><sep> text``
    (sep one of ``: . ) -``), prefixed ``<class>: `` unless it starts with it; panels without one are absent."""
    lines = text.splitlines()
    out: dict[str, str] = {}
    for p in panels:
        pat = re.compile(rf"^\s*(?:[-*]\s*)?{re.escape(p.label)}\s*[:.)\-]\s*(.+?)\s*$")
        for line in lines:
            m = pat.match(line)
            if m:
                said = m.group(1)
                prefix = f"{p.det.cls}: "
                out[p.label] = said if said.lower().startswith(prefix.lower()) else prefix + said
                break
    return out


def _unfence(text: str) -> str:
    return re.sub(r"```(?:json|JSON)?", "", text)


def json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in the text: the whole text, else the span from its first ``{`` to its last ``}``."""
    body = _unfence(text).strip()
    for candidate in (body, body[body.find("{"): body.rfind("}") + 1] if "{" in body else ""):
        if not candidate:
            continue
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _line(text: str, key: str) -> str:
    m = re.search(rf"^\s*\**{key}\**\s*:\s*(.+?)\s*$", text, re.MULTILINE | re.IGNORECASE)
    return m.group(1).strip() if m else ""


def describe(text: str, schema_mode: bool) -> tuple[str, dict[str, Any]]:
    """(description, entities). Schema mode: the JSON object exactly as the model wrote it. Free text:
    SCENE (or DESCRIPTION) + ACTIVITIES + NOTABLE (unless it says nothing unusual/none/n/a), else the JSON
    object's description/summary/scene, else the first 300 characters (none when the text looked like JSON
    but did not parse)."""
    obj = json_object(text)
    entities = obj if obj is not None else {}
    if schema_mode:
        return _json_description(entities), entities
    parts = [_line(text, "SCENE") or _line(text, "DESCRIPTION"), _line(text, "ACTIVITIES")]
    notable = _line(text, "NOTABLE")
    if notable and notable.lower().strip(" .") not in ("nothing unusual", "none", "n/a"):
        parts.append(notable)
    description = " ".join(p for p in parts if p)
    if not description:
        description = _json_description(entities)
    if not description and obj is None and not _unfence(text).lstrip().startswith("{"):
        description = text.strip()[:DESCRIPTION_CHARS]
    return description, entities


def _json_description(obj: dict[str, Any]) -> str:
    for key in ("description", "DESCRIPTION", "summary", "SCENE", "scene"):
        v = obj.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
    return ""
