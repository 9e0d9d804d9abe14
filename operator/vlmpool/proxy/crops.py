"""crop-describe's image work, on the CPU with Pillow: the frame decoded within bounds, the detections
checked, and trio-core's zoom-panel composite (seed notes §2.7): up to ``max_crops`` detections, sorted
by confidence, become lettered panels (A, B, ...) padded 15 % per side and clipped to the frame, shown in
a column on the right of the full frame, whose boxes are outlined and tagged with the same letters.

Geometry (trio's ``_compose_zoom_context_image``): panel column width max(160, min(384, w//3 if w >= 480
else w//2)); slot height max(120, h // n); canvas max(h, slot * n) high, w + column wide, black; slot i
spans [i * slot, (i + 1) * slot) (the last one to the bottom), dark grey with a 2 px border in the panel's
colour, a header "<letter> <class>[ <confidence .2f>]" at (8, 24) and the crop, resized to a multiple of
32 per side, letterboxed into (column - 12) x (slot - 38) at (6, 32). Box outlines are 3 px; colours
cycle through yellow, azure, green, magenta and orange.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

MAX_IMAGE_B64_CHARS = 14_000_000  # trio's image_b64 limit (~10.5 MB decoded)
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded pixels; a larger frame (or a decompression bomb) is refused
MAX_DETECTIONS = 50  # trio's crops limit
MAX_CROPS = 20
DEFAULT_MAX_CROPS = 3
MAX_COORDINATE = 1_000_000
MAX_CLASS_CHARS = 128
PAD = 0.15
MIN_PANEL_SIDE = 8
IMAGE_FACTOR = 32
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# trio's five BGR colours, as RGB: yellow, azure-blue, green, magenta, orange
COLOURS = ((255, 255, 0), (0, 128, 255), (0, 255, 0), (255, 0, 255), (255, 165, 0))
SLOT_FILL = (18, 18, 18)
JPEG_QUALITY = 90


class CropInputError(ValueError):
    """Input crop-describe refuses (answered 400); ``code`` is the error table's code."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True)
class Detection:
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in frame pixels (may extend past the frame)
    cls: str
    confidence: float | None
    track_id: int | str | None


@dataclass(frozen=True)
class Panel:
    label: str
    det: Detection
    crop: tuple[int, int, int, int]  # the padded box clipped to the frame
    colour: tuple[int, int, int]


@dataclass
class Frame:
    image: Image.Image  # RGB, decoded
    data: bytes  # the bytes as sent
    mime: str  # image/jpeg or image/png


def decode_frame(image_b64: Any) -> Frame:
    """The frame from base64 JPEG/PNG (a ``data:image/...;base64,`` prefix is allowed), refused when it is
    not one, too long, or larger than MAX_IMAGE_PIXELS once decoded (checked from the header, before
    any pixel is decoded)."""
    if not isinstance(image_b64, str) or not image_b64:
        raise CropInputError("`image_b64` is required: a base64 JPEG or PNG image", "invalid_image", "image_b64")
    if len(image_b64) > MAX_IMAGE_B64_CHARS:
        raise CropInputError(f"`image_b64` is longer than {MAX_IMAGE_B64_CHARS} characters", "image_too_large",
                             "image_b64")
    text = image_b64
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise CropInputError("`image_b64` data URL must be data:image/<type>;base64,<data>", "invalid_image",
                                 "image_b64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CropInputError("`image_b64` is not valid base64", "invalid_image", "image_b64") from None
    try:
        img = Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))  # reads the header only
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:  # below Pillow's own bomb limits, checked before any pixel is decoded
            raise CropInputError(f"image is {w}x{h} = {w * h} pixels; at most {MAX_IMAGE_PIXELS} decoded pixels "
                                 "are accepted", "image_too_large", "image_b64")
        fmt = img.format
        img.load()
    except CropInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise CropInputError("`image_b64` is not a JPEG or PNG image", "invalid_image", "image_b64") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise CropInputError(f"`image_b64` could not be decoded: {str(e)[:120]}", "invalid_image",
                             "image_b64") from None
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return Frame(img if img.mode == "RGB" else img.convert("RGB"), data, mime)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_detections(crops: Any) -> list[Detection]:
    """trio's detection dicts: ``bbox`` or ``xyxy`` [x1, y1, x2, y2], ``class`` or ``label``,
    ``confidence``, optional ``track_id``. Any malformed one refuses the request."""
    if crops is None:
        return []
    if not isinstance(crops, list):
        raise CropInputError("`crops` must be a list of detections", "invalid_crops", "crops")
    if len(crops) > MAX_DETECTIONS:
        raise CropInputError(f"`crops` has {len(crops)} detections; at most {MAX_DETECTIONS}", "invalid_crops",
                             "crops")
    out = []
    for i, c in enumerate(crops):
        where = f"crops[{i}]"
        if not isinstance(c, dict):
            raise CropInputError(f"{where} must be an object", "invalid_crops", "crops")
        box = c.get("bbox", c.get("xyxy"))
        if (not isinstance(box, list) or len(box) != 4 or not all(_number(v) and abs(v) <= MAX_COORDINATE
                                                                   for v in box)):
            raise CropInputError(f"{where}.bbox must be 4 numbers [x1, y1, x2, y2] (|value| <= {MAX_COORDINATE})",
                                 "invalid_crops", "crops")
        x1, y1, x2, y2 = (int(v) for v in box)
        if x2 <= x1 or y2 <= y1:
            raise CropInputError(f"{where}.bbox must have x2 > x1 and y2 > y1 (got {[x1, y1, x2, y2]})",
                                 "invalid_crops", "crops")
        cls = c.get("class", c.get("label"))
        if cls is None or cls == "":
            cls = "object"
        if not isinstance(cls, str) or len(cls) > MAX_CLASS_CHARS:
            raise CropInputError(f"{where}.class must be a string of at most {MAX_CLASS_CHARS} characters",
                                 "invalid_crops", "crops")
        conf = c.get("confidence")
        if conf is not None and not _number(conf):
            raise CropInputError(f"{where}.confidence must be a number", "invalid_crops", "crops")
        tid = c.get("track_id")
        if tid is not None and not (isinstance(tid, (int, str)) and not isinstance(tid, bool)
                                    and len(str(tid)) <= 64):
            raise CropInputError(f"{where}.track_id must be an integer or a short string", "invalid_crops", "crops")
        out.append(Detection((x1, y1, x2, y2), " ".join(cls.split()) or "object",
                             float(conf) if conf is not None else None, tid))
    return out


def select_panels(dets: list[Detection], max_crops: int, width: int, height: int) -> list[Panel]:
    """Panels for the most confident detections (missing confidence counts as 0; ties keep their order),
    lettered in acceptance order; a box whose padded crop is empty or under 8 px on a side is skipped."""
    if max_crops <= 0:
        return []
    limit = min(max_crops, len(LABELS))
    panels: list[Panel] = []
    for d in sorted(dets, key=lambda d: -(d.confidence or 0.0)):
        x1, y1, x2, y2 = d.box
        px, py = (x2 - x1) * PAD, (y2 - y1) * PAD
        cx1, cy1 = max(0, math.floor(x1 - px)), max(0, math.floor(y1 - py))
        cx2, cy2 = min(width, math.ceil(x2 + px)), min(height, math.ceil(y2 + py))
        if cx2 - cx1 < MIN_PANEL_SIDE or cy2 - cy1 < MIN_PANEL_SIDE:
            continue
        n = len(panels)
        panels.append(Panel(LABELS[n], d, (cx1, cy1, cx2, cy2), COLOURS[n % len(COLOURS)]))
        if len(panels) == limit:
            break
    return panels


def column_width(w: int) -> int:
    return max(160, min(384, w // 3 if w >= 480 else w // 2))


def composite_size(w: int, h: int, n: int) -> tuple[int, int]:
    """(width, height) of the composite of a w x h frame with n panels."""
    slot = max(120, h // n)
    return w + column_width(w), max(h, slot * n)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _tag(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, colour: tuple[int, int, int], font: Any) -> None:
    """Black text on a filled box in the colour, its baseline starting at ``at`` (cv2.putText's origin)."""
    left, top, right, bottom = draw.textbbox(at, text, font=font, anchor="ls")
    draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=colour)
    draw.text(at, text, fill=(0, 0, 0), font=font, anchor="ls")


def _aligned(crop: Image.Image) -> Image.Image:
    w, h = crop.size
    aw = max(IMAGE_FACTOR, round(w / IMAGE_FACTOR) * IMAGE_FACTOR)
    ah = max(IMAGE_FACTOR, round(h / IMAGE_FACTOR) * IMAGE_FACTOR)
    return crop if (aw, ah) == (w, h) else crop.resize((aw, ah), Image.Resampling.BICUBIC)


def compose(frame: Image.Image, panels: list[Panel]) -> Image.Image:
    """The frame with its boxes outlined and tagged, and the panel column on its right."""
    w, h = frame.size
    n = len(panels)
    col = column_width(w)
    slot = max(120, h // n)
    cw, ch = composite_size(w, h, n)
    canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    canvas.paste(frame, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(18)
    for p in panels:  # outlines and letter tags on the full frame (boxes clamped to it)
        x1, y1, x2, y2 = p.det.box
        bx1, by1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
        bx2, by2 = min(max(x2, 0), w - 1), min(max(y2, 0), h - 1)
        draw.rectangle((bx1, by1, bx2, by2), outline=p.colour, width=3)
        _tag(draw, (bx1 + 4, max(by1 + 24, 24)), p.label, p.colour, font)
    for i, p in enumerate(panels):
        top = i * slot
        bottom = ch if i == n - 1 else (i + 1) * slot
        draw.rectangle((w, top, cw - 1, bottom - 1), fill=SLOT_FILL, outline=p.colour, width=2)
        header = f"{p.label} {p.det.cls}" + (f" {p.det.confidence:.2f}" if p.det.confidence is not None else "")
        _tag(draw, (w + 8, top + 24), header, p.colour, font)
        box_w, box_h = col - 12, (bottom - top) - 38
        if box_w < 1 or box_h < 1:
            continue
        crop = _aligned(frame.crop(p.crop))
        scale = min(box_w / crop.width, box_h / crop.height)
        fit = crop.resize((max(1, int(crop.width * scale)), max(1, int(crop.height * scale))),
                          Image.Resampling.BICUBIC)
        area = Image.new("RGB", (box_w, box_h), (0, 0, 0))  # letterbox: black bars
        area.paste(fit, ((box_w - fit.width) // 2, (box_h - fit.height) // 2))
        canvas.paste(area, (w + 6, top + 32))
    return canvas


def encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 (no chroma subsampling): thin borders and letter tags keep their colour
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def composite_uri(frame: Frame, panels: list[Panel]) -> str:
    """What the engine receives: the frame's own bytes when there is no panel (max_crops 0 keeps it byte
    for byte), else the composite as JPEG."""
    if not panels:
        return data_uri(frame.data, frame.mime)
    return data_uri(encode_jpeg(compose(frame.image, panels)), "image/jpeg")
