"""Reading images and the square geometry pie works in (writing them is ``files.py``'s job).

Pure PIL/numpy: no torch, no terminal. Errors about the user's files are ``UserError``s
that name the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pie_cli.errors import UserError
from pie_cli.imaging.files import require_regular_file
from pie_cli.imaging.geometry import Geometry, fit_geometry, square_geometry

# Images are resized with Lanczos to the working resolution, for inference and for training alike:
# the sharpest of PIL's filters, what a reader of a medical image expects, and diffusers' training default.
IMAGE_RESAMPLE = Image.Resampling.LANCZOS
# Masks are resized with (antialiased) bilinear, which keeps grey levels meaning
# "partial edit strength" and the mask's mean coverage.
MASK_RESAMPLE = Image.Resampling.BILINEAR
# PIL's 16-bit greyscale modes (byte orders); "I" (32-bit) is handled beside them where it occurs.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def open_image(path: Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file, or raise a ``UserError`` naming it.

    DICOM files (``.dcm``/``.dicom``, or the ``DICM`` marker at byte 128 whatever the name) are
    read by :func:`pie_cli.imaging.dicom.read_dicom`: greyscale comes back as ``"I;16"`` (windowed,
    0..65535), colour as ``"RGB"``, and no DICOM tag comes back at all.

    16-bit greyscale PNG and TIFF come back as ``"I;16"`` scaled so that the file's declared
    maximum is 65535: the PNG ``sBIT`` chunk (a 12-bit detector's PNG saying 12 significant bits
    is scaled by 65535/4095) or the TIFF ``MaxSampleValue`` tag; without either, values are kept
    as they are, i.e. read against the full 16-bit range (a 12-bit image without ``sBIT`` looks
    dark, as it does in any viewer). Depth is kept until :func:`to_rgb8`'s one 8-bit conversion.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not an image file.")
    require_regular_file(path, what)
    from pie_cli.imaging.dicom import is_dicom

    if is_dicom(path):
        from pie_cli.imaging.dicom import read_dicom

        return read_dicom(path, what)
    try:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format != "MPO":  # an MPO (a phone's JPEG) is its first image plus extras
                raise UserError(
                    f"{what} {path} holds {frames} images (pages or frames); pie works on one 2-D image, "
                    "so save the one you want as its own file."
                )
            img.load()
            orientation = _exif_orientation(img)
            if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.format == "PNG"):
                read = _sixteen_bit(img, path)
            elif img.mode == "P":
                read = img.convert("RGBA" if "transparency" in img.info else "RGB")
            else:
                read = img.copy()
        return _orient(read, orientation)
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(
            f"{what} {path} is not an image pie can read (PNG, JPEG, TIFF, BMP, WebP, DICOM)."
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{what} {path} could not be decoded ({exc}).") from None


# EXIF orientation -> the transposition that shows the image as a viewer displays it.
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Metadata a read image does not keep (it may identify the patient or the device; outputs never carry it).
_METADATA = ("exif", "xmp", "XML:com.adobe.xmp", "comment", "photoshop", "iptc", "icc_profile")
# The EXIF orientation an image was read with (1-8), kept in the returned image's ``info``.
ORIENTATION_KEY = "pie_exif_orientation"


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError, TypeError):  # a damaged EXIF block: read as stored
        return None
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


def _orient(img: Image.Image, orientation: int | None) -> Image.Image:
    """``img`` as it is displayed: its EXIF orientation applied (phone photos of skin are often rotated).

    Every reader of pie applies it (simulate, mask, finetune, evaluate), so a mask drawn on the
    displayed image lines up; the orientation read is kept in ``img.info[ORIENTATION_KEY]``.
    """
    if orientation in _ORIENTATIONS:
        img = img.transpose(_ORIENTATIONS[orientation])
    for key in _METADATA:  # camera, GPS, author...: nothing of the file's metadata travels on
        img.info.pop(key, None)
    if orientation is not None:
        img.info[ORIENTATION_KEY] = orientation
    return img


def orientation_of(img: Image.Image) -> int | None:
    """The EXIF orientation :func:`open_image` applied to ``img`` (None when the file had none)."""
    value = img.info.get(ORIENTATION_KEY)
    return value if isinstance(value, int) else None


def _sixteen_bit(img: Image.Image, path: Path) -> Image.Image:
    """A 16-bit greyscale image as native ``"I;16"``, its declared maximum scaled to 65535."""
    arr = np.asarray(img).astype(np.float64)
    top = _declared_max(img, path)
    if top < 65535:
        arr = arr * (65535.0 / top)
    return Image.fromarray(np.clip(np.round(arr), 0, 65535).astype(np.uint16))


def _declared_max(img: Image.Image, path: Path) -> int:
    """2**sBIT - 1 (PNG), MaxSampleValue (TIFF), or 65535 when the file does not say."""
    top = 65535
    if img.format == "PNG":
        bits = _png_significant_bits(path)
        if bits is not None and 1 <= bits < 16:
            top = 2**bits - 1
    elif img.format == "TIFF":
        value = getattr(img, "tag_v2", {}).get(281)  # MaxSampleValue
        if isinstance(value, (tuple, list)):
            value = value[0] if value else None
        if isinstance(value, int) and 0 < value < 65535:
            top = value
    return top


def _png_significant_bits(path: Path) -> int | None:
    """The grey value of a PNG's sBIT chunk (significant bits), read from the chunks before IDAT."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return None
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind in (b"IDAT", b"IEND"):
                    return None
                if kind == b"sBIT":
                    data = fh.read(length)
                    return data[0] if data else None
                fh.seek(length + 4, os.SEEK_CUR)  # data + CRC
    except OSError:
        return None


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any mode (grey, 16-bit, float, alpha, palette) to 8-bit RGB.

    16-bit and integer images are scaled by their bit depth (not stretched), so an
    X-ray keeps its intensities relative to the detector range.
    """
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    return img.convert("RGB")


def fit_square(img: Image.Image, resolution: int, resample: Image.Resampling = IMAGE_RESAMPLE) -> Image.Image:
    """Resize so the short side is ``resolution``, then centre-crop to resolution x resolution."""
    new, box = square_geometry(img.size, resolution)
    if img.size != new:
        img = img.resize(new, resample=resample)
    if img.size != (resolution, resolution):
        img = img.crop(box)
    return img


def fit_to(
    img: Image.Image, geometry: Geometry, resample: Image.Resampling = IMAGE_RESAMPLE, fill: int = 0
) -> Image.Image:
    """``img`` (of ``geometry.source`` size) on the model's canvas: resized, then cropped or padded with ``fill``."""
    if img.size != geometry.source:
        raise ValueError(f"image is {img.size}, the geometry is for {geometry.source}")
    if img.size != geometry.resized:
        img = img.resize(geometry.resized, resample=resample)
    (ox, oy), (cw, ch) = geometry.offset, geometry.canvas
    if ox <= 0 and oy <= 0 and img.size[0] + ox >= cw and img.size[1] + oy >= ch:
        return img if img.size == (cw, ch) else img.crop((-ox, -oy, cw - ox, ch - oy))
    canvas = Image.new(img.mode, (cw, ch), fill)
    canvas.paste(img, (ox, oy))
    return canvas


def frame_of(canvas: Image.Image, geometry: Geometry) -> Image.Image:
    """A frame as pie writes it: the canvas without its padding (the canvas itself unless ``--fit pad``)."""
    return canvas.crop(geometry.content) if geometry.padded else canvas


def onto_canvas(frame: Image.Image, background: Image.Image, geometry: Geometry) -> Image.Image:
    """The inverse of :func:`frame_of`: ``frame`` placed on ``background``'s padding (frame 0's canvas)."""
    if not geometry.padded:
        return frame
    canvas = background.copy()
    canvas.paste(frame, geometry.content[:2])
    return canvas


def frame_image(img: Image.Image, geometry: Geometry) -> Image.Image:
    """Frame 0 as written for ``img`` under ``geometry``: 8-bit RGB, without padding."""
    return frame_of(fit_to(to_rgb8(img), geometry), geometry)


def prepare_image(img: Image.Image, resolution: int, fit: str = "crop") -> Image.Image:
    """The frame-0 canvas pie works on: 8-bit RGB in the geometry of ``fit`` (R x R unless ``native``)."""
    return fit_to(to_rgb8(img), fit_geometry(img.size, resolution, fit))


def require_opaque(img: Image.Image, path: Path | str, what: str = "image") -> None:
    """Refuse an image with transparent pixels: what lies under them is not in the file, so any
    flattening pie chose would be a guess (flatten it yourself onto the background you mean)."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min(initial=255) < 255:
            raise UserError(
                f"{what} {path} has transparent pixels; pie needs an opaque image (flatten it onto its background first)."
            )
