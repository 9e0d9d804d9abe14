"""The simulator's image-size reading and Qwen2-VL resize arithmetic (sim/tokens.py), without a model."""

from __future__ import annotations

import struct

from vlmpool.sim.tokens import image_size, smart_resize
from vlmpool.testing.images import png


def test_image_size_from_headers():
    assert image_size(png(64, 48)) == (64, 48)
    assert image_size(b"GIF89a" + struct.pack("<HH", 30, 20) + b"\x00" * 8) == (30, 20)
    assert image_size(b"BM" + b"\x00" * 16 + struct.pack("<ii", 40, -25) + b"\x00" * 8) == (40, 25)
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    sof0 = b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 90, 120) + b"\x03" + b"\x00" * 9
    assert image_size(b"\xff\xd8" + app0 + sof0) == (120, 90)
    vp8x = b"RIFF" + b"\x00" * 4 + b"WEBPVP8X" + b"\x00" * 8 + (99).to_bytes(3, "little") + (49).to_bytes(3, "little")
    assert image_size(vp8x) == (100, 50)
    assert image_size(b"\xff\xd8\x00garbage") is None and image_size(b"not an image") is None


def test_qwen2_vl_resize_within_the_pixel_budget():
    lo, hi = 4 * 28 * 28, 64 * 28 * 28
    assert smart_resize(64, 64, 28, lo, hi) == (56, 56)        # 4 tokens after the 2x2 merge
    assert smart_resize(300, 600, 28, lo, hi) == (140, 308)    # over the budget: scaled down
    assert smart_resize(10, 10, 28, lo, hi) == (56, 56)        # under it: scaled up
