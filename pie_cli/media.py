"""Reading images, the square geometry pie works in, and writing PNG/GIF files atomically.

Pure PIL/numpy: no torch, no terminal. Errors about the user's files are ``UserError``s
that name the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pie_cli.errors import UserError

# Frames are resized with Lanczos when shrinking/enlarging to the working resolution:
# the sharpest of PIL's filters, and what a reader of a medical image expects.
IMAGE_RESAMPLE = Image.Resampling.LANCZOS
# Masks are resized with (antialiased) bilinear, which keeps grey levels meaning
# "partial edit strength" and the mask's mean coverage.
MASK_RESAMPLE = Image.Resampling.BILINEAR


def open_image(path: Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file, or raise a ``UserError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not an image file.")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {path} is not readable (check its permissions).")
    try:
        with Image.open(path) as img:
            img.load()
            return (
                img.copy()
                if img.mode != "P"
                else img.convert("RGBA" if "transparency" in img.info else "RGB")
            )
    except UnidentifiedImageError:
        raise UserError(f"{what} {path} is not an image pie can read (PNG, JPEG, TIFF, BMP, WebP).") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{what} {path} could not be decoded ({exc}).") from None


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any mode (grey, 16-bit, float, alpha, palette) to 8-bit RGB.

    16-bit and integer images are scaled by their bit depth (not stretched), so an
    X-ray keeps its intensities relative to the detector range.
    """
    if img.mode == "RGB":
        return img
    if img.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
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


def fit_square(img: Image.Image, resolution: int, resample: Image.Resampling = IMAGE_RESAMPLE) -> Image.Image:
    """Resize so the short side is ``resolution``, then centre-crop to resolution x resolution."""
    new, box = square_geometry(img.size, resolution)
    if img.size != new:
        img = img.resize(new, resample=resample)
    if img.size != (resolution, resolution):
        img = img.crop(box)
    return img


def prepare_image(img: Image.Image, resolution: int) -> Image.Image:
    """The frame-0 image pie works on: 8-bit RGB, resolution x resolution."""
    return fit_square(to_rgb8(img), resolution)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_png(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
