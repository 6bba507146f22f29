"""`pie export-gif --format dicom --out DIR`: a Secondary Capture series that reads back, keeps the
frames' pixels and depth, burns in "SYNTHETIC", carries nothing of the patient, and replaces only
what pie wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pie_cli import __version__
from pie_cli.imaging.annotate import watermark_box
from pie_cli.imaging.ownership import LEDGER
from tests.helpers import reset_signals

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
W, H = 56, 40  # not square: Rows 40, Columns 56


def levels(k: int, kind: str, size=(W, H)) -> np.ndarray:
    """Frame k's pixels: a ramp over the columns plus k, distinct per frame, in the kind's range."""
    w, h = size
    ramp = np.tile(np.linspace(0, 1, w), (h, 1))
    if kind == "I;16":
        return np.round(ramp * 50_000 + 300 + 997 * k).astype(np.uint16)  # far above 255, odd values
    grey = np.round(ramp * 200 + 10 + 9 * k).astype(np.uint8)
    if kind == "L":
        return grey
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if kind == "RGB":  # real colour: the channels differ
        rgb[..., 1] = 255 - grey
        rgb[..., 2] = (grey // 2 + 40 * k).astype(np.uint8)
    return rgb


def make_run(tmp_path: Path, kind: str = "RGB", count: int = 3, name: str = "run", size=(W, H)) -> Path:
    """A run folder: frame_NNN.png of ``kind`` ("RGB", "grey RGB", "L", "I;16"), a mask and a manifest."""
    d = tmp_path / name
    d.mkdir(parents=True)
    for k in range(count):
        img = Image.fromarray(levels(k, kind, size))
        assert img.mode == ("RGB" if "RGB" in kind else kind)
        img.save(d / f"frame_{k:03d}.png")
    Image.new("L", size, 0).save(d / "mask.png")
    (d / "manifest.json").write_text(json.dumps({"run_id": "0123456789abcdef", "synthetic": True}))
    return d


def export(cli, *args):
    return cli("export-gif", *[str(a) for a in args])


def series(out: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(out.glob("frame_*.dcm"))]


def outside_label(size=(W, H)) -> np.ndarray:
    """True where the burnt-in label does not reach (annotate.watermark_box: the bottom-right corner)."""
    x0, y0, x1, y1 = watermark_box(Image.new("RGB", size))
    keep = np.ones((size[1], size[0]), dtype=bool)
    keep[y0:y1, x0:x1] = False
    return keep


def ok(result) -> None:
    assert result.exit_code == 0, result.output


def refused(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- the series


def test_series_reads_back_as_one_new_secondary_capture_series(cli, tmp_path):
    run = make_run(tmp_path, count=4)
    out = tmp_path / "series"
    days = {time.strftime("%Y%m%d")}
    result = export(cli, run, "--format", "dicom", "--out", out, "--watermark")  # the label is always there
    days.add(time.strftime("%Y%m%d"))  # (an export at midnight)
    ok(result)
    assert result.stdout.strip() == str(out)
    assert "4 DICOM frames, 56x40 RGB 8-bit" in result.stderr
    names = sorted(os.listdir(out))
    assert names == [LEDGER, "frame_000.dcm", "frame_001.dcm", "frame_002.dcm", "frame_003.dcm"]
    assert sorted(json.loads((out / LEDGER).read_text())["files"]) == names[1:]
    datasets = series(out)
    for k, ds in enumerate(datasets):
        raw = (out / f"frame_{k:03d}.dcm").read_bytes()
        assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"  # preamble, prefix
        meta = ds.file_meta
        assert meta.MediaStorageSOPClassUID == SC and meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == SC
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "YES"
        assert ds.SeriesDescription == "SYNTHETIC - research simulation"
        assert ds.Modality == "OT" and ds.ConversionType == "WSD"
        assert ds.InstanceNumber == k + 1
        assert ds.Manufacturer == "pie" and ds.SoftwareVersions == __version__
        assert ds.ContentDate == ds.SeriesDate == ds.StudyDate and ds.StudyDate in days
        assert "PIE" in ds.DerivationDescription and "synthetic" in ds.DerivationDescription
        assert (ds.Rows, ds.Columns) == (H, W)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            assert keyword in ds  # type 2: present
        assert ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert ds.PatientIdentityRemoved == "YES"
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    assert datasets[0].StudyInstanceUID != datasets[0].SeriesInstanceUID

    again = tmp_path / "again"
    ok(export(cli, run, "--format", "dicom", "--out", again))
    second = series(again)
    assert second[0].StudyInstanceUID != datasets[0].StudyInstanceUID  # new UIDs every export
    assert second[0].SeriesInstanceUID != datasets[0].SeriesInstanceUID
    assert not {ds.SOPInstanceUID for ds in second} & {ds.SOPInstanceUID for ds in datasets}


@pytest.mark.parametrize(
    "kind, photometric, bits, samples",
    [
        ("RGB", "RGB", 8, 3),
        ("grey RGB", "MONOCHROME2", 8, 1),
        ("L", "MONOCHROME2", 8, 1),
        ("I;16", "MONOCHROME2", 16, 1),
    ],
)
def test_pixels_keep_the_frames_format_and_values_outside_the_label(
    cli, tmp_path, kind, photometric, bits, samples
):
    run = make_run(tmp_path, kind)
    out = tmp_path / "series"
    ok(export(cli, run, "--format", "dicom", "--out", out))
    keep = outside_label()
    top = (1 << bits) - 1
    for k, ds in enumerate(series(out)):
        assert ds.PhotometricInterpretation == photometric and ds.SamplesPerPixel == samples
        assert ds.BitsAllocated == ds.BitsStored == bits and ds.HighBit == bits - 1
        assert ds.PixelRepresentation == 0
        if samples == 3:
            assert ds.PlanarConfiguration == 0
        arr = ds.pixel_array
        expected = levels(k, kind)
        if kind == "grey RGB":
            expected = expected[..., 0]
        assert arr.shape == expected.shape and arr.dtype.itemsize == bits // 8
        assert np.array_equal(arr[keep], expected[keep])  # exact, 16-bit values too
        label = arr[~keep]
        assert label.min() == 0 and label.max() >= 0.75 * top  # white text on a black box: visible
        if bits == 16:
            assert expected.max() > 255 and arr[keep].max() == expected[keep].max()


def test_full_size_non_square_frames(cli, tmp_path):
    run = make_run(tmp_path, "I;16", count=2, size=(512, 616))
    out = tmp_path / "series"
    ok(export(cli, run, "--format", "dicom", "--out", out))
    keep = outside_label((512, 616))
    for k, ds in enumerate(series(out)):
        assert (ds.Rows, ds.Columns) == (616, 512)
        assert np.array_equal(ds.pixel_array[keep], levels(k, "I;16", (512, 616))[keep])


def test_every_keeps_the_last_frame_and_numbers_the_files_in_order(cli, tmp_path):
    run = make_run(tmp_path, "L", count=5)
    out = tmp_path / "series"
    ok(export(cli, run, "--format", "dicom", "--out", out, "--every", "3"))
    datasets = series(out)
    keep = outside_label()
    assert sorted(p.name for p in out.glob("*.dcm")) == ["frame_000.dcm", "frame_001.dcm", "frame_002.dcm"]
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3]
    for ds, k in zip(datasets, (0, 3, 4), strict=True):
        assert np.array_equal(ds.pixel_array[keep], levels(k, "L")[keep])


def test_explicit_frame_files_in_the_given_order(cli, tmp_path):
    run = make_run(tmp_path, "L", count=3)
    out = tmp_path / "series"
    ok(export(cli, run / "frame_002.png", run / "frame_000.png", "--format", "dicom", "--out", out))
    keep = outside_label()
    first, second = series(out)
    assert np.array_equal(first.pixel_array[keep], levels(2, "L")[keep])
    assert np.array_equal(second.pixel_array[keep], levels(0, "L")[keep])


def test_mixed_grey_and_colour_frames_make_one_rgb_series(cli, tmp_path):
    run = make_run(tmp_path, "L", count=2)
    Image.fromarray(levels(2, "RGB")).save(run / "frame_002.png")
    out = tmp_path / "series"
    ok(export(cli, run, "--format", "dicom", "--out", out))
    datasets = series(out)
    assert {ds.PhotometricInterpretation for ds in datasets} == {"RGB"}
    keep = outside_label()
    assert np.array_equal(
        datasets[0].pixel_array[keep], np.repeat(levels(0, "L")[..., None], 3, axis=2)[keep]
    )


# --------------------------------------------------------------------------- nothing of the patient

PHI = ("DOE^JOHN", "PHI-98765", "19600101", "St Example Hospital", "ACC-55555")


def phi_dicom(path: Path) -> Path:
    """A 16-bit DICOM carrying a patient's identity in its tags (and, by the caller, in its path)."""
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[1], PHI[2]
    ds.InstitutionName, ds.AccessionNumber = PHI[3], PHI[4]
    ds.StudyDescription = f"{PHI[0]} {PHI[1]}"
    ds.Modality = "DX"
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = H, W
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (levels(0, "I;16") // 16).astype("<u2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SC, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def test_no_patient_attribute_path_or_manifest_text_reaches_any_output_byte(cli, tmp_path):
    from pie_cli.imaging.media import open_image
    from pie_cli.runs.manifest import input_record

    folder = tmp_path / f"{PHI[0]} {PHI[1]} {PHI[3]}"
    folder.mkdir()
    source = phi_dicom(folder / f"{PHI[0]}_{PHI[1]}_{PHI[2]}_{PHI[4]}.dcm")
    image = open_image(source)
    assert image.mode == "I;16"
    # The run, as `pie simulate` leaves it: 16-bit frames derived from the image, and a manifest.
    run = tmp_path / f"run-{PHI[0]}-{PHI[1]}"
    run.mkdir()
    base = np.asarray(image).astype(np.int64)
    for k in range(3):
        Image.fromarray(np.clip(base + 500 * k, 0, 65535).astype(np.uint16)).save(run / f"frame_{k:03d}.png")
    manifest = {
        "pie_version": __version__,
        "command": "simulate",
        "synthetic": True,
        "parameters": {"prompt": f"large left pleural effusion in {PHI[0]}"},
        "inputs": input_record(source, image, None),
        # input_record never records a path; an older or hand-edited manifest might: it must not matter.
        "source_image": str(source),
        "run_id": "0123456789abcdef",
        "status": "complete",
    }
    (run / "manifest.json").write_text(json.dumps(manifest))

    secrets = [s.encode() for s in (*PHI, str(source), str(folder), str(run), folder.name, run.name)]
    secrets += [s.upper().encode() for s in PHI] + [b"Example"]
    for inputs, out in (([run], tmp_path / "series"), ([source, source], tmp_path / "direct")):
        result = export(cli, *inputs, "--format", "dicom", "--out", out)
        ok(result)
        assert sorted(os.listdir(out)) == [
            LEDGER,
            "frame_000.dcm",
            "frame_001.dcm",
            *(["frame_002.dcm"] * (len(inputs) == 1)),
        ]
        for path in out.iterdir():
            data = path.read_bytes()
            for secret in secrets:
                assert secret not in data, (path.name, secret)
        for ds in series(out):
            assert ds.PatientName == "SYNTHETIC^PIE" and ds.PatientID == "PIE-SYNTHETIC"
            assert ds.AccessionNumber == "" and "InstitutionName" not in ds
            assert ds.StudyInstanceUID != pydicom.dcmread(source).StudyInstanceUID
    direct = series(tmp_path / "direct")[0].pixel_array
    assert np.array_equal(direct[outside_label()], np.asarray(image)[outside_label()])  # the film's 16 bits


# --------------------------------------------------------------------------- the folder


def test_a_folder_that_is_not_empty_is_refused_and_kept(cli, tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(
        export(cli, run, "--format", "dicom", "--out", out), f"--out {out} is not empty; pass --overwrite"
    )
    refused(
        export(cli, run, "--format", "dicom", "--out", out, "--overwrite"),
        f"--out {out} holds notes.txt, a file that is not a DICOM frame pie wrote there",
    )
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (out / "frame_000.dcm").write_bytes(b"someone else's")  # a user's file at a frame's name
    (out / "notes.txt").unlink()
    refused(
        export(cli, run, "--format", "dicom", "--out", out, "--overwrite"),
        f"--out {out} holds frame_000.dcm, which pie did not write",
    )
    assert os.listdir(out) == ["frame_000.dcm"] and (out / "frame_000.dcm").read_bytes() == b"someone else's"


def test_overwrite_replaces_only_pies_own_frames(cli, tmp_path):
    run = make_run(tmp_path, count=5)
    out = tmp_path / "series"
    ok(export(cli, run, "--format", "dicom", "--out", out))
    old = series(out)[0].SeriesInstanceUID
    refused(export(cli, run, "--format", "dicom", "--out", out), "is not empty; pass --overwrite")

    ok(export(cli, run, "--format", "dicom", "--out", out, "--overwrite", "--every", "2"))  # 3 frames now
    assert sorted(os.listdir(out)) == [LEDGER, "frame_000.dcm", "frame_001.dcm", "frame_002.dcm"]
    assert sorted(json.loads((out / LEDGER).read_text())["files"]) == [
        "frame_000.dcm",
        "frame_001.dcm",
        "frame_002.dcm",
    ]
    assert {ds.SeriesInstanceUID for ds in series(out)} != {old}

    (out / "README.txt").write_text("a user's file in the series folder")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused(export(cli, run, "--format", "dicom", "--out", out, "--overwrite"), "holds README.txt")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing deleted, nothing written
    (out / "README.txt").unlink()

    with open(out / "frame_001.dcm", "ab") as fh:  # pie's frame, changed since: no longer provably pie's
        fh.write(b"\x00\x00")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused(
        export(cli, run, "--format", "dicom", "--out", out, "--overwrite"),
        "holds frame_001.dcm, which pie did not write (or which changed since pie wrote it)",
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_folder_of_pies_is_never_emptied_for_a_series(cli, tmp_path):
    from pie_cli.imaging.ownership import Ledger

    run = make_run(tmp_path)
    other = make_run(tmp_path, name="other")
    Ledger(other).record(*sorted(other.iterdir()))  # all pie's, yet not a series
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    refused(export(cli, run, "--format", "dicom", "--out", other, "--overwrite"), "holds frame_000.png")
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


@pytest.mark.parametrize("where", ["run", "frame folder"])
def test_out_is_never_an_input(cli, tmp_path, where):
    run = make_run(tmp_path)
    inputs = [run / "frame_000.png", run / "frame_001.png"] if where == "frame folder" else [run]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = export(cli, *inputs, "--format", "dicom", "--out", run, "--overwrite")
    expected = {
        "run": f"--out {run} is RUN_DIR_OR_FRAMES {run} itself; write the series into a folder of its own",
        "frame folder": f"--out {run} holds frame_000.png, a file that is not a DICOM frame pie wrote there",
    }[where]
    refused(result, expected)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_series_folder_may_lie_inside_the_run_folder(cli, tmp_path):
    run = make_run(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    ok(export(cli, run, "--format", "dicom", "--out", run / "dicom"))
    ok(export(cli, run, "--format", "dicom", "--out", run / "dicom", "--overwrite"))
    assert len(series(run / "dicom")) == 3
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "dicom"} == before


def test_a_dicom_frame_inside_out_is_not_written_over(cli, tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "series"
    ok(export(cli, run, "--format", "dicom", "--out", out))
    before = (out / "frame_000.dcm").read_bytes()
    result = export(
        cli, out / "frame_000.dcm", out / "frame_001.dcm", "--format", "dicom", "--out", out, "--overwrite"
    )
    refused(result, "is where pie writes its frame_000.dcm in --out")
    assert (out / "frame_000.dcm").read_bytes() == before


def test_out_is_created_and_removed_again_on_failure(cli, tmp_path, monkeypatch):
    from pie_cli.imaging import dicom_out

    run = make_run(tmp_path)
    out = tmp_path / "new" / "series"
    ok(export(cli, run, "--format", "dicom", "--out", out))
    assert len(series(out)) == 3

    calls = []

    def full_disk(ds, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(ds, path)

    real_save = dicom_out.save
    monkeypatch.setattr(dicom_out, "save", full_disk)
    fresh = tmp_path / "fresh" / "series"
    result = export(cli, run, "--format", "dicom", "--out", fresh)
    assert result.exit_code == 1 and "frame_001.dcm" in result.stderr
    assert not (tmp_path / "fresh").exists()  # made by this export: gone again

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls.clear()
    result = export(cli, run, "--format", "dicom", "--out", out, "--overwrite")
    assert result.exit_code == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old series, whole

    empty = tmp_path / "empty"
    empty.mkdir()
    calls.clear()
    assert export(cli, run, "--format", "dicom", "--out", empty).exit_code == 1
    assert empty.is_dir() and not os.listdir(empty)


# --------------------------------------------------------------------------- refusals

NOT_FOR_DICOM = [
    ("--duration-ms", "200"),
    ("--duration-ms", "500"),  # the default value, but given
    ("--hold-last-ms", "0"),
    ("--loop", "2"),
    ("--bounce",),
    ("--resize", "32"),
    ("--columns", "2"),
    ("--caption", "step {i}"),
    ("--side-by-side",),
    ("--diff",),
    ("--mask-outline",),
    ("--lossless",),
]


@pytest.mark.parametrize("option", NOT_FOR_DICOM, ids=[" ".join(o) for o in NOT_FOR_DICOM])
def test_animation_options_are_refused_by_name(cli, tmp_path, option):
    run = make_run(tmp_path)
    out = tmp_path / "series"
    result = export(cli, run, "--format", "dicom", "--out", out, *option)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"Error: {option[0]} does not apply to --format dicom, which writes each frame as it is; leave it out."
    )
    assert not out.exists()


def _text(path: Path) -> Path:
    path.write_text("not a folder")
    return path


def _sized(path: Path, size, mode="RGB") -> Path:
    Image.new(mode, size).save(path)
    return path


BAD = {
    "frames of two sizes": (
        lambda d, r: [
            r / "frame_000.png",
            _sized(d / "big.png", (64, 64)),
            "--format",
            "dicom",
            "--out",
            d / "s",
        ],
        f"is 64x64 but {{run}}/frame_000.png is {W}x{H}; the frames of one DICOM series must have one size.",
    ),
    "8-bit and 16-bit frames": (
        lambda d, r: [
            r / "frame_000.png",
            _sized(d / "deep.png", (W, H), "I;16"),
            "--format",
            "dicom",
            "--out",
            d / "s",
        ],
        "is 16-bit but {run}/frame_000.png is 8-bit; the frames of one DICOM series must have one bit depth.",
    ),
    ".dcm without --format": (
        lambda d, r: [r, "--out", d / "a.dcm"],
        "a DICOM export is a series, one file per frame, written into a folder; use --format dicom --out DIR.",
    ),
    "--format dicom with a file name": (
        lambda d, r: [r, "--format", "dicom", "--out", d / "a.dcm"],
        "looks like a file name, but --format dicom writes a folder of frame_NNN.dcm files; name a folder.",
    ),
    "--format dicom with a .gif name": (
        lambda d, r: [r, "--format", "dicom", "--out", d / "a.gif"],
        "--out {tmp}/a.gif looks like a file name, but --format dicom writes a folder",
    ),
    "--format unlike the extension": (
        lambda d, r: [r, "--format", "gif", "--out", d / "a.webp"],
        "--format gif writes a .gif file but --out {tmp}/a.webp ends in .webp; name it a.gif.",
    ),
    "--format without an extension": (
        lambda d, r: [r, "--format", "png", "--out", d / "sheet"],
        "has no extension; name it sheet.png.",
    ),
    "no extension, no --format": (
        lambda d, r: [r, "--out", d / "folder"],
        "or --format dicom with a folder.",
    ),
    "unknown --format": (lambda d, r: [r, "--format", "tiff", "--out", d / "s"], "--format"),
    "--every 0": (
        lambda d, r: [r, "--format", "dicom", "--out", d / "s", "--every", "0"],
        "--every must be at least 1",
    ),
    "out is a file": (
        lambda d, r: [r, "--format", "dicom", "--out", _text(d / "taken")],
        "exists and is not a directory",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_dicom_export_exits_2_and_writes_nothing(cli, tmp_path, case):
    run = make_run(tmp_path)
    build, expected = BAD[case]
    args = build(tmp_path, run)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    result = export(cli, *args)
    assert result.exit_code == 2, result.output
    assert expected.format(run=run, tmp=tmp_path) in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_trajectory_runs_are_exported_one_by_one(cli, tmp_path):
    top = tmp_path / "k2"
    for k in range(2):
        make_run(top, name=f"traj_{k:02d}")
    refused(export(cli, top, "--format", "dicom", "--out", tmp_path / "s"), "give one of its run folders")
    ok(export(cli, top / "traj_01", "--format", "dicom", "--out", tmp_path / "s"))


def test_format_matching_the_extension_is_accepted(cli, tmp_path):
    run = make_run(tmp_path)
    ok(export(cli, run, "--format", "png", "--out", tmp_path / "strip.png"))
    assert Image.open(tmp_path / "strip.png").size == (3 * W, H)


def test_dicom_export_never_imports_torch(tmp_path):
    run = make_run(tmp_path, "I;16")
    code = (
        "import sys\n"
        "from pie_cli.cli.app import app\n"
        "try:\n"
        f"    app(['export-gif', {str(run)!r}, '--format', 'dicom', '--out', {str(tmp_path / 's')!r}], prog_name='pie')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=reset_signals
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("HEAVY:"), proc.stdout[-300:]
    assert len(list((tmp_path / "s").glob("*.dcm"))) == 3
