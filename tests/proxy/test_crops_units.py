"""crop-describe's pure parts against the seed's rules (notes §2.7, §1.8): panel selection (order,
padding, clipping, skipped slivers, the letter limit), the composite's geometry, think stripping and
splitting, the CROPS line match, the description read back."""

from __future__ import annotations

import pytest
from PIL import Image

from vlmpool.proxy.crops import Detection, compose, composite_size, select_panels
from vlmpool.proxy.crops_text import crop_lines, describe, split_thinking, strip_thinking


def det(box, conf=None, cls="person"):
    return Detection(tuple(box), cls, conf, None)


def test_panels_sorted_padded_clipped_and_slivers_skipped():
    dets = [det([100, 100, 200, 300], 0.5), det([0, 0, 40, 20], 0.9), det([650, 10, 700, 40], 0.8),
            det([5, 5, 9, 9], 0.7), det([10, 400, 20, 460])]  # no confidence counts as 0
    panels = select_panels(dets, 20, 640, 480)
    assert [p.det.confidence for p in panels] == [0.9, 0.5, None]  # off the frame, a 6 px sliver: skipped
    assert [p.label for p in panels] == ["A", "B", "C"]
    assert panels[0].crop == (0, 0, 46, 23)  # 15 % each side, clipped at 0
    assert panels[1].crop == (85, 70, 215, 330)
    assert panels[2].crop == (8, 391, 22, 469)
    assert select_panels(dets, 1, 640, 480)[0].det.confidence == 0.9
    assert select_panels(dets, 0, 640, 480) == []
    many = [det([i, 0, i + 20, 20], i / 100) for i in range(30)]
    assert len(select_panels(many, 40, 640, 480)) == 26  # letters A..Z at most


@pytest.mark.parametrize(("w", "h", "n", "size"), [
    (640, 480, 1, (853, 480)), (640, 480, 20, (853, 2400)), (400, 300, 2, (600, 300)),
    (2000, 1000, 3, (2384, 1000)), (100, 50, 1, (260, 120)),
])
def test_composite_geometry(w, h, n, size):
    assert composite_size(w, h, n) == size
    frame = Image.new("RGB", (w, h), (10, 20, 30))
    panels = select_panels([det([0, 0, w, h], 0.5)] * n, n, w, h)
    assert compose(frame, panels).size == size


def test_strip_thinking_is_trios():
    assert strip_thinking("<think>a</think>  answer") == "answer"
    assert strip_thinking("x <think>a</think> y <think>b</think> z") == "x y z"
    assert strip_thinking("answer <think>never closed") == "answer"  # dangling: the text before it
    assert strip_thinking("thought</think> answer") == "thought</think> answer"  # a lone close stays


def test_split_thinking_is_roboflows():
    assert split_thinking("thought</think>\n\nanswer", prefilled=True) == ("thought", "answer")
    assert split_thinking("<think>t</think>a", prefilled=False) == ("t", "a")
    assert split_thinking("<think>cut by max tokens", prefilled=True) == ("cut by max tokens", "")
    assert split_thinking("plain answer", prefilled=True) == ("", "plain answer")


def test_crop_lines_match_the_letter_anywhere_and_prefix_the_class():
    panels = select_panels([det([0, 0, 50, 50], 0.9, "person"), det([60, 0, 110, 50], 0.8, "car"),
                            det([120, 0, 170, 50], 0.7, "dog")], 3, 640, 480)
    text = "Intro A line\n  - A) person: tall man\n* B. blue sedan\nSCENE: street\nB: second\n"
    assert crop_lines(text, panels) == {"A": "person: tall man", "B": "car: blue sedan"}  # C has none: absent


def test_describe_free_text_and_schema_mode():
    text = "CROPS:\nA: x\nSCENE: A street.\nACTIVITIES: People walk.\nNOTABLE: nothing unusual\nJSON: {\"a\": 1}"
    assert describe(text, False) == ("A street. People walk.", {"a": 1})
    assert describe("NOTABLE: a fire", False)[0] == "a fire"
    assert describe('```json\n{"summary": "s", "n": 2}\n```', True) == ("s", {"summary": "s", "n": 2})
    assert describe('{"truncated": ', False) == ("", {})  # looked like JSON, did not parse: no description
    assert describe("just prose", False) == ("just prose", {})
