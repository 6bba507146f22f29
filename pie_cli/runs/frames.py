"""Reading a run's frames back: ``frame_NNN.png`` in numeric order, and its ``mask.png``.

Used by ``pie export-gif`` and ``pie evaluate``; explicit frame files are accepted beside
run folders. PIL/numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.animation import SourceFrame
from pie_cli.imaging.masks import mask_to_grey
from pie_cli.imaging.media import open_image
from pie_cli.runs.manifest import MASK

FRAME_FILE = re.compile(r"^frame_(\d+)\.png$")


def collect(inputs: Sequence[Path]) -> tuple[list[SourceFrame], Path | None]:
    """Frames from run directories (``frame_NNN.png`` in numeric order) and/or explicit files.

    Returns the frames and the ``mask.png`` of the first run directory, if it has one.
    """
    frames: list[SourceFrame] = []
    mask = None
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            try:
                found = sorted(
                    (int(m.group(1)), p)
                    for p in item.iterdir()
                    if (m := FRAME_FILE.match(p.name)) and p.is_file()
                )
            except PermissionError:
                raise UserError(f"{item} is not readable (check its permissions).") from None
            if not found:
                raise UserError(f"{item} has no frame_NNN.png files (is it a `pie simulate` run directory?).")
            frames.extend(SourceFrame(i, p) for i, p in found)
            if mask is None and (item / MASK).is_file():
                mask = item / MASK
        elif item.exists():
            m = FRAME_FILE.match(item.name)
            frames.append(SourceFrame(int(m.group(1)) if m else len(frames), item))
        else:
            raise UserError(f"{item} does not exist.")
    if not frames:
        raise UserError("no frames given; pass a run directory or frame files.")
    return frames, mask


def load(frames: Sequence[SourceFrame]) -> list[Image.Image]:
    """The frames as 8-bit RGB images, all of one size (or a ``UserError`` naming the odd one)."""
    images = [open_image(f.path, "frame").convert("RGB") for f in frames]
    first = images[0].size
    for f, img in zip(frames, images, strict=True):
        if img.size != first:
            raise UserError(
                f"frame {f.path} is {img.width}x{img.height} but {frames[0].path} is {first[0]}x{first[1]}; "
                "frames of one animation must have one size."
            )
    return images


def load_mask(path: Path, frames: Sequence[Image.Image]) -> np.ndarray:
    """A run's mask as 8-bit grey values, refused unless it has the frames' size."""
    mask = np.asarray(mask_to_grey(open_image(path, "mask"), path))
    if mask.shape[::-1] != frames[0].size:
        raise UserError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but the frames are "
            f"{frames[0].width}x{frames[0].height}."
        )
    return mask
