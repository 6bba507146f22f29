"""Report-image pairs from the formats our users have, as (image, prompt) records.

The dataset formats (``--data-format``, detected when ``auto``) are one table in ``formats.py``:
image folders with ``metadata.jsonl``/``.csv``, CSV/JSONL tables, Hugging Face datasets, CheXpert,
HAM10000 and EyePACS. This module holds what they share: records, prompts, the image checks.

Prompts are ``--prompt-template`` (default ``"{instance}, {labels}"``) filled with the instance
prompt, the labels text (positive findings joined with commas, as in the original work, or the
caption column) and any column of the row. No torch here: ``--dry-run`` stays fast.

``--loss-mask data`` takes each image's mask from a mask column (``--mask-column``, default ``mask``,
``mask_file`` or ``mask_path``) of a folder's metadata or a CSV/JSONL table: a file inside the data
folder, of its image's size, binary (above 0 = weighted: 1-bit, 8-bit or 16-bit grey, or grey stored
as RGB; colour and transparency refused). ``--loss-mask lungs`` runs ``imaging.auto_masks``' lung
heuristic once per image (:func:`find_lungs`); an image where it finds no lungs trains with full
weight, and is counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError
from pie_cli.training.config import TrainSpec

TEXT_COLUMNS = ("text", "caption", "report", "prompt", "impression", "findings", "label", "labels")
IMAGE_COLUMNS = ("file_name", "image", "path", "filepath", "image_path", "filename", "file")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom")
MASK_COLUMNS = ("mask", "mask_file", "mask_path")
# The formats whose tables can name a mask per image (--loss-mask data).
MASK_FORMATS = ("folder", "csv", "jsonl")
# --loss-mask lungs is refused for these: they hold no chest X-rays.
NOT_CHEST = {"ham10000": "dermoscopic", "eyepacs": "fundus"}
# --loss-mask lungs: the heuristic runs on the image with its short side brought down to this. The loss
# pools the mask to the latent grid (64 cells at 512 px), and the heuristic's kernels scale with the size.
LUNG_MASK_SIDE = 256
# Mask modes read without decoding the pixels; others (palette, RGB, alpha...) are decoded and checked.
_GREY_MODES = ("1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class Record:
    """One training example: an image file (or a row of a datasets table) and its prompt."""

    image: Path | int
    prompt: str
    where: str  # "metadata.csv row 7", for error messages
    mask: Path | None = None  # --loss-mask data: its mask file, inside the data folder


@dataclass(frozen=True)
class AutoMask:
    """``--loss-mask lungs`` for one image: the lung heuristic's mask at a reduced size (or None where
    it found no lungs: the image then trains with full weight)."""

    source: tuple[int, int]  # the image's (width, height)
    size: tuple[int, int]  # the mask's (width, height): the image's with its short side LUNG_MASK_SIDE
    bits: bytes | None  # numpy.packbits of the boolean mask, rows first

    def image(self):
        """The mask as a PIL "L" image (255 = lungs) of ``size``, or None where the heuristic failed."""
        if self.bits is None:
            return None
        import numpy as np
        from PIL import Image

        w, h = self.size
        flat = np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8), count=w * h)
        return Image.fromarray((flat.reshape(h, w) * 255).astype(np.uint8), mode="L")


@dataclass
class TrainingData:
    records: list[Record]
    format: str
    source: str
    dataset: Any = None  # a datasets.Dataset when format == "hf"
    image_column: str | None = None
    skipped: int = 0  # rows left out by a filter (e.g. CheXpert lateral views)
    notes: tuple[str, ...] = ()  # what a person should hear about the data (MIMIC-CXR's prompt fallbacks)
    # Caches of the records above (not copied by dataclasses.replace, which may change the records):
    # every image's (width, height) from its header (check_images, image_sizes), --buckets' plan
    # (buckets.plan_buckets), --loss-mask lungs' masks (dataset.compute_lung_masks).
    sizes: list[tuple[int, int]] | None = field(default=None, init=False, repr=False, compare=False)
    buckets: Any = field(default=None, init=False, repr=False, compare=False)
    lung_masks: dict[Record, AutoMask] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def lung_mask_failures(self) -> int:
        """Images where --loss-mask lungs found no lungs (they train with full weight)."""
        return sum(m.bits is None for m in (self.lung_masks or {}).values())

    def open(self, record: Record):
        """The record's image as a PIL image (decoded)."""
        if isinstance(record.image, Path):
            from pie_cli.imaging.media import open_image

            return open_image(record.image, f"image ({record.where})")
        return self.dataset[record.image][self.image_column]

    def open_mask(self, record: Record):
        """The record's --loss-mask data mask as a PIL "L" image (255 = weighted, 0 = not), decoded."""
        import numpy as np
        from PIL import Image

        from pie_cli.imaging.media import open_image

        path = record.mask
        if path is None:
            raise ValueError(f"{record.where} has no mask")
        region = mask_region(open_image(path, f"mask ({record.where})"), f"mask {path} ({record.where})")
        return Image.fromarray(np.where(region, 255, 0).astype(np.uint8), mode="L")


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
    _check_loss_mask(spec, fmt)
    result = FORMATS[fmt].read(spec, data, path)
    if spec.max_samples is not None:
        result.records = result.records[: spec.max_samples]
    if not result.records:
        raise UserError(
            f"--data {data} holds no training examples{' after the view filter' if result.skipped else ''}."
        )
    return result


def _check_loss_mask(spec: TrainSpec, fmt: str) -> None:
    """--loss-mask against the data format: masks need a table naming them; lungs need chest X-rays."""
    if spec.loss_mask == "data" and fmt not in MASK_FORMATS:
        raise UserError(
            f"--loss-mask data reads each image's mask from a mask column, which --data-format {fmt} has not; "
            "use a folder, CSV or JSONL table with a mask column"
            + (", or --loss-mask lungs." if fmt not in NOT_CHEST else ".")
        )
    if spec.loss_mask == "lungs" and fmt in NOT_CHEST:
        raise UserError(
            f"--loss-mask lungs finds the lungs of chest X-rays; --data-format {fmt} holds {NOT_CHEST[fmt]} "
            "images (give their masks with --loss-mask data in a folder, CSV or JSONL table)."
        )


def check_images(data: TrainingData, progress: Callable[[int, int], None] | None = None) -> None:
    """Every image file exists and has a readable header; the first bad one is named with its row.

    So does every --loss-mask data mask, which must also have its image's size and be grey or binary.
    The images' sizes (as displayed: EXIF orientation applied) are kept in ``data.sizes``.
    """
    if data.format == "hf":
        return
    sizes = []
    for k, record in enumerate(data.records):
        what = f"image ({record.where})"
        size, _ = _check_file(record.image, f"image {record.image} ({record.where})", what)
        sizes.append(size)
        if record.mask is not None:
            _check_mask(record, size)
        if progress is not None:
            progress(k + 1, len(data.records))
    data.sizes = sizes


def _check_file(path: Any, name: str, what: str) -> tuple[tuple[int, int], str | None]:
    """(size as displayed, PIL mode; None for DICOM) of an image file whose header (and end) is readable.

    ``name`` is ``"image PATH (ROW)"`` for the messages, ``what`` ``"image (ROW)"``. Files with
    transparency or several pages are decoded to be checked, like simulate: never guess under them.
    """
    from PIL import Image, UnidentifiedImageError

    from pie_cli.imaging.dicom import check_dicom, is_dicom
    from pie_cli.imaging.files import require_regular_file

    if isinstance(path, Path) and path.exists():
        require_regular_file(path, what)
    if isinstance(path, Path) and path.is_file() and is_dicom(path):
        return check_dicom(path, what), None  # header only, like PIL's check below
    try:
        with Image.open(path) as img:
            size = displayed_size(img)
            _check_complete(img, path)
            mode = img.mode
            alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            pages = getattr(img, "n_frames", 1) > 1 and img.format != "MPO"
    except FileNotFoundError:
        raise UserError(f"{name} does not exist.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        reason = "not an image pie can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise UserError(f"{name} cannot be read: {reason}.") from None
    if alpha or pages:
        from pie_cli.imaging.media import open_image, require_opaque

        require_opaque(open_image(path, what), path, what)
    return size, mode


def _header_size(path: Any, name: str, what: str) -> tuple[int, int]:
    """(width, height) as displayed from an image file's header alone (``--dry-run``'s buckets)."""
    from PIL import Image, UnidentifiedImageError

    from pie_cli.imaging.dicom import check_dicom, is_dicom
    from pie_cli.imaging.files import require_regular_file

    if isinstance(path, Path) and path.exists():
        require_regular_file(path, what)
        if is_dicom(path):
            return check_dicom(path, what)
    try:
        with Image.open(path) as img:
            return displayed_size(img)
    except FileNotFoundError:
        raise UserError(f"{name} does not exist.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        reason = "not an image pie can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise UserError(f"{name} cannot be read: {reason}.") from None


def _check_mask(record: Record, image_size: tuple[int, int]) -> None:
    """A --loss-mask data mask: a readable file of its image's size, grey or binary."""
    from pie_cli.imaging.media import open_image

    path = record.mask
    assert path is not None
    name, what = f"mask {path} ({record.where})", f"mask ({record.where})"
    size, mode = _check_file(path, name, what)
    if size != image_size:
        raise UserError(
            f"{name} is {size[0]}x{size[1]} but its image {record.image} is {image_size[0]}x{image_size[1]}; "
            "a loss mask must have its image's size."
        )
    if mode not in _GREY_MODES:  # DICOM, palette, RGB, alpha...: decoded and read as training reads it
        mask_region(open_image(path, what), name)


def mask_region(img: Any, name: str):
    """A loss mask image -> boolean array (True = weighted: every value above 0), or a ``UserError``.

    1-bit, 8-bit, 16-bit, 32-bit and float grey, and grey stored as RGB, are read; colour, transparency
    and other modes are refused: a loss mask is grey or binary.
    """
    import numpy as np

    mode = img.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        if np.asarray(img.getchannel("A")).min(initial=255) < 255:
            raise UserError(f"{name} has transparent pixels; a loss mask is an opaque grey or binary image.")
        img = img.convert("RGB" if mode.startswith("RGB") else "L")
    if img.mode == "P":
        img = img.convert("RGB")
    if img.mode in _GREY_MODES:
        return np.asarray(img) > 0
    if img.mode == "RGB":
        rgb = np.asarray(img)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise UserError(f"{name} is a colour image; a loss mask is grey or binary (above 0 = weighted).")
        return rgb[..., 0] > 0
    raise UserError(f"{name} is a {img.mode} image; a loss mask is grey or binary (above 0 = weighted).")


def displayed_size(img: Any) -> tuple[int, int]:
    """(width, height) of a lazily opened PIL image as ``open_image`` returns it (EXIF orientation
    applied), without decoding its pixels. A PNG's EXIF is read only from the chunks before its pixel
    data (PIL would decode the image to look for one after them)."""
    from pie_cli.imaging.media import _exif_orientation

    w, h = img.size
    if img.format == "PNG" and "exif" not in img.info:
        return w, h
    return (h, w) if _exif_orientation(img) in (5, 6, 7, 8) else (w, h)


def image_sizes(data: TrainingData) -> list[tuple[int, int]]:
    """Every record's image (width, height) as displayed, from the headers (cached in ``data.sizes``).

    Files: PIL's lazy open or the DICOM header. Hugging Face datasets: the stored bytes, opened
    lazily (the Image column read undecoded; its EXIF orientation applied, as ``datasets`` does).
    """
    if data.sizes is not None and len(data.sizes) == len(data.records):
        return data.sizes
    if data.format == "hf":
        sizes = _hf_sizes(data)
    else:
        sizes = [
            _header_size(r.image, f"image {r.image} ({r.where})", f"image ({r.where})") for r in data.records
        ]
    data.sizes = sizes
    return sizes


def _hf_sizes(data: TrainingData) -> list[tuple[int, int]]:
    import io

    from PIL import Image

    feature = data.dataset.features.get(data.image_column)
    if type(feature).__name__ != "Image":  # not an Image column: its values are decoded to be measured
        return [data.open(r).size for r in data.records]
    import datasets

    raw = data.dataset.cast_column(data.image_column, datasets.Image(decode=False))
    sizes = []
    for record in data.records:
        value = raw[record.image][data.image_column]
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        try:
            with Image.open(source) as img:
                sizes.append(displayed_size(img))  # datasets' decoding applies the EXIF orientation too
        except (OSError, ValueError, SyntaxError) as exc:
            raise UserError(f"image of {record.where} cannot be read ({exc}).") from None
    return sizes


def find_lungs(data: TrainingData, record: Record) -> AutoMask:
    """--loss-mask lungs for ``record``: ``auto_masks``' lung heuristic on its image, with the short
    side brought down to LUNG_MASK_SIDE (deterministic: a function of the image alone)."""
    import numpy as np

    from pie_cli.imaging.auto_masks import HeuristicFailed, auto_mask
    from pie_cli.imaging.media import IMAGE_RESAMPLE, to_rgb8

    img = data.open(record)
    w, h = img.size
    grey = to_rgb8(img).convert("L")
    scale = LUNG_MASK_SIDE / min(w, h)
    if scale < 1:
        grey = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), IMAGE_RESAMPLE)
    try:
        region = auto_mask(np.asarray(grey), "lungs")
    except HeuristicFailed:
        return AutoMask((w, h), grey.size, None)
    return AutoMask((w, h), grey.size, np.packbits(region).tobytes())


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
