"""A synthetic chest-X-ray-like phantom and its lung masks (numpy + PIL, deterministic by seed).

Not anatomy: a body outline, two dark lung fields with rib shadows, a heart, a spine and
detector noise, enough for the offline demo to look like the kind of input pie is for.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def chest_phantom(size: int = 256, seed: int = 0) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(image "L", right-lung mask "L", left-lung mask "L"), all size x size.

    Radiological convention: the patient's left lung is on the image's right.
    """
    rng = np.random.default_rng(seed)
    h = w = size
    img = np.full((h, w), 0.08)
    body = _ellipse(h, w, h * 0.55, w * 0.5, h * 0.50, w * 0.46)
    img[body] = 0.55
    lung_r = _ellipse(h, w, h * 0.47, w * 0.31, h * 0.30, w * 0.15)  # patient's right, image left
    lung_l = _ellipse(h, w, h * 0.47, w * 0.69, h * 0.30, w * 0.15)
    img[lung_r | lung_l] = 0.22
    y, x = np.mgrid[0:h, 0:w]
    for k in range(7):  # rib shadows: bright arcs across both lung fields
        arc = np.abs(y - (h * (0.22 + 0.075 * k) + 0.0018 * (x - w / 2) ** 2 / (w / 256))) < h * 0.012
        img[arc & (lung_r | lung_l)] += 0.13
    heart = _ellipse(h, w, h * 0.62, w * 0.56, h * 0.14, w * 0.17)
    img[heart] = 0.62
    spine = (np.abs(x - w * 0.5) < w * 0.035) & body
    img[spine] = 0.75
    img += rng.normal(0, 0.025, size=(h, w))
    img8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(img8, mode="L").filter(ImageFilter.GaussianBlur(1.2))
    to_mask = lambda m: Image.fromarray((m * 255).astype(np.uint8), mode="L")  # noqa: E731
    return image, to_mask(lung_r & ~heart), to_mask(lung_l & ~heart)
