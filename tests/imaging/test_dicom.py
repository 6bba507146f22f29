"""Medical input: DICOM (pydicom) and 16-bit PNG/TIFF through ``media.open_image``; no tag leaks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.media import open_image, to_rgb8
from tests.helpers import reset_signals, simulate_argv

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT = ("DOE", "JANE", "MRN123456", "19990317")
SIZE = 64


def gradient(bits: int = 12) -> np.ndarray:
    """A 64 x 64 ramp over the whole stored range (every row the same)."""
    top = 2**bits - 1
    row = np.round(np.linspace(0, top, SIZE)).astype(np.uint16)
    return np.tile(row, (SIZE, 1))


def phantom_values() -> np.ndarray:
    """A chest-like 12-bit phantom: dark lungs in a brighter body, so Otsu finds the lungs."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    arr = np.full((SIZE, SIZE), 3000, dtype=np.uint16)
    for cx in (20, 44):
        arr[((xx - cx) / 9.0) ** 2 + ((yy - 32) / 20.0) ** 2 <= 1] = 600
    return arr


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    part10: bool = True,
    frames: int | None = None,
    **attrs,
) -> Path:
    """A single DICOM file with identifying tags that must never come out of pie."""
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN123456"
    ds.PatientBirthDate = "19990317"
    ds.StudyDate = "19990317"
    ds.InstitutionName = "JANE DOE MEMORIAL"
    ds.Modality = "DX"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    rows, cols = pixels.shape[-3:-1] if pixels.ndim == 3 and pixels.shape[-1] == 3 else pixels.shape[-2:]
    ds.Rows, ds.Columns = rows, cols
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(pixels.dtype, np.signedinteger) else 0
    if frames is not None:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if part10:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)
    else:  # a bare implicit-VR dataset: no preamble, no 'DICM', no file meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def grey16(path: Path) -> np.ndarray:
    img = open_image(path)
    assert img.mode == "I;16"
    return np.asarray(img).astype(np.int64)


def grey8(path: Path) -> np.ndarray:
    return np.asarray(to_rgb8(open_image(path)))[..., 0].astype(np.int64)


# --------------------------------------------------------------------------- pixel pipeline


def test_plain_dicom_keeps_16_bit_depth_until_to_rgb8(tmp_path):
    arr = gradient(12)
    path = write_dicom(tmp_path / "cxr.dcm", arr)
    img = open_image(path)
    assert img.mode == "I;16" and img.size == (SIZE, SIZE)
    values = np.asarray(img).astype(np.int64)
    # no window, no LUT: min..max of the image onto 0..65535
    assert values.min() == 0 and values.max() == 65535
    assert np.array_equal(values, np.round(arr / 4095 * 65535).astype(np.int64))
    rgb = to_rgb8(img)
    assert rgb.mode == "RGB"
    assert np.array_equal(np.asarray(rgb)[..., 0], np.round(values / 65535 * 255).astype(np.uint8))


def test_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path):
    arr = gradient(12)
    window = {"WindowCenter": 1000, "WindowWidth": 2000, "VOILUTFunction": "LINEAR_EXACT"}
    plain = grey16(write_dicom(tmp_path / "plain.dcm", arr, **window))
    rescaled = grey16(
        write_dicom(tmp_path / "rescaled.dcm", arr, RescaleSlope=2, RescaleIntercept=-1000, **window)
    )
    # window [0, 2000] in modality units: stored s -> (s) / 2000 without, (2 s - 1000) / 2000 with rescale
    s = arr.astype(np.float64)
    assert np.array_equal(plain, np.round(np.clip(s / 2000, 0, 1) * 65535))
    assert np.array_equal(rescaled, np.round(np.clip((2 * s - 1000) / 2000, 0, 1) * 65535))
    assert not np.array_equal(plain, rescaled)
    # stored 500 is modality value 0, the window's bottom; stored 1500 is 2000, its top
    assert rescaled[arr <= 500].max() == 0 and rescaled[arr >= 1500].min() == 65535


def test_window_clips_below_to_black_and_above_to_white(tmp_path):
    arr = gradient(12)
    # the first window of a multi-valued pair is used; DICOM's default LINEAR function
    path = write_dicom(tmp_path / "cxr.dcm", arr, WindowCenter=[2048, 100], WindowWidth=[1024, 50])
    out = grey8(path)
    below, above = arr < 2048 - 512, arr > 2048 + 512
    assert below.any() and above.any()
    assert (out[below] == 0).all()
    assert (out[above] == 255).all()
    inside = ~below & ~above
    assert 0 < out[inside].mean() < 255
    # monotone across the window
    assert (np.diff(out[0]) >= 0).all()


def test_voi_lut_sequence_is_honoured_over_the_window(tmp_path):
    arr = gradient(12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    # a LUT that inverts and stops at half scale: entries 0..32767 decreasing
    lut = np.round(np.linspace(32767, 0, 4096)).astype(np.uint16)
    item.LUTData = lut.astype("<u2").tobytes()  # OW, as most modalities write it
    path = write_dicom(
        tmp_path / "lut.dcm", arr, VOILUTSequence=Sequence([item]), WindowCenter=100, WindowWidth=10
    )
    values = grey16(path)
    # scaled by the LUT's own range (0..32767), not by the window
    expected = np.round(lut[arr].astype(np.float64) / 32767 * 65535)
    assert np.array_equal(values, expected)
    assert values[0, 0] == 65535 and values[0, -1] == 0


def test_monochrome1_is_inverted_relative_to_monochrome2(tmp_path):
    arr = phantom_values()
    m2 = grey16(write_dicom(tmp_path / "m2.dcm", arr, photometric="MONOCHROME2"))
    m1 = grey16(write_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1"))
    assert np.array_equal(m1, 65535 - m2)
    assert m2[32, 20] < m2[5, 5]  # MONOCHROME2 lungs dark
    assert m1[32, 20] > m1[5, 5]  # MONOCHROME1 stores them bright; pie shows them as in MONOCHROME2 ...
    windowed = {"WindowCenter": 2048, "WindowWidth": 4096}
    w2 = grey16(write_dicom(tmp_path / "w2.dcm", arr, photometric="MONOCHROME2", **windowed))
    w1 = grey16(write_dicom(tmp_path / "w1.dcm", arr, photometric="MONOCHROME1", **windowed))
    assert np.array_equal(w1, 65535 - w2)  # ... and inversion comes after the window


def test_signed_pixels_with_ct_style_rescale(tmp_path):
    arr = (gradient(12).astype(np.int16) - 2048).astype(np.int16)
    path = write_dicom(
        tmp_path / "ct.dcm",
        arr,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=-1024 - 2048 + 2048,
        WindowWidth=4096,
        VOILUTFunction="LINEAR_EXACT",
    )
    values = grey16(path)
    assert (np.diff(values[0]) >= 0).all() and values[0, 0] == 0 and values[0, -1] > 65000


def test_extensionless_file_with_dicm_magic_is_read(tmp_path):
    path = write_dicom(tmp_path / "IM000001", gradient(12))
    assert path.suffix == ""
    assert open_image(path).mode == "I;16"


def test_dcm_without_part10_header_is_read(tmp_path):
    path = write_dicom(tmp_path / "raw.DCM", gradient(12), part10=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(grey16(path), grey16(write_dicom(tmp_path / "p10.dcm", gradient(12))))


def test_rgb_dicom_becomes_8_bit_rgb(tmp_path):
    rgb = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[:, 32:, 2] = 90
    img = open_image(write_dicom(tmp_path / "photo.dcm", rgb, photometric="RGB", bits_stored=8))
    assert img.mode == "RGB"
    assert np.array_equal(np.asarray(img), rgb)


def test_ybr_dicom_is_converted_to_rgb(tmp_path):
    from pydicom.pixels import convert_color_space

    rgb = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[:, 32:, 2] = 90
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    img = open_image(write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL", bits_stored=8))
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img).astype(int) - rgb).max() <= 1


def test_rle_compressed_dicom_decodes_like_the_native_one(tmp_path):
    from pydicom.uid import RLELossless

    native = write_dicom(tmp_path / "native.dcm", phantom_values())
    ds = pydicom.dcmread(native)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    assert np.array_equal(grey16(tmp_path / "rle.dcm"), grey16(native))


def test_only_pixel_attributes_are_read_from_a_file(tmp_path):
    from pie_cli.imaging.dicom import PIXEL_TAGS, _read

    ds = _read(write_dicom(tmp_path / "cxr.dcm", gradient(12)), "image")
    assert {e.keyword for e in ds} <= set(PIXEL_TAGS)
    assert not any(s in repr(ds) for s in PATIENT)


# --------------------------------------------------------------------------- errors


def test_dicom_errors_are_one_sentence_naming_the_file_and_no_tag(tmp_path):
    from pydicom.pixels import get_decoder

    cases: dict[str, tuple[Path, str]] = {}
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00\x01 this is not DICOM at all " * 4)
    cases["not dicom"] = (junk, "is not a DICOM file")

    full = write_dicom(tmp_path / "full.dcm", gradient(12)).read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(full[: len(full) - 1000])
    cases["truncated"] = (truncated, "truncated")

    nopix = tmp_path / "report.dcm"
    write_dicom(nopix, gradient(12))
    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    cases["no pixel data"] = (nopix, "has no pixel data")

    two = np.stack([gradient(12), gradient(12)])
    cases["multi-frame"] = (
        write_dicom(tmp_path / "cine.dcm", two, frames=2),
        "multi-frame DICOM file (2 frames)",
    )

    for name, (path, expected) in cases.items():
        with pytest.raises(UserError) as info:
            open_image(path, "image")
        message = str(info.value)
        assert str(path) in message and expected in message, (name, message)
        assert message.count(". ") == 0 or name == "compressed", message
        assert not any(s in message for s in PATIENT), message

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    from pydicom.encaps import encapsulate

    jpeg = tmp_path / "jpeg.dcm"
    write_dicom(jpeg, gradient(12))
    ds = pydicom.dcmread(jpeg)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9" * 4])
    ds["PixelData"].VR = "OB"
    ds.save_as(jpeg)
    with pytest.raises(UserError) as info:
        open_image(jpeg)
    message = str(info.value)
    assert str(jpeg) in message and "JPEG Lossless" in message and "pip install pylibjpeg" in message
    assert "pylibjpeg-libjpeg" in message and not any(s in message for s in PATIENT)


def test_truncated_dicom_exits_2_through_the_cli_without_traceback(cli, tmp_path):
    full = write_dicom(tmp_path / "full.dcm", gradient(12)).read_bytes()
    bad = tmp_path / "cxr.dcm"
    bad.write_bytes(full[:-500])
    out = tmp_path / "m.png"
    result = cli("mask", bad, "--out", out, "--box", "10,10,40,40", "--resolution", "64")
    assert result.exit_code == 2, result.output
    assert str(bad) in result.stderr and "truncated" in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


# --------------------------------------------------------------------------- 16-bit PNG / TIFF


def fine_ramp() -> np.ndarray:
    """64 x 64 with 4096 distinct 16-bit values 16 apart (more than 8 bits can hold)."""
    return (np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE) * 16).astype(np.uint16)


def test_16_bit_png_keeps_its_levels_until_to_rgb8(tmp_path):
    arr = fine_ramp()
    path = tmp_path / "cxr16.png"
    Image.fromarray(arr).save(path)
    img = open_image(path)
    assert img.mode == "I;16"
    values = np.asarray(img)
    assert np.array_equal(values, arr)
    assert len(np.unique(values)) == SIZE * SIZE > 256
    rgb = np.asarray(to_rgb8(img))
    assert np.array_equal(rgb[..., 0], np.round(arr / 65535 * 255).astype(np.uint8))
    assert len(np.unique(rgb)) <= 256


def _with_sbit(png: Path, bits: int) -> None:
    """Insert an sBIT chunk (significant bits) after IHDR."""
    import struct
    import zlib

    data = png.read_bytes()
    ihdr_end = 8 + 8 + 13 + 4
    body = b"sBIT" + bytes([bits])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    png.write_bytes(data[:ihdr_end] + chunk + data[ihdr_end:])


def test_12_bit_png_declaring_sbit_is_scaled_by_its_declared_depth(tmp_path):
    arr = gradient(12)  # 0..4095 in a 16-bit PNG
    plain, declared = tmp_path / "plain.png", tmp_path / "sbit.png"
    Image.fromarray(arr).save(plain)
    Image.fromarray(arr).save(declared)
    _with_sbit(declared, 12)
    assert Image.open(declared).mode in (
        "I;16",
        "I",
    )  # still a valid 16-bit PNG (older Pillow opens it as "I")
    # without sBIT the values are read against 16 bits (dark, as in any viewer) ...
    assert np.array_equal(np.asarray(open_image(plain)), arr)
    # ... with sBIT = 12 the detector's maximum is white
    scaled = np.asarray(open_image(declared)).astype(np.int64)
    assert np.array_equal(scaled, np.round(arr / 4095 * 65535))
    assert grey8(declared).max() == 255 and grey8(plain).max() == 16


@pytest.mark.parametrize("raw_mode", ["I;16", "I;16B"])
def test_16_bit_tiff_keeps_its_levels(tmp_path, raw_mode):
    arr = fine_ramp()
    dtype = "<u2" if raw_mode == "I;16" else ">u2"
    path = tmp_path / "cxr16.tif"
    Image.frombytes(raw_mode, (SIZE, SIZE), arr.astype(dtype).tobytes()).save(path)
    img = open_image(path)
    assert img.mode == "I;16"
    assert np.array_equal(np.asarray(img), arr)


# --------------------------------------------------------------------------- commands


def test_pie_mask_on_a_dicom(cli, tmp_path):
    # MONOCHROME1 stores the lungs bright (high values); pie inverts, so they are dark for --otsu-dark
    stored = (3600 - phantom_values()).astype(np.uint16)
    image = write_dicom(tmp_path / "cxr.dcm", stored, photometric="MONOCHROME1")
    out = tmp_path / "lungs.png"
    result = cli("mask", image, "--out", out, "--otsu-dark", "--resolution", "64")
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(out))
    lungs = phantom_values() == 600
    assert (mask[lungs] == 255).mean() > 0.9 and (mask[~lungs] == 0).mean() > 0.9
    info = cli("mask", "info", out, "--image", image, "--resolution", "64")
    assert info.exit_code == 0, info.output


def _leaks(blob: bytes) -> list[str]:
    return [s for s in PATIENT if s.encode() in blob or s.encode("utf-16-le") in blob]


def test_simulate_on_a_dicom_leaks_no_tag(cli, tmp_path, tiny_model):
    image = write_dicom(tmp_path / "cxr.dcm", phantom_values())
    mask = tmp_path / "mask.png"
    assert cli("mask", image, "--out", mask, "--ellipse", "20,32,9,20", "--resolution", "64").exit_code == 0
    out = tmp_path / "run"
    result = cli(*simulate_argv(image, out, model=tiny_model, mask=mask))
    assert result.exit_code == 0, result.output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "frame_001.png" for p in files)
    frame0 = np.asarray(Image.open(out / "frame_000.png").convert("L")).astype(int)
    assert frame0[32, 20] < frame0[5, 5]  # the DICOM's pixels, lungs dark
    for p in files:
        assert not _leaks(p.read_bytes()), p
    assert not _leaks(result.stdout.encode()) and not _leaks(result.stderr.encode())
    json.loads((out / "manifest.json").read_text())


def test_finetune_folder_of_dicoms_is_read(tmp_path):
    from pie_cli.training.config import TrainSpec
    from pie_cli.training.data import check_images, load_data

    root = tmp_path / "data"
    root.mkdir()
    write_dicom(root / "a.dcm", phantom_values())
    write_dicom(root / "b.DCM", gradient(12), photometric="MONOCHROME1")
    rows = [{"file_name": "a.dcm", "text": "normal chest"}, {"file_name": "b.DCM", "text": "effusion"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data(TrainSpec(data=str(root)))
    assert data.format == "folder" and len(data.records) == 2
    check_images(data)
    for record in data.records:
        img = data.open(record)
        assert img.mode == "I;16" and img.size == (SIZE, SIZE)
        assert to_rgb8(img).mode == "RGB"

    # a bad DICOM is named with its row by the header check, before any training
    (root / "b.DCM").write_bytes((root / "b.DCM").read_bytes()[:-700])
    with pytest.raises(UserError) as info:
        check_images(data)
    assert "metadata.jsonl row 2" in str(info.value) and "truncated" in str(info.value)


def test_dicom_files_count_as_images_for_folder_discovery(tmp_path):
    from pie_cli.training.config import TrainSpec
    from pie_cli.training.data import IMAGE_SUFFIXES, class_records

    assert ".dcm" in IMAGE_SUFFIXES
    folder = tmp_path / "class"
    folder.mkdir()
    write_dicom(folder / "x.dcm", gradient(12))
    records = class_records(TrainSpec(class_data=str(folder), class_prompt="a chest x-ray"))
    assert [r.image.name for r in records] == ["x.dcm"]


def test_pydicom_is_not_imported_by_the_cli_or_for_png(tmp_path):
    png = tmp_path / "a.png"
    Image.new("L", (8, 8), 3).save(png)
    code = (
        "import sys; import pie_cli.cli.app; from pie_cli.imaging.media import open_image; "
        f"open_image({str(png)!r}); "
        "assert 'pydicom' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, preexec_fn=reset_signals)
