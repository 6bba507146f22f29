"""DICOM input: one 2-D image out of a DICOM file, as pixels only.

``read_dicom`` turns a single-frame DICOM file into a PIL image the rest of pie already
understands (``pie_cli.imaging.media.open_image`` calls it for every command that opens images):

- greyscale (MONOCHROME1/2): stored values -> Modality LUT or Rescale Slope/Intercept -> the
  first VOI LUT if the file has one, else the first Window Center/Width (LINEAR, LINEAR_EXACT
  or SIGMOID, as the file says), else the image's own min..max -> 0..1, all in float64;
  MONOCHROME1 is then inverted so that bone is bright, as in MONOCHROME2. The result is a
  mode ``"I;16"`` image scaled to 0..65535, so the single 8-bit conversion happens later in
  ``media.to_rgb8`` (which divides I;16 by 65535);
- colour (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR through its LUT): 8-bit
  ``"RGB"`` (16-bit samples scaled by their Bits Stored).

Detection (``is_dicom``): the ``.dcm``/``.dicom`` extension, any case, or the ``DICM`` marker
at byte 128 (PACS exports often have no extension). Multi-frame files are refused: pie works
on one 2-D image.

Privacy: only the image-pixel, modality-LUT and VOI-LUT attributes are read from a file
(``dcmread(specific_tags=...)``); patient, study, date and institution attributes are never
decoded, so no DICOM tag can be logged, put into an exception message, returned or written to
a run directory. pydicom's own warnings and log records are silenced while a file is read,
and no error message quotes a value from the file: they name the file, and at most the
transfer syntax, the photometric interpretation or the number of frames.

Errors are ``UserError``s, one sentence naming the file. pydicom is imported lazily (inside
the functions) so ``pie --help`` stays fast; no torch here.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pie_cli.errors import UserError

DICOM_SUFFIXES = (".dcm", ".dicom")
MAGIC_OFFSET = 128
MAGIC = b"DICM"

GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT")
PALETTE = "PALETTE COLOR"

# The only attributes ever read from a file: what pydicom needs to decode the pixels, plus
# the Modality LUT and VOI LUT modules. Nothing that identifies a patient or a study.
PIXEL_TAGS = [
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
]
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
UNDEFINED_LENGTH = 0xFFFFFFFF

# pip packages that provide a decoder, by transfer syntax UID prefix (pydicom's plugins).
_JPEG = "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_JPEG2000 = "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": _JPEG,
    "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG,
    "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)",
    "1.2.840.10008.1.2.4.90": _JPEG2000,
    "1.2.840.10008.1.2.4.91": _JPEG2000,
    "1.2.840.10008.1.2.4.92": _JPEG2000,
    "1.2.840.10008.1.2.4.93": _JPEG2000,
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


def has_dicom_magic(path: Path) -> bool:
    """Whether ``path`` has the DICOM Part 10 marker ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            fh.seek(MAGIC_OFFSET)
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def is_dicom(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` file (any case), or any file with the ``DICM`` marker at byte 128."""
    path = Path(path)
    return path.suffix.lower() in DICOM_SUFFIXES or (path.is_file() and has_dicom_magic(path))


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """No pydicom warning or log record while a file is read: they may quote a tag's value."""
    logger = logging.getLogger("pydicom")
    disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _read(path: Path, name: str, *, defer: bool = False) -> Any:
    """The file's pixel-related attributes as a pydicom Dataset (nothing else is decoded)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    magic = has_dicom_magic(path)
    kwargs: dict[str, Any] = {"specific_tags": PIXEL_TAGS}
    if defer:
        kwargs["defer_size"] = 1024
    try:
        with _quiet_pydicom():
            # force=True only for a .dcm file without the Part 10 preamble (an old or raw
            # dataset); anything that then does not parse as one is not DICOM.
            ds = pydicom.dcmread(path, force=not magic, **kwargs)
    except InvalidDicomError:
        raise UserError(f"{name} is not a DICOM file (no 'DICM' marker at byte 128).") from None
    except (EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError):
        if magic:
            raise UserError(
                f"{name} is a damaged or truncated DICOM file (its header cannot be read)."
            ) from None
        raise UserError(f"{name} is not a DICOM file (no 'DICM' marker at byte 128).") from None
    if not magic and not ("Rows" in ds and any(k in ds for k in PIXEL_DATA_KEYWORDS)):
        raise UserError(f"{name} is not a DICOM file (no 'DICM' marker at byte 128).")
    if "TransferSyntaxUID" not in ds.file_meta:
        # A dataset without file meta information: say what pydicom found it to be encoded as.
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is None or little is None:
            raise UserError(
                f"{name} is a DICOM file without a transfer syntax; pie cannot decode its pixels."
            )
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _pixel_keyword(ds: Any) -> str | None:
    return next((k for k in PIXEL_DATA_KEYWORDS if k in ds), None)


def _check(ds: Any, path: Path, name: str) -> str:
    """Refuse what pie cannot read, before decoding; returns the photometric interpretation."""
    keyword = _pixel_keyword(ds)
    if keyword is None or "Rows" not in ds or "Columns" not in ds:
        raise UserError(
            f"{name} has no pixel data (it is a DICOM file without an image, such as a report, or it is truncated)."
        )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise UserError(
            f"{name} is a multi-frame DICOM file ({frames} frames); pie works on one 2-D image, "
            "so export the frame you want as its own file."
        )
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if photometric not in GREY + COLOUR + (PALETTE,):
        raise UserError(
            f"{name} has DICOM photometric interpretation {photometric!r}, which pie cannot read "
            f"(it reads {', '.join(GREY + COLOUR)} and {PALETTE})."
        )
    tsyntax = ds.file_meta.TransferSyntaxUID
    if tsyntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise UserError(
                f"{name} is compressed with {tsyntax.name} ({tsyntax}), which pydicom cannot decode."
            ) from None
        if not decoder.is_available:
            packages = DECODER_PACKAGES.get(str(tsyntax), "python-gdcm")
            raise UserError(
                f"{name} is compressed with {tsyntax.name} ({tsyntax}) and no decoder for it is installed; "
                f"install one with `pip install {packages}`."
            )
    raw = ds.get_item(keyword, keep_deferred=True)
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if tsyntax.is_deflated:
        pass  # offsets count the inflated stream, not the file: pydicom's own read checks the length
    elif length is not None and tell is not None and length != UNDEFINED_LENGTH:
        if tell + length > os.path.getsize(path):
            raise UserError(f"{name} is a truncated DICOM file (its pixel data ends early).")
    elif keyword == "PixelData" and not tsyntax.is_compressed:
        expected = _native_length(ds)
        if expected is not None and len(ds.PixelData) < expected:
            raise UserError(f"{name} is a truncated DICOM file (its pixel data ends early).")
    return photometric


def _missing_decoders(tsyntax: Any) -> str | None:
    """The pip packages of pydicom's decoders for ``tsyntax`` that are not installed, or None."""
    if not tsyntax.is_compressed:
        return None
    try:
        from pydicom.pixels import get_decoder

        missing = get_decoder(tsyntax).missing_dependencies
    except (NotImplementedError, AttributeError, ValueError):
        return None
    if not missing:
        return None
    return DECODER_PACKAGES.get(str(tsyntax), "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)")


def _native_length(ds: Any) -> int | None:
    try:
        bits = int(ds.BitsAllocated)
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return (pixels * bits + 7) // 8


def check_dicom(path: Path, what: str = "image") -> tuple[int, int]:
    """Cheap header check (pixels are not decoded): (width, height), or a ``UserError`` naming the file."""
    path = Path(path)
    name = f"{what} {path}"
    ds = _read(path, name, defer=True)
    _check(ds, path, name)
    return int(ds.Columns), int(ds.Rows)


def read_dicom(path: Path, what: str = "image") -> Image.Image:
    """The file's one 2-D image: mode ``"I;16"`` (greyscale, 0..65535) or ``"RGB"`` (colour).

    Nothing but pixels comes back; see the module docstring for the pipeline and privacy.
    """
    path = Path(path)
    name = f"{what} {path}"
    ds = _read(path, name)
    photometric = _check(ds, path, name)
    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        with _quiet_pydicom():
            arr = ds.pixel_array
    except MemoryError:
        raise
    except Exception:
        missing = _missing_decoders(tsyntax)
        if missing:
            bits = ds.get("BitsStored")
            depth = f" {bits}-bit" if bits else ""
            raise UserError(
                f"{name}: its{depth} {tsyntax.name} pixel data needs a decoder that is not installed "
                f"(the installed one cannot read it); install one with `pip install {missing}`."
            ) from None
        raise UserError(
            f"{name}: its DICOM pixel data ({tsyntax.name}) could not be decoded; the file may be damaged or truncated."
        ) from None
    try:
        with _quiet_pydicom():
            if photometric in GREY:
                return Image.fromarray(grey_to_uint16(arr, ds, invert=photometric == "MONOCHROME1"))
            if photometric == PALETTE:
                from pydicom.pixels import apply_color_lut

                arr = apply_color_lut(arr, ds)
            return Image.fromarray(colour_to_uint8(arr, ds))
    except UserError:
        raise
    except BlankWindow as exc:
        raise UserError(
            f"{name}: {exc} (all its pixels lie outside the window), so the image would be blank; "
            "correct the file's Window Center/Width or VOI LUT, or export it with a window that shows the anatomy."
        ) from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError):
        raise UserError(
            f"{name}: its DICOM pixel values cannot be mapped to an image (unusual LUT or pixel layout)."
        ) from None


# --------------------------------------------------------------------------- pixel pipeline


class BlankWindow(ValueError):
    """The file's own windowing leaves nothing to see: every pixel lies outside the window."""


def grey_to_uint16(arr: np.ndarray, ds: Any, *, invert: bool = False) -> np.ndarray:
    """Stored values -> modality -> VOI (LUT, window or min..max) -> 0..65535 uint16, inverted if asked."""
    from pydicom.pixels import apply_modality_lut

    if arr.ndim != 2:
        raise ValueError("not a 2-D greyscale image")
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    unit = voi_to_unit(values, ds)
    if (
        unit.size
        and float(np.ptp(unit)) == 0.0
        and np.isfinite(values).any()
        and np.ptp(values[np.isfinite(values)]) > 0
    ):
        raise BlankWindow("its own VOI (window or LUT) maps every pixel to one grey")
    if invert:
        unit = 1.0 - unit
    return np.round(np.clip(unit, 0.0, 1.0) * 65535.0).astype(np.uint16)


def voi_to_unit(values: np.ndarray, ds: Any) -> np.ndarray:
    """Modality values -> 0..1: the first VOI LUT, else the first window, else min..max."""
    unit = _voi_lut(values, ds)
    if unit is None:
        unit = _window(values, ds)
    if unit is None:
        unit = _min_max(values)
    return unit


def _voi_lut(values: np.ndarray, ds: Any) -> np.ndarray | None:
    """The first VOI LUT, its output scaled by the LUT's own range (declared LUT depths are often wrong)."""
    from pydicom.pixels import apply_voi

    if not ds.get("VOILUTSequence"):
        return None
    try:
        descriptor = [int(v) for v in ds.VOILUTSequence[0].LUTDescriptor]
        entries = descriptor[0] or 65536
        first = descriptor[1]
        if first >= 32768 and int(ds.get("PixelRepresentation") or 0) == 1:
            first -= 65536  # a signed first mapped value stored as US
        lut = np.asarray(apply_voi(np.arange(first, first + entries, dtype=np.int64), ds), dtype=np.float64)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, NotImplementedError):
        return None
    lo, hi = float(lut.min()), float(lut.max())
    if not hi > lo:
        return None
    index = np.clip(np.rint(np.nan_to_num(values)) - first, 0, entries - 1).astype(np.int64)
    return (lut[index] - lo) / (hi - lo)


def _window(values: np.ndarray, ds: Any) -> np.ndarray | None:
    """The first Window Center/Width through pydicom's windowing, onto 0..1."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    # A dataset holding only the window, so pydicom's output range is exactly 0..65535
    # whatever the file's bit depth and rescale.
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"
    window.BitsStored = 16
    window.PixelRepresentation = 0
    window.WindowCenter = ds.WindowCenter
    window.WindowWidth = ds.WindowWidth
    if "VOILUTFunction" in ds:
        window.VOILUTFunction = ds.VOILUTFunction
    try:
        out = apply_windowing(values.copy(), window, index=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None  # e.g. a width below 1: fall back to min..max
    return np.asarray(out, dtype=np.float64) / 65535.0


def _min_max(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if not hi > lo:
        return np.zeros(values.shape)
    return np.where(finite, (values - lo) / (hi - lo), 0.0)


def colour_to_uint8(arr: np.ndarray, ds: Any) -> np.ndarray:
    """An RGB array (rows, cols, 3) of any integer depth -> uint8."""
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError("not a 2-D RGB image")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        top = 1.0 if float(np.nanmax(arr)) <= 1.0 else 255.0
    elif arr.dtype.itemsize > 1:
        stored = int(ds.get("BitsStored") or 8 * arr.dtype.itemsize)
        top = float(2 ** min(stored, 8 * arr.dtype.itemsize) - 1)
        if str(ds.get("PhotometricInterpretation") or "").upper() == PALETTE:
            top = 65535.0  # a 16-bit palette's entries span 0..65535
    else:
        top = 255.0
    return np.clip(np.round(arr.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)
