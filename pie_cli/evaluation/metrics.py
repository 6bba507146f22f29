"""Progression metrics on frames (numpy only): change inside the mask, preservation outside it.

Per frame, against frame 0 unless said otherwise:
- ``change_in_mask``: mean |frame - frame 0| inside the mask, in grey levels (0-255);
- ``psnr_outside`` / ``ssim_outside``: PSNR (dB) and SSIM (Gaussian window, sigma 1.5) over the
  pixels outside the mask; no PSNR (None, an empty CSV cell) for frame 0, which is the reference,
  nor for a frame identical outside (infinite PSNR, counted in ``identical_outside``): no stand-in values;
- ``step_change``: mean |frame - previous frame| over the whole image;
- ``confidence`` / ``severity`` / ``clip_i``: filled in by the optional scorers (``severity``: a
  graded classifier's expected grade, scaled to 0-1, such as the demo classifier's).

Without a mask, "inside" is the whole image and the outside metrics are absent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


def grey(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB; ``math.inf`` for identical pixels."""
    diff = (a - b) ** 2
    mse = float(diff[where].mean() if where is not None else diff.mean())
    if mse == 0:
        return math.inf
    return 10 * math.log10(255.0**2 / mse)


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(x, radius, mode="reflect")
    rows = sum(w * padded[:, k : k + x.shape[1]] for k, w in enumerate(taps))
    return sum(w * rows[k : k + x.shape[0], :] for k, w in enumerate(taps))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM of two grey images in 0..255 (Wang et al. 2004 constants)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_blur(a), _gaussian_blur(b)
    var_a = _gaussian_blur(a * a) - mu_a**2
    var_b = _gaussian_blur(b * b) - mu_b**2
    cov = _gaussian_blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


@dataclass
class FrameMetrics:
    index: int
    change_in_mask: float
    psnr_outside: float | None
    ssim_outside: float | None
    step_change: float
    confidence: float | None = None
    severity: float | None = None
    clip_i: float | None = None


def frame_metrics(frames: list[Image.Image], mask: np.ndarray | None) -> list[FrameMetrics]:
    """Metrics of every frame against frame 0 (``mask``: bool array of the frames' size, or None)."""
    g = [grey(f) for f in frames]
    inside = mask if mask is not None else np.ones_like(g[0], dtype=bool)
    outside = ~mask if mask is not None else None
    has_outside = outside is not None and outside.any()
    out = []
    for i, cur in enumerate(g):
        ref = g[0]
        db = psnr(cur, ref, outside) if has_outside and i else None
        metrics = FrameMetrics(
            index=i,
            change_in_mask=float(np.abs(cur - ref)[inside].mean()) if inside.any() else 0.0,
            psnr_outside=db if db is not None and math.isfinite(db) else None,
            ssim_outside=float(ssim_map(cur, ref)[outside].mean()) if has_outside else None,
            step_change=float(np.abs(cur - g[i - 1]).mean()) if i else 0.0,
        )
        out.append(metrics)
    return out


def summarise(metrics: list[FrameMetrics], tolerance: float = 1e-3) -> dict:
    """Headline numbers; for the classifier confidence: the rise and whether it rises monotonically."""
    summary: dict = {
        "frames": len(metrics),
        "final_change_in_mask": round(metrics[-1].change_in_mask, 4),
    }
    outside = [m.psnr_outside for m in metrics[1:] if m.psnr_outside is not None]
    ssim = [m.ssim_outside for m in metrics[1:] if m.ssim_outside is not None]
    if ssim:
        summary["identical_outside"] = len(ssim) - len(outside)  # frames whose PSNR is infinite
        summary["min_ssim_outside"] = round(min(ssim), 5)
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
