"""Panels and annotations for exported progressions: side by side, difference heat maps,
mask outlines and captions. PIL/numpy only."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pie_cli.imaging.morphology import outline

OUTLINE_RGB = (255, 220, 0)
# An inferno-like ramp: black at 0 (no change), through purple and orange, to pale yellow.
_HEAT_ANCHORS = np.array(
    [
        [0.00, 0, 0, 0],
        [0.25, 87, 16, 110],
        [0.50, 188, 55, 84],
        [0.75, 249, 142, 9],
        [1.00, 252, 255, 164],
    ]
)
HEAT_LUT = (
    np.stack(
        [np.interp(np.linspace(0, 1, 256), _HEAT_ANCHORS[:, 0], _HEAT_ANCHORS[:, c]) for c in (1, 2, 3)],
        axis=1,
    )
    .round()
    .astype(np.uint8)
)


def abs_diff(frame: Image.Image, reference: Image.Image) -> np.ndarray:
    """Mean over RGB of |frame - reference|, in grey levels (0..255)."""
    a = np.asarray(frame.convert("RGB"), dtype=np.int16)
    b = np.asarray(reference.convert("RGB"), dtype=np.int16)
    return np.abs(a - b).mean(axis=2)


def heat_panel(diff: np.ndarray, scale: float) -> Image.Image:
    """A heat map of ``diff`` on the fixed scale [0, scale] (the same for every frame)."""
    idx = np.clip(np.round(diff / max(scale, 1e-9) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(HEAT_LUT[idx], mode="RGB")


def draw_outline(img: Image.Image, mask: np.ndarray) -> Image.Image:
    """``img`` with the contour of ``mask`` (>= 128) drawn over it."""
    arr = np.asarray(img.convert("RGB")).copy()
    arr[outline(mask >= 128)] = OUTLINE_RGB
    return Image.fromarray(arr, mode="RGB")


def hstack(panels: list[Image.Image]) -> Image.Image:
    width = sum(p.width for p in panels)
    height = max(p.height for p in panels)
    out = Image.new("RGB", (width, height))
    x = 0
    for panel in panels:
        out.paste(panel.convert("RGB"), (x, 0))
        x += panel.width
    return out


def caption_font(width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(10, width // 24)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def caption_box(img: Image.Image, text: str) -> tuple[int, int, int, int]:
    """Where :func:`draw_caption` draws: the only pixels it may change."""
    font = caption_font(img.width)
    size = getattr(font, "size", 10)
    pad, stroke = max(2, size // 4), max(1, size // 8)
    left, top, right, bottom = ImageDraw.Draw(img).textbbox((pad, pad), text, font=font, stroke_width=stroke)
    return max(0, left), max(0, top), min(img.width, right), min(img.height, bottom)


def draw_caption(img: Image.Image, text: str) -> Image.Image:
    """White text with a dark outline in the top-left corner, legible on any background."""
    out = img.convert("RGB").copy()
    font = caption_font(out.width)
    size = getattr(font, "size", 10)
    pad, stroke = max(2, size // 4), max(1, size // 8)
    ImageDraw.Draw(out).text(
        (pad, pad), text, font=font, fill=(255, 255, 255), stroke_width=stroke, stroke_fill=(0, 0, 0)
    )
    return out


WATERMARK = "SYNTHETIC"


def watermark_box(img: Image.Image, text: str = WATERMARK) -> tuple[int, int, int, int]:
    """Where :func:`watermark` draws (bottom-right corner): the only pixels it changes."""
    font = caption_font(img.width)
    size = getattr(font, "size", 10)
    pad = max(1, size // 5)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    return max(0, img.width - w), max(0, img.height - h), img.width, img.height


def watermark(img: Image.Image, text: str = WATERMARK) -> Image.Image:
    """A small "SYNTHETIC" label burnt into the bottom-right corner: white on a black box.

    The image keeps its mode and depth (8-bit RGB or grey, 16-bit grey: white is 65535); other
    modes become 8-bit RGB.
    """
    if img.mode not in ("RGB", "L", "I;16"):
        img = img.convert("RGB")
    font = caption_font(img.width)
    box = watermark_box(img, text)
    ink = Image.new("L", img.size, 0)  # the text's coverage, anti-aliased
    draw = ImageDraw.Draw(ink)
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    pad = max(1, getattr(font, "size", 10) // 5)
    draw.text((box[0] + pad - left, box[1] + pad - top), text, font=font, fill=255)
    white = 65535 if img.mode == "I;16" else 255
    arr = np.asarray(img).copy()
    x0, y0, x1, y1 = box
    cover = np.asarray(ink, dtype=np.float64)[y0:y1, x0:x1] / 255.0
    if arr.ndim == 3:
        cover = cover[..., None]
    arr[y0:y1, x0:x1] = np.round(cover * white).astype(arr.dtype)
    return Image.fromarray(arr) if img.mode == "I;16" else Image.fromarray(arr, mode=img.mode)


def mean_image(frames: list[Image.Image]) -> Image.Image:
    """The pixel-wise mean of same-sized frames (K trajectories' last frames), rounded to 8-bit RGB."""
    stack = np.stack([np.asarray(f.convert("RGB"), dtype=np.float64) for f in frames])
    return Image.fromarray(np.round(stack.mean(axis=0)).astype(np.uint8), mode="RGB")


def spread_map(frames: list[Image.Image], base: Image.Image) -> Image.Image:
    """Where K trajectories disagree: their per-pixel standard deviation as a heat map over ``base``.

    The deviation is averaged over RGB, scaled to its maximum and blended over ``base`` with
    an opacity growing from 0.15 (no spread) to 0.9 (the most).
    """
    stack = np.stack([np.asarray(f.convert("RGB"), dtype=np.float64) for f in frames])
    std = stack.std(axis=0).mean(axis=2)
    scale = max(float(std.max()), 1e-9)
    heat = HEAT_LUT[np.clip(np.round(std / scale * 255), 0, 255).astype(np.uint8)].astype(np.float64)
    alpha = (0.15 + 0.75 * std / scale)[..., None]
    below = np.asarray(base.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.round(below * (1 - alpha) + heat * alpha).astype(np.uint8), mode="RGB")
