"""Edit masks: reading, validating and bringing them to pie's working geometry.

A mask is 8-bit grey, white (255) = edit, black = keep; grey levels are partial edit
strength. Pure PIL/numpy (``pie mask`` must never import torch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.geometry import MIN_IMAGE_SIDE
from pie_cli.imaging.media import MASK_RESAMPLE, SIXTEEN_BIT_MODES, fit_square


def mask_to_grey(img: Image.Image, path: Path | str = "mask") -> Image.Image:
    """Any single-channel (or grey-stored-as-colour) image -> mode "L", 0..255."""
    mode = img.mode
    if mode == "L":
        return img
    if mode == "1":
        return img.convert("L")
    if mode == "LA":
        return img.getchannel("L")
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max(initial=0)
        if mode == "F" and top <= 1.0:
            scale = 255.0
        elif mode.startswith("I;16") or top > 255:
            scale = 255.0 / 65535.0
        else:
            scale = 1.0
        if mode != "F" and top == 1:
            raise UserError(
                f"mask {path} looks like a 0/1 label map (its maximum value is 1); "
                "save it with 255 for the region to edit."
            )
        return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), mode="L")
    rgb = np.asarray(img.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise UserError(
            f"mask {path} is a colour image; masks must be greyscale (white = edit, black = keep)."
        )
    return Image.fromarray(rgb[..., 0].copy(), mode="L")


def prepare_mask(
    img: Image.Image, image_size: tuple[int, int], resolution: int, path: Path | str = "mask"
) -> Image.Image:
    """Bring a mask to the resolution x resolution geometry of its image ("L", 0..255).

    The mask must be either the original image's size (it is then resized and
    centre-cropped exactly like the image) or already resolution x resolution (for
    example made by ``pie mask``). Anything else is refused: a mask of another size
    would be stretched onto the wrong anatomy. An all-black mask is legal here (it
    edits nothing); commands refuse it with :func:`require_nonempty`.
    """
    grey = mask_to_grey(img, path)
    if grey.size == image_size:
        return fit_square(grey, resolution, resample=MASK_RESAMPLE)
    if grey.size == (resolution, resolution):
        return grey
    w, h = grey.size
    iw, ih = image_size
    raise UserError(
        f"mask {path} is {w}x{h} but the image is {iw}x{ih}; "
        f"a mask must have the image's size or the working size {resolution}x{resolution} (see `pie mask`)."
    )


def require_nonempty(
    mask: Image.Image, original: Image.Image, resolution: int, path: Path | str = "mask"
) -> None:
    """Refuse a mask with no white pixel in the working geometry (it would edit nothing)."""
    if np.asarray(mask).max(initial=0) > 0:
        return
    cropped = original.size != mask.size and np.asarray(mask_to_grey(original, path)).max(initial=0) > 0
    where = f" inside the centre crop used at --resolution {resolution}" if cropped else ""
    raise UserError(f"mask {path} is empty (no white pixels{where}); white marks the region to edit.")


def require_image_size(img: Image.Image, path: Path | str, what: str = "image") -> None:
    """Refuse an image too small to hold anything (a 1x1 "image" would be stretched to R x R)."""
    w, h = img.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise UserError(
            f"{what} {path} is {w}x{h} pixels; pie needs at least {MIN_IMAGE_SIDE} pixels on each side."
        )


def latent_mask(mask: Image.Image | np.ndarray, factor: int) -> np.ndarray:
    """The mask as the model sees it: one value in [0, 1] per latent cell.

    Matches ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
    without antialiasing for an integer down-sampling ``factor``: each cell is the
    mean of the (up to) four pixels nearest its block's centre (the 4 central
    pixels of each 8x8 block for Stable Diffusion).
    """
    arr = np.asarray(mask, dtype=np.float64)
    h, w = arr.shape
    ys = (np.arange(h // factor) + 0.5) * factor - 0.5
    xs = (np.arange(w // factor) + 0.5) * factor - 0.5
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    top = arr[np.ix_(y0, x0)] * (1 - wx) + arr[np.ix_(y0, x1)] * wx
    bottom = arr[np.ix_(y1, x0)] * (1 - wx) + arr[np.ix_(y1, x1)] * wx
    return (top * (1 - wy) + bottom * wy) / 255.0
