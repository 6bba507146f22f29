"""Progression metrics on frames (numpy only): change inside the mask, preservation outside it.

Per frame, against frame 0 unless said otherwise:
- ``change_in_mask``: mean |frame - frame 0| inside the mask, in grey levels (0-255);
- ``psnr_outside`` / ``ssim_outside``: PSNR (dB) and SSIM (Gaussian window, sigma 1.5, radius
  :data:`WINDOW_RADIUS`) over the outside; no PSNR (None, an empty CSV cell) for frame 0, which is the
  reference, nor for a frame identical outside (infinite PSNR, counted in ``identical_outside``): no
  stand-in values;
- ``drift_outside`` / ``max_abs_outside``: mean and largest |frame - frame 0| over the outside, in grey
  levels (0-255, fractions kept): 0.0 for frame 0 and for a frame identical outside bit for bit;
- ``step_change``: mean |frame - previous frame| over the whole image;
- ``confidence`` / ``severity`` / ``clip_i``: filled in by the optional scorers (``severity``: a
  graded classifier's expected grade, scaled to 0-1, such as the demo classifier's).

**The outside** is every pixel whose (2r+1) x (2r+1) square neighbourhood (r = :data:`WINDOW_RADIUS`,
5: an 11 x 11 square, cut at the image's border) holds no mask pixel, a mask pixel being any value
above 0 (a partial-strength grey counts): the mask dilated by r pixels, excluded. SSIM's window
reaches r pixels, so no outside figure sees a mask pixel: an edit inside the mask cannot leak into
them (a change in the r-pixel ring around the mask, which is not mask, is a change outside it and
still shows in the SSIM of the outside pixels next to it). Where no pixel is left, the outside
metrics are absent (None), as without a mask, where "inside" is the whole image.

Grey levels: an 8-bit frame's are its own ("L"; RGB through PIL's luma, ``convert("L")``), a 16-bit
one's are value / 257 (0..65535 onto 0..255, fractions kept: a change of one 16-bit unit is 1/257).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# The reach of SSIM's Gaussian window (taps -r..r), and so how far the outside keeps from the mask.
WINDOW_RADIUS = 5
OUTSIDE = (
    f"the mask (any value > 0) dilated by {WINDOW_RADIUS} px excluded: the pixels with no mask pixel in the "
    f"square of {2 * WINDOW_RADIUS + 1} x {2 * WINDOW_RADIUS + 1} pixels around them, the reach of SSIM's window"
)
SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def grey(img: Image.Image) -> np.ndarray:
    """Grey levels 0..255 as float: 16-bit (and "I") as value / 257, "L" as is, anything else
    (RGB) through ``convert("L")``."""
    if img.mode in SIXTEEN_BIT:
        return np.asarray(img, dtype=np.float64) / 257.0
    if img.mode == "L":
        return np.asarray(img, dtype=np.float64)
    return np.asarray(img.convert("L"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB; ``math.inf`` for identical pixels."""
    diff = (a - b) ** 2
    mse = float(diff[where].mean() if where is not None else diff.mean())
    if mse == 0:
        return math.inf
    return 10 * math.log10(255.0**2 / mse)


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = WINDOW_RADIUS) -> np.ndarray:
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(x, radius, mode="reflect")
    rows = sum(w * padded[:, k : k + x.shape[1]] for k, w in enumerate(taps))
    return sum(w * rows[k : k + x.shape[0], :] for k, w in enumerate(taps))


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The local mean and variance SSIM compares (Gaussian window)."""
    mu = _gaussian_blur(x)
    return mu, _gaussian_blur(x * x) - mu**2


def ssim_map(
    a: np.ndarray, b: np.ndarray, b_moments: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """Per-pixel SSIM of two grey images in 0..255 (Wang et al. 2004 constants); ``b_moments``:
    ``_moments(b)`` when already at hand (frame 0's, for every frame)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, var_a = _moments(a)
    mu_b, var_b = b_moments if b_moments is not None else _moments(b)
    cov = _gaussian_blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def dilate_square(mask: np.ndarray, radius: int = WINDOW_RADIUS) -> np.ndarray:
    """True where the (2r+1) x (2r+1) square around a pixel (cut at the border) holds a True pixel.

    Separable and exact: a running count along each axis (cumulative sums), O(H * W) whatever r.
    """
    hit = np.asarray(mask, dtype=bool)
    if radius <= 0 or not hit.any():
        return hit.copy()
    for axis in (0, 1):
        n = hit.shape[axis]
        counts = np.cumsum(hit, axis=axis, dtype=np.int64)
        counts = np.concatenate([np.zeros_like(counts.take([0], axis=axis)), counts], axis=axis)
        index = np.arange(n)
        upper = counts.take(np.minimum(index + radius + 1, n), axis=axis)
        lower = counts.take(np.maximum(index - radius, 0), axis=axis)
        hit = (upper - lower) > 0
    return hit


def outside_of(mask: np.ndarray, radius: int = WINDOW_RADIUS) -> np.ndarray:
    """The outside of ``mask`` (any value > 0 is mask) with ``radius`` pixels kept clear of it."""
    return ~dilate_square(np.asarray(mask) > 0, radius)


@dataclass
class FrameMetrics:
    index: int
    change_in_mask: float
    psnr_outside: float | None
    ssim_outside: float | None
    drift_outside: float | None
    max_abs_outside: float | None
    step_change: float
    confidence: float | None = None
    severity: float | None = None
    clip_i: float | None = None


def frame_metrics(
    frames: list[Image.Image], mask: np.ndarray | None, edited: np.ndarray | None = None
) -> list[FrameMetrics]:
    """Metrics of every frame against frame 0.

    ``mask``: the inside, a bool array of the frames' size, or None (no outside); ``edited``: the
    pixels the outside keeps :data:`WINDOW_RADIUS` clear of (any value > 0; by default ``mask``).
    """
    g = [grey(f) for f in frames]
    inside = mask if mask is not None else np.ones_like(g[0], dtype=bool)
    outside = outside_of(edited if edited is not None else mask) if mask is not None else None
    has_outside = outside is not None and bool(outside.any())
    ref = g[0]
    ref_moments = _moments(ref) if has_outside else None
    out = []
    for i, cur in enumerate(g):
        diff = np.abs(cur - ref)
        away = diff[outside] if has_outside else None
        db = psnr(cur, ref, outside) if has_outside and i else None
        metrics = FrameMetrics(
            index=i,
            change_in_mask=float(diff[inside].mean()) if inside.any() else 0.0,
            psnr_outside=db if db is not None and math.isfinite(db) else None,
            ssim_outside=float(ssim_map(cur, ref, ref_moments)[outside].mean()) if has_outside else None,
            drift_outside=float(away.mean()) if away is not None else None,
            max_abs_outside=float(away.max()) if away is not None else None,
            step_change=float(np.abs(cur - g[i - 1]).mean()) if i else 0.0,
        )
        out.append(metrics)
    return out


def _figures(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant figures: a drift of one 16-bit unit stays above 0."""
    return float(f"{value:.{digits}g}")


def summarise(metrics: list[FrameMetrics], tolerance: float = 1e-3) -> dict:
    """Headline numbers; for the classifier confidence: the rise and whether it rises monotonically."""
    summary: dict = {
        "frames": len(metrics),
        "final_change_in_mask": round(metrics[-1].change_in_mask, 4),
    }
    later = [m for m in metrics[1:] if m.max_abs_outside is not None]
    outside = [m.psnr_outside for m in later if m.psnr_outside is not None]
    if later:
        # frames identical to frame 0 outside, bit for bit (their PSNR is infinite)
        summary["identical_outside"] = sum(m.max_abs_outside == 0 for m in later)
        summary["min_ssim_outside"] = round(min(m.ssim_outside for m in later), 5)
        summary["max_drift_outside"] = _figures(max(m.drift_outside for m in later))
        summary["final_drift_outside"] = _figures(later[-1].drift_outside)
        summary["max_abs_outside"] = _figures(max(m.max_abs_outside for m in later))
    if outside:
        summary["min_psnr_outside"] = round(min(outside), 3)
        summary["mean_psnr_outside"] = round(float(np.mean(outside)), 3)
    curve = progression_curve(metrics)
    if curve is not None and len(metrics) > 1:
        from pie_cli.evaluation.pace import describe, pace

        name, values = curve
        measures = pace(values)
        what = {"severity": "the severity", "confidence": "the confidence", "change_in_mask": "the change"}[
            name
        ]
        summary["pace"] = {"of": name, **measures, "sentence": describe(measures, what)}
    conf = [m.confidence for m in metrics]
    if all(c is not None for c in conf) and len(conf) > 1:
        steps = np.diff(np.array(conf, dtype=np.float64))
        summary["confidence_first"] = round(conf[0], 5)
        summary["confidence_last"] = round(conf[-1], 5)
        summary["confidence_rise"] = round(conf[-1] - conf[0], 5)
        summary["rising_steps"] = int((steps > tolerance).sum())
        summary["falling_steps"] = int((steps < -tolerance).sum())
        summary["monotonic"] = bool((steps >= -tolerance).all())
    clip = [m.clip_i for m in metrics]
    if all(c is not None for c in clip):
        summary["final_clip_i"] = round(clip[-1], 5)
    return summary


def progression_curve(metrics: list[FrameMetrics]) -> tuple[str, list[float]] | None:
    """The curve a progression's pace is measured on: the classifier's severity where it grades,
    else its confidence, else the change inside the mask."""
    for name in ("severity", "confidence", "change_in_mask"):
        values = [getattr(m, name) for m in metrics]
        if all(v is not None for v in values):
            return name, [float(v) for v in values]
    return None


def rows(metrics: list[FrameMetrics]) -> list[dict]:
    return [asdict(m) for m in metrics]
