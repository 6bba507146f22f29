"""Heuristic masks (``pie mask --auto``). Heuristics, not segmentation models: check the preview.

- ``lungs``: frontal chest X-ray. The lungs are the two largest dark regions inside a
  brighter body: Otsu threshold of the blurred image, a closing that bridges rib shadows,
  an opening that cuts thin airways, dark regions touching the image border (air outside
  the body) dropped, the two largest remaining regions kept with their holes filled.
  ``left-lung`` / ``right-lung`` pick one of them in radiological convention (the
  patient's left lung is on the image's right). Fails on films where a lung touches the
  image border or is brighter than the mediastinum (large effusion, white-out).
- ``foreground``: the non-background region of a fundus or skin photo: the largest region
  brighter than the dark frame/vignette around it, holes filled. An image whose border
  is not dark is all foreground.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from pie_cli.imaging.morphology import (
    closing,
    component_sizes,
    fill_holes,
    keep_largest,
    label,
    opening,
    otsu_threshold,
    touching_border,
)

AUTO_CHOICES = ("lungs", "left-lung", "right-lung", "foreground")


class HeuristicFailed(Exception):
    """The heuristic found nothing it trusts; the message says what it expected."""


def _blur(gray: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(gray).filter(ImageFilter.GaussianBlur(radius)))


def lung_fields(gray: np.ndarray) -> list[np.ndarray]:
    """The (at most two) lung fields of a frontal chest X-ray, ordered by image x (left first)."""
    h, w = gray.shape
    scale = min(h, w)
    smooth = _blur(gray, max(1.0, scale / 128))
    dark = smooth <= otsu_threshold(smooth)
    dark = closing(dark, max(1, round(scale / 64)))  # bridge rib shadows
    dark = opening(dark, max(1, round(scale / 64)))  # cut airways and thin bridges
    labels, count = label(dark)
    outside = touching_border(labels)
    sizes = component_sizes(labels, count)
    candidates = [i for i in range(1, count + 1) if i not in outside and sizes[i] >= 0.01 * h * w]
    candidates.sort(key=lambda i: -sizes[i])
    fields = [fill_holes(labels == i) for i in candidates[:2]]
    if not fields:
        raise HeuristicFailed(
            "found no lung fields (it expects a frontal chest X-ray with dark lungs inside a brighter body, "
            "not touching the image border)"
        )
    fields.sort(key=lambda m: np.argwhere(m)[:, 1].mean())
    return fields


def lungs(gray: np.ndarray, which: str = "lungs") -> np.ndarray:
    fields = lung_fields(gray)
    if which == "lungs":
        return np.logical_or.reduce(fields)
    w = gray.shape[1]
    # Radiological convention: the patient's left is on the image's right.
    want_image_right = which == "left-lung"
    for field in fields:
        on_right = np.argwhere(field)[:, 1].mean() > w / 2
        if on_right == want_image_right:
            return field
    raise HeuristicFailed(f"found no {which.replace('-', ' ')} (only a lung field on the other side)")


def foreground(gray: np.ndarray) -> np.ndarray:
    """The non-background region of a fundus or skin photograph."""
    h, w = gray.shape
    ring = max(1, round(min(h, w) * 0.02))
    border = np.concatenate(
        [gray[:ring].ravel(), gray[-ring:].ravel(), gray[:, :ring].ravel(), gray[:, -ring:].ravel()]
    )
    if np.median(border) > 60:
        return np.ones((h, w), dtype=bool)  # no dark frame: the whole photo is foreground
    smooth = _blur(gray, max(1.0, min(h, w) / 256))
    fg = smooth > otsu_threshold(smooth)
    fg = keep_largest(opening(fg, max(1, round(min(h, w) / 128))), 1)
    fg = fill_holes(fg)
    if not fg.any():
        raise HeuristicFailed("found no foreground brighter than the image's dark border")
    return fg


def auto_mask(gray: np.ndarray, kind: str) -> np.ndarray:
    if kind == "foreground":
        return foreground(gray)
    if kind in ("lungs", "left-lung", "right-lung"):
        return lungs(gray, kind)
    raise ValueError(f"unknown auto mask {kind!r}")
