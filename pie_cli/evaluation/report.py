"""report.png for `pie evaluate`: the frames as a strip over small line charts, drawn with PIL
(no plotting library needed)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from pie_cli.evaluation.metrics import FrameMetrics

PANEL_W, PANEL_H = 300, 170
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _chart(title: str, ys: list[float | None], colour: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    font = _font(12)
    draw.text((8, 4), title, fill="black", font=font)
    left, right, top, bottom = 44, PANEL_W - 10, 24, PANEL_H - 22
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    points = [(i, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
    if not points:
        draw.text((left + 8, top + 8), "n/a", fill=(120, 120, 120), font=font)
        return img
    lo = min(y for _, y in points)
    hi = max(y for _, y in points)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(1, len(ys) - 1)

    def xy(i: int, y: float) -> tuple[float, float]:
        return left + (right - left) * i / n, bottom - (bottom - top) * (y - lo) / (hi - lo)

    draw.text((2, top - 6), f"{hi:.3g}", fill=(90, 90, 90), font=_font(10))
    draw.text((2, bottom - 8), f"{lo:.3g}", fill=(90, 90, 90), font=_font(10))
    draw.text((left, bottom + 4), "frame 0", fill=(90, 90, 90), font=_font(10))
    draw.text((right - 40, bottom + 4), f"frame {len(ys) - 1}", fill=(90, 90, 90), font=_font(10))
    coords = [xy(i, y) for i, y in points]
    if len(coords) > 1:
        draw.line(coords, fill=colour, width=2)
    for x, y in coords:
        draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    return img


def render(
    frames: list[Image.Image], metrics: list[FrameMetrics], title: str, target: str | None
) -> Image.Image:
    """A strip of (up to 11) frames above charts of the per-frame metrics."""
    picks = list(range(len(frames)))
    if len(picks) > 11:
        picks = sorted({round(k * (len(frames) - 1) / 10) for k in range(11)})
    thumb = 96
    strip = Image.new("RGB", (thumb * len(picks), thumb + 16), "white")
    draw = ImageDraw.Draw(strip)
    for k, p in enumerate(picks):
        strip.paste(frames[p].convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS), (k * thumb, 0))
        draw.text((k * thumb + 4, thumb + 2), f"{p}", fill="black", font=_font(11))
    charts = [
        _chart("change inside the mask (grey levels)", [m.change_in_mask for m in metrics], COLOURS[0]),
        _chart("PSNR outside the mask (dB)", [m.psnr_outside for m in metrics], COLOURS[1]),
        _chart(
            f"classifier confidence: {target}" if target else "classifier confidence (none)",
            [m.confidence for m in metrics],
            COLOURS[2],
        ),
        _chart("CLIP-I vs frame 0", [m.clip_i for m in metrics], COLOURS[3]),
    ]
    cols = 4 if strip.width >= 4 * PANEL_W else 2
    width = max(strip.width, cols * PANEL_W)
    height = 28 + strip.height + math.ceil(len(charts) / cols) * PANEL_H
    sheet = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(sheet).text((8, 6), title, fill="black", font=_font(14))
    sheet.paste(strip, (0, 28))
    for k, chart in enumerate(charts):
        sheet.paste(chart, ((k % cols) * PANEL_W, 28 + strip.height + (k // cols) * PANEL_H))
    return sheet
