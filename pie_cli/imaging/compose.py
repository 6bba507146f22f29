"""Keeping the patient's own pixels: feathered compositing and the full-resolution paste-back.

Pure numpy/PIL (no torch): the core calls :func:`composite` after every decode when
``--preserve-outside`` (or ``--fit pad``'s padding) asks for it, and ``pie simulate --full-res``
calls :func:`paste_back` on every frame it writes.

- :func:`feather_weight`: 1 on every pixel of the mask (any value > 0), ``1 - d / (F + 1)`` at
  Euclidean distance ``d`` <= F pixels from it, and exactly 0 beyond: pixels farther than the
  feather from the mask come from the original bit for bit.
- :func:`composite`: ``base + (edited - base) * weight``, rounded, in the base's own depth
  (8-bit RGB or grey, 16-bit grey); where the weight is 0 the result *is* the base.
- :func:`paste_back`: a frame edited at the model's resolution inside a window of a large image,
  resized back to the window's size and blended into the original image at its own size and
  depth: outside the window (and, with a feather weight, beyond the feather) the original's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pie_cli.imaging.geometry import Box, Geometry
from pie_cli.imaging.media import IMAGE_RESAMPLE, SIXTEEN_BIT_MODES, to_rgb8
from pie_cli.imaging.morphology import distance_within

# The modes a full-resolution frame keeps as read; anything else (32-bit, float...) becomes 8-bit RGB.
KEPT_MODES = ("RGB", "L", "I;16")


def feather_weight(mask: np.ndarray | Image.Image, feather: int) -> np.ndarray:
    """Per pixel, how much of the edited image a composite takes (see the module docstring)."""
    on = np.asarray(mask) > 0
    if feather <= 0 or not on.any():
        return on.astype(np.float64)
    distance = distance_within(on, feather)
    weight = np.clip(1.0 - distance / (feather + 1), 0.0, 1.0)
    weight[~np.isfinite(distance)] = 0.0
    return weight


def _pixels(img: Image.Image) -> tuple[np.ndarray, int]:
    arr = np.asarray(img)
    top = 65535 if img.mode in SIXTEEN_BIT_MODES else 255
    return arr.astype(np.float64), top


def composite(base: Image.Image, edited: Image.Image, weight: np.ndarray) -> Image.Image:
    """``base`` where ``weight`` is 0, ``edited`` where it is 1, blended between (same size and mode)."""
    if base.size != edited.size or base.mode != edited.mode:
        raise ValueError(f"composite of {base.mode} {base.size} and {edited.mode} {edited.size}")
    a, top = _pixels(base)
    b, _ = _pixels(edited)
    w = weight[..., None] if a.ndim == 3 else weight
    out = np.clip(np.round(a + (b - a) * w), 0, top)
    out = np.where(w == 0, a, out)  # bit for bit, whatever rounding does elsewhere
    if top == 65535:
        return Image.fromarray(out.astype(np.uint16))  # "I;16"
    return Image.fromarray(out.astype(np.uint8), mode=base.mode)


def full_res_base(original: Image.Image) -> Image.Image:
    """The original image in the depth a full-resolution frame keeps (8-bit RGB/grey or 16-bit grey)."""
    if original.mode in KEPT_MODES:
        return original
    if original.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(np.asarray(original).astype(np.uint16))
    if original.mode == "LA":
        return original.convert("L")
    return to_rgb8(original)


def _in_mode(frame: Image.Image, mode: str) -> Image.Image:
    """An 8-bit RGB frame in ``mode``: grey by ITU-R 601 luma; 16-bit as grey * 257 (0..255 -> 0..65535)."""
    if mode == "RGB":
        return frame.convert("RGB")
    grey = frame.convert("L")
    if mode == "L":
        return grey
    return Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)


def content_in_source(geometry: Geometry, window: Box) -> Box:
    """The source-image box (whole pixels) a window's frame covers: the window unless ``crop`` cut it."""
    left, top, right, bottom = geometry.source_box()
    wx, wy = window[:2]
    return (wx + round(left), wy + round(top), wx + round(right), wy + round(bottom))


def edge_weight(size: tuple[int, int], band: int) -> np.ndarray:
    """1 inside a box of ``size``, falling linearly to 0 over its outer ``band`` pixels (a seamless paste)."""
    w, h = size
    if band <= 0:
        return np.ones((h, w))
    xs = np.minimum(np.arange(w) + 1, w - np.arange(w)) / (band + 1)
    ys = np.minimum(np.arange(h) + 1, h - np.arange(h)) / (band + 1)
    return np.clip(np.minimum(ys[:, None], xs[None, :]), 0.0, 1.0)


def paste_back(base: Image.Image, frame: Image.Image, region: Box, weight: np.ndarray) -> Image.Image:
    """``base`` (the original, see :func:`full_res_base`) with ``frame`` resized onto ``region``.

    ``weight`` has the region's shape: how much of the frame each pixel takes (0 keeps the
    original's pixel exactly). Pixels outside the region are the original's.
    """
    left, top, right, bottom = region
    size = (right - left, bottom - top)
    up = frame if frame.size == size else frame.resize(size, IMAGE_RESAMPLE)
    window = base.crop(region)
    blended = composite(window, _in_mode(up, base.mode), weight)
    out = base.copy()
    out.paste(blended, (left, top))
    return out


@dataclass(frozen=True)
class FullRes:
    """What ``--full-res`` edits and how its frames are put back together (see :func:`plan_full_res`)."""

    base: Image.Image  # the original at its size, in the depth kept (frame 0 of the run)
    mask: Image.Image  # the mask at the original's size ("L"), as the run's mask.png
    window: Box  # the part of the original the model edits
    margin: int
    geometry: Geometry  # of the window's image at the working resolution
    region: Box  # the original's pixels the window's frame covers (the window unless crop cut it)
    weight: np.ndarray  # region-shaped: how much of the edited frame each pixel takes
    feather: int | None  # --preserve-outside's feather in the original's pixels (None: no preservation)

    @property
    def scale(self) -> float:
        """Original pixels per working pixel."""
        return (self.region[2] - self.region[0]) / self.geometry.frame_size[0]

    def window_image(self) -> Image.Image:
        return self.base.crop(self.window)

    def window_mask(self) -> Image.Image:
        return self.mask.crop(self.window)

    def working_feather(self) -> int | None:
        """The feather the progression uses at the working resolution (None: its default, one latent cell)."""
        return None if self.feather is None else round(self.feather / self.scale)

    def frame(self, working: Image.Image) -> Image.Image:
        """A frame at the original's size and depth from a frame of the window at the working size."""
        return paste_back(self.base, working, self.region, self.weight)

    def describe(self) -> dict:
        return {
            "size": list(self.base.size),
            "mode": self.base.mode,
            "window": list(self.window),
            "margin": self.margin,
            "region": list(self.region),
            "scale": round(self.scale, 6),
            "feather": self.feather,
            "blend": "feathered mask"
            if self.feather is not None
            else f"window edge, {_band(self.margin)} px",
        }


def _band(margin: int) -> int:
    return max(1, margin // 2)


def plan_full_res(
    original: Image.Image,
    mask: Image.Image,
    resolution: int,
    fit: str,
    margin: int | None = None,
    preserve_feather: int | None = None,
    preserve: bool = False,
) -> FullRes:
    """The ``--full-res`` plan for ``original`` and its ``mask`` (grey "L" of the same size, not empty).

    With ``preserve`` the pasted frame is weighted by the feathered mask (``preserve_feather``
    original pixels, default one latent cell at the working size), so pixels beyond the feather
    are the original's bit for bit; without it the whole window is pasted, blended over its outer
    half-margin so that no seam shows.
    """
    from pie_cli.imaging.geometry import LATENT_FACTOR, fit_geometry, full_res_window

    on = np.asarray(mask) > 0
    ys, xs = np.nonzero(on)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    window, margin = full_res_window(original.size, bbox, resolution, margin)
    size = (window[2] - window[0], window[3] - window[1])
    geometry = fit_geometry(size, resolution, fit)
    region = content_in_source(geometry, window)
    base = full_res_base(original)
    feather = None
    if preserve:
        scale = (region[2] - region[0]) / geometry.frame_size[0]
        feather = preserve_feather if preserve_feather is not None else round(LATENT_FACTOR * scale)
        weight = feather_weight(np.asarray(mask.crop(region)), feather)
    else:
        weight = edge_weight((region[2] - region[0], region[3] - region[1]), _band(margin))
    return FullRes(base, mask, window, margin, geometry, region, weight, feather)
