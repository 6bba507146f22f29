"""Edit masks: reading, validating and bringing them to pie's working geometry.

A mask is 8-bit grey, white (255) = edit, black = keep; grey levels are partial edit
strength. Pure PIL/numpy (``pie mask`` must never import torch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.geometry import CROP_WARN_FRACTION, MIN_IMAGE_SIDE, Geometry, fit_geometry
from pie_cli.imaging.media import MASK_RESAMPLE, SIXTEEN_BIT_MODES, fit_to, frame_of

# A mask with one non-zero value at most this large is a label map (a segmentation tool's ids), not a
# faint partial-strength mask: {0, 1} and {0, 2} are regions; {0, 200} is 200/255 edit strength.
MAX_LABEL = 16
# Where a read mask keeps how it was understood (``info`` of the returned image).
INTERPRETATION_KEY = "pie_mask_interpretation"


def read_mask(
    img: Image.Image, path: Path | str = "mask", label: int | None = None
) -> tuple[Image.Image, str]:
    """(mask as mode "L", 0..255 with 255 = edit; how it was read), or a ``UserError`` naming the file.

    Every case is decided, none guessed:

    - grey (8-bit, 16-bit, float, 1-bit, or grey stored as RGB): values as strength;
    - a label map (integer values, at most ``MAX_LABEL``): one label is a binary region, several
      are refused unless ``label`` picks one;
    - transparency (LA, RGBA, a palette with transparency): transparent = keep. Opaque pixels of
      one colour (white, black, red strokes...) make the region the alpha channel itself; grey
      opaque pixels are their grey times the alpha; several colours are refused;
    - colour without transparency is refused (masks are grey: white = edit, black = keep).
    """
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min(initial=255) < 255:
            return _with_alpha(img, alpha, path)
        img = img.convert("L" if img.mode in ("LA", "La", "PA") else "RGB")
    if img.mode == "1":
        img = img.convert("L")
    if img.mode in ("L", "I", "F") or img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img)
        if img.mode != "F":
            region = _label_region(values, path, label)
            if region is not None:
                return region
        elif label is not None:
            raise UserError(
                f"mask {path} holds fractional values; --label needs a label map of whole numbers."
            )
        if img.mode == "L":
            return img, "grey"
        arr = values.astype(np.float64)
        top = arr.max(initial=0)
        if img.mode == "F" and top <= 1.0:
            scale, what = 255.0, "float 0..1"
        elif img.mode.startswith("I;16") or top > 255:
            scale, what = 255.0 / 65535.0, "16-bit grey"
        else:
            scale, what = 1.0, "grey"
        grey = Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), mode="L")
        return grey, what
    rgb = np.asarray(img.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise UserError(
            f"mask {path} is a colour image; masks must be greyscale (white = edit, black = keep)."
        )
    return _read_grey(Image.fromarray(rgb[..., 0].copy(), mode="L"), path, label, "grey stored as RGB")


def _read_grey(grey: Image.Image, path: Path | str, label: int | None, what: str) -> tuple[Image.Image, str]:
    region = _label_region(np.asarray(grey), path, label)
    return region if region is not None else (grey, what)


def _label_region(values: np.ndarray, path: Path | str, label: int | None) -> tuple[Image.Image, str] | None:
    """A label map's region (binary, 255 = edit), or None for a grey mask."""
    present = np.unique(values)
    nonzero = [int(v) for v in present if v > 0]
    if label is not None:
        if label not in nonzero:
            found = ", ".join(map(str, nonzero[:20])) or "none"
            raise UserError(f"mask {path} has no pixel of label {label} (its values above 0: {found}).")
        return _binary(values == label), f"label {label} of a label map"
    if not nonzero or max(nonzero) > MAX_LABEL:
        return None
    if len(nonzero) == 1:
        return _binary(values > 0), f"label map {{0, {nonzero[0]}}} read as a binary region"
    labels = ", ".join(map(str, nonzero))
    raise UserError(
        f"mask {path} is a label map with labels {labels}; choose the region with "
        f"`pie mask IMAGE --from {path} --label K --out MASK.png`."
    )


def _binary(region: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(region, 255, 0).astype(np.uint8), mode="L")


def _with_alpha(img: Image.Image, alpha: np.ndarray, path: Path | str) -> tuple[Image.Image, str]:
    """A mask with transparency: transparent = keep (see :func:`read_mask`)."""
    rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
    visible = alpha.reshape(-1) > 0
    if not visible.any():
        return Image.fromarray(np.zeros(alpha.shape, np.uint8), mode="L"), "transparent everywhere"
    colours = np.unique(rgb[visible], axis=0)
    if len(colours) == 1:
        return Image.fromarray(
            alpha.astype(np.uint8), mode="L"
        ), "alpha channel (opaque = edit, transparent = keep)"
    if not (np.array_equal(colours[:, 0], colours[:, 1]) and np.array_equal(colours[:, 0], colours[:, 2])):
        raise UserError(
            f"mask {path} is a colour image with transparency ({len(colours)} colours where it is opaque); "
            "give a grey mask, or one colour on a transparent background."
        )
    grey = rgb[:, 0].reshape(alpha.shape).astype(np.float64) * alpha / 255.0
    return Image.fromarray(np.round(grey).astype(np.uint8), mode="L"), "grey times alpha (transparent = keep)"


def mask_to_grey(img: Image.Image, path: Path | str = "mask", label: int | None = None) -> Image.Image:
    """Any mask image -> mode "L", 0..255 (see :func:`read_mask`; its interpretation kept in ``info``)."""
    grey, interpretation = read_mask(img, path, label)
    if grey is img:
        grey = img.copy()
    grey.info[INTERPRETATION_KEY] = interpretation
    return grey


def interpretation_of(mask: Image.Image) -> str | None:
    """How :func:`mask_to_grey` read ``mask`` (None for an image it did not read)."""
    value = mask.info.get(INTERPRETATION_KEY)
    return value if isinstance(value, str) else None


def prepare_mask(
    img: Image.Image,
    image_size: tuple[int, int],
    resolution: int,
    path: Path | str = "mask",
    fit: str = "crop",
) -> Image.Image:
    """Bring a mask to the frame geometry of its image under ``fit`` ("L", 0..255; see ``geometry``).

    The mask must be either the original image's size (it is then resized and cropped or
    padded exactly like the image) or already the frame's size (for example made by
    ``pie mask --fit`` with the same fit: R x R for ``crop``). Anything else is refused: a mask
    of another size would be stretched onto the wrong anatomy. An all-black mask is legal here
    (it edits nothing); commands refuse it with :func:`require_nonempty`.
    """
    grey = mask_to_grey(img, path)
    geometry = fit_geometry(image_size, resolution, fit)
    if grey.size == image_size:
        return mask_in_frame(grey, geometry)
    fw, fh = geometry.frame_size
    if grey.size == (fw, fh):
        return grey
    w, h = grey.size
    iw, ih = image_size
    how = f"`pie mask --fit {fit}`" if fit != "crop" else "`pie mask`"
    fitted = f" at --fit {fit}" if fit != "crop" else ""
    raise UserError(
        f"mask {path} is {w}x{h} but the image is {iw}x{ih}; "
        f"a mask must have the image's size or the working size {fw}x{fh}{fitted} (see {how})."
    )


def mask_in_frame(grey: Image.Image, geometry: Geometry) -> Image.Image:
    """A grey mask of the image's size in the frame geometry (padding is never edited: 0)."""
    return frame_of(fit_to(grey, geometry, MASK_RESAMPLE, fill=0), geometry)


def crop_warning(geometry: Geometry, what: str, mask: Image.Image | np.ndarray | None = None) -> str | None:
    """A warning when ``--fit crop`` cuts away more than 5 % of the image, or any pixel of ``mask``
    (a mask of the image's own size); None otherwise."""
    if geometry.fit != "crop":
        return None
    cut = geometry.cut_fraction()
    lost = 0
    if mask is not None:
        arr = np.asarray(mask)
        if arr.shape == (geometry.source[1], geometry.source[0]):
            left, top, right, bottom = geometry.source_box()
            kept = np.zeros(arr.shape, dtype=bool)
            kept[
                int(np.ceil(top - 1e-9)) : int(np.floor(bottom + 1e-9)),
                int(np.ceil(left - 1e-9)) : int(np.floor(right + 1e-9)),
            ] = True
            lost = int(((arr > 0) & ~kept).sum())
    if cut <= CROP_WARN_FRACTION and not lost:
        return None
    sw, sh = geometry.source
    side = "top and bottom" if sh > sw else "left and right sides"
    parts = [f"--fit crop cuts away {100 * cut:.1f}% of {what} ({sw}x{sh}: its {side})"]
    if lost:
        parts.append(f"about {lost} pixels of its mask")
    return (
        " and ".join(parts)
        + "; --fit pad or --fit native keeps the whole field of view (the default crop is the original method's)."
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
