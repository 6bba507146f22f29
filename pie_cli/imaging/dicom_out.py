"""Frames as a DICOM Secondary Capture series: ``pie export-gif RUN --format dicom --out DIR``.

One file per frame (``frame_000.dcm`` ... in the frames' order), all of one new Series in one
new Study (UIDs made fresh by each export), Secondary Capture Image Storage in Explicit VR Little
Endian with a preamble and file meta, so a PACS or viewer takes the folder as it is.

What a file holds is made here from nothing but the frame's pixels, the time and pie's version:
no attribute is copied from the input image, the run's manifest or any path (file and folder
names often carry a patient's name). The patient attributes are fixed synthetic values, and
every frame says it is synthetic three times: the series description, ``BurnedInAnnotation``
with a "SYNTHETIC" label burnt into its bottom-right corner, and the derivation description.

Pixels stay as the run wrote them: 8-bit grey (mode ``L``, or RGB whose channels are equal in
every frame) is MONOCHROME2 8-bit, real colour is RGB 8-bit, 16-bit grey (``I;16``) is MONOCHROME2
16-bit. ``DIR`` is the series: it is created, or must be empty, or (with ``--overwrite``) hold only
frames pie wrote there (its ledger says so); every file is written to a temporary name first and
all are renamed together. pydicom is imported inside the functions that write (no torch here).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.files import TEMP_NAME, check_out_dir, write_together

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
SERIES_DESCRIPTION = "SYNTHETIC - research simulation"
PATIENT_NAME = "SYNTHETIC^PIE"  # fixed: never a patient's, the same for every export
PATIENT_ID = "PIE-SYNTHETIC"
SERIES_FILE = re.compile(r"^frame_(\d{3,})\.dcm$")
MAX_SIDE = 65_535  # Rows and Columns are 16-bit
_GREY8, _RGB8, _GREY16 = "grey8", "rgb8", "grey16"


def series_file(rel: str) -> bool:
    """Whether a path (relative to ``DIR``) is a frame file of a series pie writes there."""
    return SERIES_FILE.match(rel) is not None


def series_name(position: int, count: int) -> str:
    """``frame_000.dcm``: the file of the frame at ``position`` (0-based) of ``count``, zero-padded alike."""
    return f"frame_{position:0{max(3, len(str(count - 1)))}d}.dcm"


@dataclass(frozen=True)
class PixelFormat:
    """How every frame of one series is stored."""

    photometric: str  # "MONOCHROME2" or "RGB"
    bits: int  # 8 or 16
    width: int
    height: int

    @property
    def samples(self) -> int:
        return 3 if self.photometric == "RGB" else 1

    def __str__(self) -> str:
        return f"{self.photometric} {self.bits}-bit"


@dataclass(frozen=True)
class Series:
    """What :func:`write_series` wrote."""

    folder: Path
    files: list[Path]
    pixel_format: PixelFormat


# --------------------------------------------------------------------------- the folder


def check_out(out: Path, overwrite: bool, option: str = "--out") -> list[Path]:
    """The files of ``out`` an export there replaces, or a ``UserError`` before anything is touched.

    ``out`` may be absent (it is created), empty, or with ``overwrite`` hold only the frames of a
    series pie wrote there (unchanged since, as its ledger records) and temporaries of dead pie
    processes. Any other file, pie's or not, is refused and never deleted: a series folder holds
    one series, and a viewer importing the folder takes every file in it.
    """
    from pie_cli.imaging.ownership import LEDGER, plan_overwrite

    out = Path(out)
    check_out_dir(out, overwrite, option, ignore=())
    if not out.is_dir():
        return []
    remove = plan_overwrite(out, series_file, option)  # refuses a user's file at a frame's name
    planned = set(remove)
    for entry in sorted(out.iterdir()):
        if entry.name == LEDGER and entry.is_file() and not entry.is_symlink():
            continue
        if entry in planned and (series_file(entry.name) or TEMP_NAME.match(entry.name)):
            continue
        what = "a folder" if entry.is_dir() and not entry.is_symlink() else "a file"
        raise UserError(
            f"{option} {out} holds {entry.name}, {what} that is not a DICOM frame pie wrote there; "
            "a series folder holds nothing else: move it away or choose another directory."
        )
    return remove


# --------------------------------------------------------------------------- the frames


def _frame(path: Path) -> tuple[str, np.ndarray]:
    """A frame's kind (grey8, rgb8, grey16) and pixels, as the file has them."""
    from pie_cli.imaging.media import SIXTEEN_BIT_MODES, open_image

    img = open_image(path, "frame")
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        return _GREY16, np.asarray(img).astype("<u2", copy=False)
    if mode in ("I", "F", "I;32", "I;32B", "I;32L"):
        raise UserError(
            f"frame {path} holds {'floating-point' if mode == 'F' else '32-bit'} pixels (mode {mode}); "
            "a DICOM export takes 8-bit or 16-bit frames."
        )
    if mode in ("L", "1", "LA", "La"):
        return _GREY8, np.asarray(img.convert("L"))
    return _RGB8, np.asarray(img if mode == "RGB" else img.convert("RGB"))


def _is_grey_rgb(arr: np.ndarray) -> bool:
    return bool(np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]))


def pixel_format(paths: Sequence[Path]) -> PixelFormat:
    """The one format of a series of these frames, or a ``UserError`` naming the frame that does not fit.

    Every frame is read once here (and again when it is written, so only one is in memory).
    """
    if not paths:
        raise UserError("no frames given; pass a run directory or frame files.")
    first = size = depth = None
    colour = False
    for path in paths:
        kind, arr = _frame(path)
        here = (arr.shape[1], arr.shape[0])
        bits = 16 if kind == _GREY16 else 8
        if size is None:
            first, size, depth = path, here, bits
            if max(here) > MAX_SIDE:
                raise UserError(
                    f"frame {path} is {here[0]}x{here[1]}; a DICOM image has at most {MAX_SIDE} rows and columns."
                )
        elif here != size:
            raise UserError(
                f"frame {path} is {here[0]}x{here[1]} but {first} is {size[0]}x{size[1]}; "
                "the frames of one DICOM series must have one size."
            )
        elif bits != depth:
            raise UserError(
                f"frame {path} is {bits}-bit but {first} is {depth}-bit; "
                "the frames of one DICOM series must have one bit depth."
            )
        colour = colour or (kind == _RGB8 and not _is_grey_rgb(arr))
    assert size is not None and depth is not None
    return PixelFormat("RGB" if colour else "MONOCHROME2", depth, size[0], size[1])


def pixels(path: Path, fmt: PixelFormat) -> np.ndarray:
    """A frame's pixels in the series' format: (rows, columns) grey or (rows, columns, 3) RGB."""
    _, arr = _frame(path)
    if fmt.photometric == "RGB":
        return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr
    return arr[..., 0] if arr.ndim == 3 else arr


def label_box(fmt: PixelFormat) -> tuple[int, int, int, int]:
    """Where the "SYNTHETIC" label is burnt in (x0, y0, x1, y1): the only pixels that differ from the frame."""
    from pie_cli.imaging.annotate import watermark_box

    return watermark_box(Image.new("L", (fmt.width, fmt.height)))


def label(fmt: PixelFormat) -> np.ndarray:
    """The label's pixels, in the series' format: ``annotate.watermark``'s white text on black."""
    from pie_cli.imaging.annotate import watermark

    x0, y0, x1, y1 = label_box(fmt)
    levels = np.asarray(watermark(Image.new("RGB", (fmt.width, fmt.height))))[y0:y1, x0:x1, 0]
    if fmt.bits == 16:
        return levels.astype(np.uint16) * 257  # 255 -> 65535: as bright as the format goes
    return np.repeat(levels[..., None], 3, axis=2) if fmt.photometric == "RGB" else levels.copy()


# --------------------------------------------------------------------------- the files


def _dataset(
    arr: np.ndarray, fmt: PixelFormat, position: int, count: int, uids: dict[str, str], stamp
) -> Any:
    """One frame's dataset: everything is made here, nothing is copied from anywhere."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    from pie_cli import __version__
    from pie_cli.imaging.files import provenance

    instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PIE_{__version__}"[:16]

    date, clock, zone = (time.strftime(f, stamp) for f in ("%Y%m%d", "%H%M%S", "%z"))
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    # SOP Common
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = instance
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, clock
    if re.fullmatch(r"[+-]\d{4}", zone):
        ds.TimezoneOffsetFromUTC = zone
    # Patient: fixed synthetic values, never anyone's
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic image made by pie; no patient data"
    # General Study
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate, ds.StudyTime = date, clock
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SYNTHETIC"
    ds.AccessionNumber = ""
    ds.StudyDescription = SERIES_DESCRIPTION
    # General Series
    ds.Modality = "OT"
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = 1
    ds.Laterality = ""  # type 2C: nothing is known of the body part
    ds.SeriesDate, ds.SeriesTime = date, clock
    ds.SeriesDescription = SERIES_DESCRIPTION
    # General Equipment and SC Equipment
    ds.Manufacturer = "pie"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"  # workstation
    ds.SecondaryCaptureDeviceManufacturer = "pie"
    ds.SecondaryCaptureDeviceSoftwareVersions = __version__
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, clock
    # General Image
    ds.InstanceNumber = position + 1
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = date, clock
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = (
        f"Frame {position + 1} of {count} of a PIE (Progressive Image Editing) disease-progression "
        "simulation made by pie: synthetic, not an acquired image."
    )
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    ds.ImageComments = provenance()["Comment"]
    # Image Pixel
    ds.SamplesPerPixel = fmt.samples
    ds.PhotometricInterpretation = fmt.photometric
    ds.Rows, ds.Columns = fmt.height, fmt.width
    ds.BitsAllocated = ds.BitsStored = fmt.bits
    ds.HighBit = fmt.bits - 1
    ds.PixelRepresentation = 0
    if fmt.samples == 3:
        ds.PlanarConfiguration = 0  # R, G, B of each pixel together
    else:
        top = (1 << fmt.bits) - 1
        ds.WindowCenter, ds.WindowWidth = f"{top / 2:g}", str(top + 1)
    ds.PixelData = np.ascontiguousarray(arr, dtype="<u2" if fmt.bits == 16 else np.uint8).tobytes()
    ds["PixelData"].VR = "OW" if fmt.bits == 16 else "OB"
    return ds


def save(ds: Any, path: Path) -> None:
    """Write ``ds`` in the DICOM File Format (preamble, ``DICM``, file meta): pydicom 3's or 2.4's way."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    else:  # pydicom 2.x: the encoding is set on the dataset, write_like_original=False adds the file meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(str(path), ds, write_like_original=False)


def write_series(frames: Sequence[Path], out: Path, overwrite: bool = False, option: str = "--out") -> Series:
    """Write ``frames`` (image files, in order) as one new DICOM series into the folder ``out``.

    Everything is checked first (the folder, every frame's size and format); then each file is
    written to a temporary name, all are renamed together, pie's earlier frames that are not
    replaced are removed and the folder's ledger records the new ones. A failure before the
    renames leaves ``out`` as it was (removed, if this call created it).
    """
    from pydicom.uid import generate_uid

    from pie_cli.imaging.files import nearest_existing
    from pie_cli.imaging.ownership import Ledger, remove_planned

    out = Path(out)
    remove = check_out(out, overwrite, option)
    fmt = pixel_format(frames)
    x0, y0, x1, y1 = label_box(fmt)
    burnt = label(fmt)
    uids = {"study": generate_uid(), "series": generate_uid()}
    stamp = time.localtime()
    count = len(frames)
    targets = [out / series_name(k, count) for k in range(count)]

    def writer(position: int):
        def write(tmp: Path) -> None:
            arr = pixels(frames[position], fmt).copy()
            arr[y0:y1, x0:x1] = burnt
            save(_dataset(arr, fmt, position, count, uids, stamp), tmp)

        return write

    created = None if out.is_dir() else out
    if created is not None:
        existing = nearest_existing(out)
        while created.parent != existing:  # the top folder this call makes
            created = created.parent
    out.mkdir(parents=True, exist_ok=True)
    published = False
    try:
        write_together([(target, writer(k)) for k, target in enumerate(targets)])
        published = True
        keep = {Path(os.path.abspath(t)) for t in targets}
        remove_planned(out, [p for p in remove if Path(os.path.abspath(p)) not in keep])
        Ledger(out).record(*targets)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif published:  # not in the ledger, so never provably pie's: take them back
            for target in targets:
                target.unlink(missing_ok=True)
        raise
    return Series(out, targets, fmt)
