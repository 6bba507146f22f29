"""report.png for `pie evaluate`: the frames as a strip over small line charts, drawn with PIL
(no plotting library needed).

Frames of any shape and depth: thumbnails keep the frames' aspect ratio, and a 16-bit frame is
shown scaled by its depth (``to_rgb8``), not clipped."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pie_cli.evaluation.metrics import WINDOW_RADIUS, FrameMetrics, grey

PANEL_W, PANEL_H = 300, 170
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def thumb_size(size: tuple[int, int], height: int) -> tuple[int, int]:
    """A thumbnail of ``height`` rows with the aspect ratio of ``size`` (width at most 2 x ``height``;
    a wider frame is scaled down to that width instead)."""
    w, h = size
    width = max(1, round(height * w / h))
    if width > 2 * height:
        return 2 * height, max(1, round(2 * height * h / w))
    return width, height


def _rgb(img: Image.Image) -> Image.Image:
    from pie_cli.imaging.media import to_rgb8

    return to_rgb8(img)


def render(
    frames: list[Image.Image], metrics: list[FrameMetrics], title: str, target: str | None
) -> Image.Image:
    """A strip of (up to 11) frames above charts of the per-frame metrics."""
    picks = list(range(len(frames)))
    if len(picks) > 11:
        picks = sorted({round(k * (len(frames) - 1) / 10) for k in range(11)})
    thumb = 96
    tw, th = thumb_size(frames[0].size, thumb)
    strip = Image.new("RGB", (tw * len(picks), thumb + 16), "white")
    draw = ImageDraw.Draw(strip)
    for k, p in enumerate(picks):
        strip.paste(_rgb(frames[p]).resize((tw, th), Image.Resampling.LANCZOS), (k * tw, 0))
        draw.text((k * tw + 4, thumb + 2), f"{p}", fill="black", font=_font(11))
    # PSNR and the drift side by side, in two columns or four
    charts = [
        _chart("change inside the mask (grey levels)", [m.change_in_mask for m in metrics], COLOURS[0]),
        _chart(
            f"classifier confidence: {target}" if target else "classifier confidence (none)",
            [m.confidence for m in metrics],
            COLOURS[2],
        ),
        _chart(
            f"PSNR outside, mask + {WINDOW_RADIUS} px (dB)", [m.psnr_outside for m in metrics], COLOURS[1]
        ),
        _chart(
            f"drift outside, mask + {WINDOW_RADIUS} px (grey)",
            [m.drift_outside for m in metrics],
            COLOURS[4],
            unit="grey",
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


# A perceptually ordered colour scale (dark violet -> blue -> teal -> green -> yellow) for uncertainty.
SCALE = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def colour_scale(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on :data:`SCALE`, linearly between its anchors."""
    v = np.clip(values, 0.0, 1.0) * (len(SCALE) - 1)
    low = np.floor(v).astype(int).clip(0, len(SCALE) - 2)
    t = (v - low)[..., None]
    anchors = np.asarray(SCALE, dtype=np.float64)
    return (anchors[low] * (1 - t) + anchors[low + 1] * t).round().astype(np.uint8)


def uncertainty_maps(grid: list[list[Image.Image]]) -> tuple[list[np.ndarray], float]:
    """Per step, the per-pixel standard deviation of the grey level across trajectories, and their maximum."""
    steps = len(grid[0])
    maps = []
    for i in range(steps):
        stack = np.stack([grey(row[i]) for row in grid])
        maps.append(stack.std(axis=0, ddof=1) if len(grid) > 1 else np.zeros(stack.shape[1:]))
    return maps, float(max(m.max() for m in maps))


def _chart(
    title: str,
    ys: list,
    colour: tuple[int, int, int],
    sd: list | None = None,
    unit: str = "",
    bounds: tuple[float, float] | None = None,
) -> Image.Image:
    """One value per frame (None: no value, a gap), as a line with dots, or with a +- ``sd`` band.

    The y axis is labelled with its range (``bounds`` fixes it, for a probability) and ``unit``,
    the x axis with the first and last frame.
    """
    img = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    draw = ImageDraw.Draw(img, "RGBA")
    font = _font(12)
    draw.text((8, 4), title, fill="black", font=font)
    left, right, top, bottom = 44, PANEL_W - 10, 24, PANEL_H - 22
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    spread = sd if sd is not None else [0.0] * len(ys)
    points = [
        (i, y, s or 0.0)
        for i, (y, s) in enumerate(zip(ys, spread, strict=True))
        if y is not None and math.isfinite(y)
    ]
    if not points:
        draw.text((left + 8, top + 8), "n/a", fill=(120, 120, 120), font=font)
        return img
    lo = min(y - s for _, y, s in points)
    hi = max(y + s for _, y, s in points)
    if bounds is not None:
        lo, hi = bounds
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(1, len(ys) - 1)

    def xy(i: float, y: float) -> tuple[float, float]:
        y = min(max(y, lo), hi)
        return left + (right - left) * i / n, bottom - (bottom - top) * (y - lo) / (hi - lo)

    draw.text((2, top - 6), f"{hi:.3g}", fill=(90, 90, 90), font=_font(10))
    draw.text((2, bottom - 8), f"{lo:.3g}", fill=(90, 90, 90), font=_font(10))
    if unit:
        draw.text((2, (top + bottom) // 2 - 6), unit, fill=(90, 90, 90), font=_font(10))
    draw.text((left, bottom + 4), "frame 0", fill=(90, 90, 90), font=_font(10))
    draw.text((right - 40, bottom + 4), f"frame {len(ys) - 1}", fill=(90, 90, 90), font=_font(10))
    coords = [xy(i, y) for i, y, _ in points]
    if sd is not None and len(points) > 1:
        band = [xy(i, y + s) for i, y, s in points] + [xy(i, y - s) for i, y, s in reversed(points)]
        draw.polygon(band, fill=(*colour, 60))
    if len(coords) > 1:
        draw.line(coords, fill=colour, width=2)
    if sd is None:
        for x, y in coords:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    return img


CURVES = (
    ("change_in_mask", "change inside the mask, mean +- sd", "grey", None),
    ("psnr_outside", "PSNR outside the mask, mean +- sd", "dB", None),
    ("drift_outside", "drift outside the mask, mean +- sd", "grey", None),
    ("severity", "classifier severity, mean +- sd", "grade/3", (0.0, 1.0)),
    ("confidence", "classifier confidence, mean +- sd", "P", (0.0, 1.0)),
)


def render_trajectories(
    grid: list[list[Image.Image]], per_step: dict, title: str, target: str | None
) -> Image.Image:
    """K rows of frames (up to 11 columns), a row of per-step uncertainty maps on a labelled colour
    scale, and mean +- sd curves."""
    steps = len(grid[0])
    picks = list(range(steps)) if steps <= 11 else sorted({round(k * (steps - 1) / 10) for k in range(11)})
    thumb, label_w = 80, 64
    tw, th = thumb_size(grid[0][0].size, thumb)
    maps, top = uncertainty_maps(grid)
    rows = len(grid) + 1
    block = Image.new("RGB", (label_w + tw * len(picks), 16 + rows * thumb + 52), "white")
    draw = ImageDraw.Draw(block)
    for k, p in enumerate(picks):
        draw.text((label_w + k * tw + 4, 2), f"frame {p}", fill="black", font=_font(11))
    for r, row in enumerate(grid):
        draw.text((4, 16 + r * thumb + thumb // 2 - 6), f"traj {r:02d}", fill="black", font=_font(11))
        for k, p in enumerate(picks):
            block.paste(
                _rgb(row[p]).resize((tw, th), Image.Resampling.LANCZOS),
                (label_w + k * tw, 16 + r * thumb),
            )
    y = 16 + len(grid) * thumb
    draw.text((4, y + thumb // 2 - 12), "spread", fill="black", font=_font(11))
    draw.text((4, y + thumb // 2 + 2), "(sd)", fill="black", font=_font(11))
    for k, p in enumerate(picks):
        coloured = colour_scale(maps[p] / top if top > 0 else maps[p])
        block.paste(
            Image.fromarray(coloured, "RGB").resize((tw, th), Image.Resampling.NEAREST),
            (label_w + k * tw, y),
        )
    # The colour scale: what a colour of the spread row means, in grey levels.
    bar_y = y + thumb + 8
    bar_w = min(240, tw * len(picks))
    bar = colour_scale(np.tile(np.linspace(0, 1, bar_w), (10, 1)))
    block.paste(Image.fromarray(bar, "RGB"), (label_w, bar_y))
    draw.text((label_w, bar_y + 12), "0", fill="black", font=_font(10))
    draw.text((label_w + bar_w - 30, bar_y + 12), f"{top:.1f}", fill="black", font=_font(10))
    draw.text(
        (label_w, bar_y + 24),
        "sd of the grey level across trajectories",
        fill="black",
        font=_font(10),
    )
    charts = [
        _chart(
            f"{name_title}{f': {target}' if target and name in ('severity', 'confidence') else ''}",
            per_step[name]["mean"],
            COLOURS[k % len(COLOURS)],
            per_step[name]["sd"],
            unit,
            bounds,
        )
        for k, (name, name_title, unit, bounds) in enumerate(CURVES)
        if name in per_step
    ]
    cols = max(1, min(len(charts), max(2, block.width // PANEL_W)))
    width = max(block.width, cols * PANEL_W)
    height = 28 + block.height + math.ceil(len(charts) / cols) * PANEL_H
    sheet = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(sheet).text((8, 6), title, fill="black", font=_font(14))
    sheet.paste(block, (0, 28))
    for k, chart in enumerate(charts):
        sheet.paste(chart, ((k % cols) * PANEL_W, 28 + block.height + (k // cols) * PANEL_H))
    return sheet


def render_cohort(curves: dict[str, list[float]], title: str, measure: str) -> Image.Image:
    """Every case's curve (its mean over trajectories) in one chart, with the cases named."""
    width, height, left, right, top, bottom = 760, 360, 60, 520, 36, 320
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=_font(14))
    draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
    if not curves:
        draw.text((left + 8, top + 8), "no curve", fill=(120, 120, 120), font=_font(12))
        return img
    values = [v for c in curves.values() for v in c]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(1, max(len(c) for c in curves.values()) - 1)
    draw.text((4, top - 6), f"{hi:.3g}", fill=(90, 90, 90), font=_font(10))
    draw.text((4, bottom - 8), f"{lo:.3g}", fill=(90, 90, 90), font=_font(10))
    draw.text((4, (top + bottom) // 2), measure.replace("_", " "), fill=(90, 90, 90), font=_font(10))
    draw.text((left, bottom + 4), "frame 0", fill=(90, 90, 90), font=_font(10))
    draw.text((right - 40, bottom + 4), f"frame {n}", fill=(90, 90, 90), font=_font(10))
    palette = [*COLOURS, (140, 86, 75), (227, 119, 194), (127, 127, 127)]
    for k, (name, curve) in enumerate(curves.items()):
        colour = palette[k % len(palette)]
        pts = [
            (left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / (hi - lo))
            for i, v in enumerate(curve)
        ]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        if k < 16:
            draw.line((540, top + 8 + 18 * k, 570, top + 8 + 18 * k), fill=colour, width=3)
            draw.text((578, top + 2 + 18 * k), name[:24], fill="black", font=_font(11))
    if len(curves) > 16:
        draw.text((540, top + 8 + 18 * 16), f"... and {len(curves) - 16} more", fill="black", font=_font(11))
    return img
