"""The geometry pie works in, and its limits: pure arithmetic (no numpy, PIL or torch).

:func:`fit_geometry` is the one place that decides how an image of any size becomes what the
model works on (the *canvas*) and what a frame is (the canvas's *content*), for ``pie simulate``,
``pie mask``, ``pie finetune`` and ``pie evaluate`` alike (``--fit``):

- ``crop`` (the default, the original method's): the short side resized to R (``--resolution``),
  the centre cropped to R x R; frames are R x R.
- ``pad``: the long side resized to R, the image centred on an R x R canvas whose padding is never
  edited and is removed from every output; frames have the image's aspect (e.g. 426 x 512).
- ``native``: the short side resized to R and the long side to the nearest multiple of the latent
  factor (8), the aspect kept to within half a latent cell; the canvas is the frame (e.g. 512 x 616).

Masks made by ``pie mask --fit X`` and every frame use the same geometry, so they always line up.
:func:`full_res_window` chooses the part of a large image ``--full-res`` edits. The command line
checks resolutions with :func:`resolution_problem` before anything heavy is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The smallest image side pie accepts: one 8 x 8 latent cell of Stable Diffusion's VAE.
MIN_IMAGE_SIDE = 8
# Working resolutions above this are refused up front: 4096 px is 16x SD's working area, a 4096 x 4096
# mask already needs a few GB of numpy temporaries, and a typo like 51200 would end out of memory.
MAX_RESOLUTION = 4096
# Stable Diffusion 1.x's VAE turns 8 x 8 pixels into one latent cell: every canvas side is a multiple of it.
LATENT_FACTOR = 8
FIT_CHOICES = ("crop", "pad", "native")
# `--fit crop` warns when it would cut away more than this fraction of the image.
CROP_WARN_FRACTION = 0.05


def resolution_problem(resolution: int) -> str | None:
    """What is wrong with a working resolution (a multiple of 8 in [8, MAX_RESOLUTION]), or None."""
    if resolution < 8 or resolution % 8:
        return f"must be a positive multiple of 8, got {resolution}"
    if resolution > MAX_RESOLUTION:
        return f"must be at most {MAX_RESOLUTION}, got {resolution}"
    return None


def square_geometry(
    size: tuple[int, int], resolution: int
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resized size (short side = resolution) and centre-crop box for an image of ``size``."""
    w, h = size
    if w <= h:
        new = (resolution, max(resolution, round(h * resolution / w)))
    else:
        new = (max(resolution, round(w * resolution / h)), resolution)
    left = (new[0] - resolution) // 2
    top = (new[1] - resolution) // 2
    return new, (left, top, left + resolution, top + resolution)


Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


@dataclass(frozen=True)
class Geometry:
    """How an image of ``source`` size maps onto the model's canvas (see the module docstring).

    The image is resized to ``resized`` and placed with its top-left corner at ``offset`` on a
    canvas of ``canvas`` size (a negative offset crops it); ``content`` is the part of the canvas
    the image covers: what a frame is.
    """

    fit: str
    source: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    canvas: tuple[int, int]

    @property
    def content(self) -> Box:
        """The canvas box the image covers (the whole canvas unless ``pad``)."""
        (ox, oy), (rw, rh), (cw, ch) = self.offset, self.resized, self.canvas
        return max(0, ox), max(0, oy), min(cw, ox + rw), min(ch, oy + rh)

    @property
    def frame_size(self) -> tuple[int, int]:
        left, top, right, bottom = self.content
        return right - left, bottom - top

    @property
    def padded(self) -> bool:
        return self.content != (0, 0, *self.canvas)

    def source_box(self) -> tuple[float, float, float, float]:
        """The content's box in source-image coordinates (floats: the inverse of the resize)."""
        left, top, right, bottom = self.content
        (ox, oy), (rw, rh), (sw, sh) = self.offset, self.resized, self.source
        sx, sy = sw / rw, sh / rh
        return (left - ox) * sx, (top - oy) * sy, (right - ox) * sx, (bottom - oy) * sy

    def cut_fraction(self) -> float:
        """The fraction of the source image's area that lies outside the frame (``crop`` only)."""
        left, top, right, bottom = self.source_box()
        sw, sh = self.source
        return 1.0 - ((right - left) * (bottom - top)) / (sw * sh)

    def describe(self) -> dict:
        """The manifest's record of this geometry."""
        return {
            "fit": self.fit,
            "source": list(self.source),
            "resized": list(self.resized),
            "offset": list(self.offset),
            "canvas": list(self.canvas),
            "content": list(self.content),
        }


def native_size(size: tuple[int, int], resolution: int, factor: int = LATENT_FACTOR) -> tuple[int, int]:
    """Short side ``resolution``, long side the nearest multiple of ``factor`` to the image's aspect."""
    w, h = size
    if w <= h:
        return resolution, max(resolution, factor * round(h * resolution / w / factor))
    return max(resolution, factor * round(w * resolution / h / factor)), resolution


def fit_problem(size: tuple[int, int], resolution: int, fit: str) -> str | None:
    """What makes ``fit`` impossible for an image of ``size`` (a canvas above the limit), or None."""
    if fit not in FIT_CHOICES:
        return f"must be one of {', '.join(FIT_CHOICES)}, got {fit!r}"
    if fit == "native":
        w, h = native_size(size, resolution)
        if max(w, h) > MAX_RESOLUTION:
            return (
                f"native would work at {w}x{h} for this {size[0]}x{size[1]} image, above {MAX_RESOLUTION} px; "
                "use --fit pad (or a lower --resolution)"
            )
    return None


def fit_geometry(size: tuple[int, int], resolution: int, fit: str = "crop") -> Geometry:
    """The geometry of an image of ``size`` at ``resolution`` under ``fit`` (``crop`` | ``pad`` | ``native``)."""
    problem = fit_problem(size, resolution, fit)
    if problem is not None:
        raise ValueError(f"fit {problem}")
    w, h = size
    if fit == "crop":
        new, (left, top, _, _) = square_geometry(size, resolution)
        return Geometry(fit, (w, h), new, (-left, -top), (resolution, resolution))
    if fit == "pad":
        if w >= h:
            new = (resolution, max(1, round(h * resolution / w)))
        else:
            new = (max(1, round(w * resolution / h)), resolution)
        offset = ((resolution - new[0]) // 2, (resolution - new[1]) // 2)
        return Geometry(fit, (w, h), new, offset, (resolution, resolution))
    new = native_size(size, resolution)
    return Geometry(fit, (w, h), new, (0, 0), new)


def full_res_window(
    size: tuple[int, int], bbox: Box, resolution: int, margin: int | None = None
) -> tuple[Box, int]:
    """(window, margin): the part of an image of ``size`` that ``--full-res`` edits around ``bbox``.

    The window holds the mask's bounding box ``bbox`` plus ``margin`` pixels on every side
    (default: a quarter of the box's longer side, at least 32), is square (the model's own
    shape) and at least ``resolution`` on a side where the image allows, centred on the box
    and shifted to lie inside the image; an image too small for the square gives the largest
    rectangle it holds in that direction.
    """
    w, h = size
    x0, y0, x1, y1 = bbox
    longest = max(x1 - x0, y1 - y0)
    if margin is None:
        margin = max(32, math.ceil(longest / 4))
    side = max(longest + 2 * margin, resolution)

    def span(lo: int, hi: int, limit: int) -> tuple[int, int]:
        length = min(side, limit)
        start = round((lo + hi - length) / 2)
        start = min(max(0, start), limit - length)
        return start, start + length

    left, right = span(x0, x1, w)
    top, bottom = span(y0, y1, h)
    return (left, top, right, bottom), margin
