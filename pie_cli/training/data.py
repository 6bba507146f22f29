"""Report-image pairs from the formats our users have, as (image, prompt) records.

The dataset formats (``--data-format``, detected when ``auto``) are one table in ``formats.py``:
image folders with ``metadata.jsonl``/``.csv``, CSV/JSONL tables, Hugging Face datasets, CheXpert,
HAM10000 and EyePACS. This module holds what they share: records, prompts, the image checks.

Prompts are ``--prompt-template`` (default ``"{instance}, {labels}"``) filled with the instance
prompt, the labels text (positive findings joined with commas, as in the original work, or the
caption column) and any column of the row. No torch here: ``--dry-run`` stays fast.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError
from pie_cli.training.config import TrainSpec

TEXT_COLUMNS = ("text", "caption", "report", "prompt", "impression", "findings", "label", "labels")
IMAGE_COLUMNS = ("file_name", "image", "path", "filepath", "image_path", "filename", "file")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom")


@dataclass(frozen=True)
class Record:
    """One training example: an image file (or a row of a datasets table) and its prompt."""

    image: Path | int
    prompt: str
    where: str  # "metadata.csv row 7", for error messages


@dataclass
class TrainingData:
    records: list[Record]
    format: str
    source: str
    dataset: Any = None  # a datasets.Dataset when format == "hf"
    image_column: str | None = None
    skipped: int = 0  # rows left out by a filter (e.g. CheXpert lateral views)

    def open(self, record: Record):
        """The record's image as a PIL image (decoded)."""
        if isinstance(record.image, Path):
            from pie_cli.imaging.media import open_image

            return open_image(record.image, f"image ({record.where})")
        return self.dataset[record.image][self.image_column]


# --------------------------------------------------------------------------- helpers


def render_prompt(template: str, fields: dict[str, Any], where: str) -> str:
    try:
        text = template.format_map(fields)
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join("{" + k + "}" for k in ("instance", "labels", "caption"))
        raise UserError(
            f"--prompt-template {template!r} cannot be filled for {where} ({exc}); use {known} or a column name."
        ) from None
    text = re.sub(r"(\s*,\s*){2,}", ", ", text)
    return re.sub(r"^[\s,]+|[\s,]+$", "", text)


def load_data(spec: TrainSpec) -> TrainingData:
    """Read ``--data`` into records (prompts rendered), without decoding any image."""
    from pie_cli.training.formats import FORMATS, detect_format

    data = spec.data or ""
    path = Path(data).expanduser()
    fmt = spec.data_format
    if fmt == "auto":
        if not path.exists():
            if re.match(r"^[\w.-]+(/[\w.-]+)?$", data) and "/" in data:
                fmt = "hf"
            else:
                raise UserError(f"--data {data} does not exist.")
        else:
            fmt = detect_format(path)
    elif fmt != "hf" and not path.exists():
        raise UserError(f"--data {data} does not exist.")
    result = FORMATS[fmt].read(spec, data, path)
    if spec.max_samples is not None:
        result.records = result.records[: spec.max_samples]
    if not result.records:
        raise UserError(
            f"--data {data} holds no training examples{' after the view filter' if result.skipped else ''}."
        )
    return result


def check_images(data: TrainingData, progress: Callable[[int, int], None] | None = None) -> None:
    """Every image file exists and has a readable header; the first bad one is named with its row."""
    from PIL import Image, UnidentifiedImageError

    from pie_cli.imaging.dicom import check_dicom, is_dicom

    if data.format == "hf":
        return
    from pie_cli.imaging.files import require_regular_file

    for k, record in enumerate(data.records):
        path = record.image
        if isinstance(path, Path) and path.exists():
            require_regular_file(path, f"image ({record.where})")
        if isinstance(path, Path) and path.is_file() and is_dicom(path):
            check_dicom(path, f"image ({record.where})")  # header only, like PIL's check below
            if progress is not None:
                progress(k + 1, len(data.records))
            continue
        try:
            with Image.open(path) as img:
                _check_complete(img, path)
                alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
                pages = getattr(img, "n_frames", 1) > 1 and img.format != "MPO"
        except FileNotFoundError:
            raise UserError(f"image {path} ({record.where}) does not exist.") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            reason = "not an image pie can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
            raise UserError(f"image {path} ({record.where}) cannot be read: {reason}.") from None
        if alpha or pages:  # only these few are decoded here: like simulate, never guess under transparency
            from pie_cli.imaging.media import open_image, require_opaque

            require_opaque(open_image(path, f"image ({record.where})"), path, f"image ({record.where})")
        if progress is not None:
            progress(k + 1, len(data.records))


def _check_complete(img: Any, path: Path) -> None:
    """A cheap whole-file check without decoding pixels: truncated files fail before training starts.

    PNG: every chunk's CRC up to IEND (``verify``, I/O only). JPEG: the end-of-image marker
    must be in the last KiB. Other formats: the header only.
    """
    if img.format == "PNG":
        img.verify()
    elif img.format == "JPEG":
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 1024))
            if b"\xff\xd9" not in fh.read():
                raise OSError("the file is truncated (no JPEG end-of-image marker)")


def class_records(spec: TrainSpec) -> list[Record]:
    """Prior-preservation images: every image in ``--class-data``, captioned with ``--class-prompt``."""
    folder = Path(spec.class_data or "")
    if not folder.is_dir():
        raise UserError(f"--class-data {folder} is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"--class-data {folder} holds no images.")
    return [Record(p, spec.class_prompt or "", f"--class-data {p.name}") for p in files]
