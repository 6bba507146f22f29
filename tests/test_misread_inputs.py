"""Defect class 2: pie silently misreads an input.

The rule pie must keep: **an input is read as the person who made it sees it, or it is refused
with one sentence saying what to do; it is never silently read as something else.**

- EXIF orientation: an image is used in its *displayed* orientation (frames, ``pie mask`` boxes,
  masks drawn on the displayed image, training images), and the manifest records the tag.
- Masks: a transparent background means "no edit" whatever colour its pixels store; an opaque
  region (white, black or one colour) is the region; small label values ({0,1}, {0,2}, 16-bit
  {0,1}) are a binary region, several labels are refused unless ``--label`` picks one; soft grey
  masks keep their partial strength; colour masks stay refused. ``pie mask info --json`` says
  how it read the mask (``interpretation``).
- DICOM: a deflated file is read, a compressed file without its decoder names the package to
  install (never "damaged"), a VOI window that maps every pixel to one grey is refused, and no
  tag value ever reaches an output byte or a message.

Every refusal row: exit 2, nothing on stdout, one ``Error:`` line with the row's key words, and
no file created, changed or removed under the test's tmp folder.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.helpers import frames_of, manifest, simulate_argv
from tests.refusals import check_ok, check_refused, snapshot

# --------------------------------------------------------------------------- EXIF orientation

# EXIF orientation -> how the stored pixels are turned from the displayed ones (exif_transpose undoes it).
STORED = {
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
    3: Image.Transpose.ROTATE_180,
}
DISPLAYED_SIZE = (96, 64)  # landscape as displayed: at -r 64 the centre crop keeps x 16..80
MASK_BOX = (56, 12, 76, 52)  # (x0, y0, x1, y1) in displayed pixels: the right of the crop


def displayed_image(phantom) -> Image.Image:
    """What the person sees: the phantom in a 96 x 64 landscape frame, with a bar marking the top."""
    image, _, _ = phantom
    canvas = Image.new("L", DISPLAYED_SIZE, 40)
    canvas.paste(image, (16, 0))
    arr = np.array(canvas)
    arr[0:4, 20:50] = 255  # top-left of the crop: only the displayed orientation has it there
    return Image.fromarray(arr, mode="L")


def displayed_mask() -> Image.Image:
    """A mask drawn on the displayed image (its size, its orientation)."""
    arr = np.zeros(DISPLAYED_SIZE[::-1], dtype=np.uint8)
    x0, y0, x1, y1 = MASK_BOX
    arr[y0:y1, x0:x1] = 255
    return Image.fromarray(arr, mode="L")


def save_with_orientation(displayed: Image.Image, orientation: int, path: Path) -> Path:
    """Stored pixels turned so that a viewer applying ``orientation`` shows ``displayed``."""
    stored = displayed.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    if path.suffix == ".jpg":
        stored.convert("RGB").save(path, exif=exif.tobytes(), quality=95)
    else:
        stored.save(path, exif=exif.tobytes())
    with Image.open(path) as check:  # the test's own premise: a viewer shows ``displayed``
        shown = ImageOps.exif_transpose(check)
        assert shown.size == displayed.size and check.getexif().get(0x0112) == orientation
    return path


@dataclass(frozen=True)
class Oriented:
    image: Path  # stored pixels + EXIF orientation
    upright: Path  # the same pixels as displayed, no EXIF: what pie must behave like
    mask: Path  # drawn in the displayed orientation
    orientation: int


ORIENTED = [
    pytest.param((6, ".png"), id="orientation 6 (PNG)"),
    pytest.param((8, ".png"), id="orientation 8 (PNG)"),
    pytest.param((3, ".png"), id="orientation 3 (PNG)"),
    pytest.param((6, ".jpg"), id="orientation 6 (JPEG)"),
]


@pytest.fixture
def oriented(request, tmp_path, phantom) -> Oriented:
    orientation, suffix = request.param
    image = save_with_orientation(displayed_image(phantom), orientation, tmp_path / f"photo{suffix}")
    upright = tmp_path / "upright.png"
    with Image.open(image) as img:
        ImageOps.exif_transpose(img).save(upright)  # the decoded pixels, turned: no second lossy step
    mask = tmp_path / "mask-drawn-on-screen.png"
    displayed_mask().save(mask)
    return Oriented(image, upright, mask, orientation)


@pytest.mark.parametrize("oriented", ORIENTED, indirect=True)
def test_simulate_edits_where_the_mask_is_in_the_displayed_orientation(oriented, cli, tiny_model, tmp_path):
    """The oracle is the same run on an upright copy: equal frames (the tiny model's VAE is no
    identity, so "little change outside the mask" would not tell orientations apart)."""
    turned, upright = tmp_path / "turned", tmp_path / "upright"
    check_ok(cli(*simulate_argv(oriented.image, turned, model=tiny_model, mask=oriented.mask)))
    check_ok(cli(*simulate_argv(oriented.upright, upright, model=tiny_model, mask=oriented.mask)))
    a, b = frames_of(turned), frames_of(upright)
    assert len(a) == len(b) == 2
    for n, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x, y), f"frame {n} differs from the run on the upright copy"
    assert manifest(turned)["inputs"]["image_orientation"] == oriented.orientation


@pytest.mark.parametrize("oriented", ORIENTED, indirect=True)
def test_mask_boxes_are_in_displayed_coordinates(oriented, cli, tmp_path):
    """The mask and its ``--preview`` (the image under the mask: a 180-degree turn keeps the size,
    so only the preview shows it) equal those made for an upright copy."""
    box = ",".join(map(str, MASK_BOX))
    for image, name in ((oriented.image, "turned"), (oriented.upright, "upright")):
        argv = ["mask", image, "--out", tmp_path / f"mask-{name}.png", "--box", box, "-r", "64"]
        check_ok(cli(*argv, "--preview", tmp_path / f"preview-{name}.png"))
    for kind in ("mask", "preview"):
        a = np.asarray(Image.open(tmp_path / f"{kind}-turned.png"))
        b = np.asarray(Image.open(tmp_path / f"{kind}-upright.png"))
        assert np.array_equal(a, b), f"the {kind} differs from the one made for the upright copy"


def _exif_folder(root: Path, phantom) -> Path:
    root.mkdir()
    save_with_orientation(displayed_image(phantom), 6, root / "0.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "effusion"}) + "\n")
    return root


def test_finetune_dry_run_reads_a_folder_with_an_oriented_image(cli, tiny_model, tmp_path, phantom):
    data = _exif_folder(tmp_path / "data", phantom)
    argv = [
        "finetune",
        "--data",
        data,
        "--model",
        tiny_model,
        "--out",
        tmp_path / "ft",
        "--dry-run",
        "-r",
        "32",
    ]
    result = check_ok(cli(*argv))
    assert "1 examples" in result.stdout


def test_training_data_opens_images_in_displayed_orientation(tmp_path, phantom):
    from pie_cli.training.config import TrainSpec
    from pie_cli.training.data import load_data

    data = load_data(TrainSpec(data=str(_exif_folder(tmp_path / "data", phantom))))
    opened = data.open(data.records[0])
    expected = displayed_image(phantom)
    assert opened.size == expected.size, f"opened as {opened.size}, displayed as {expected.size}"
    assert np.array_equal(np.asarray(opened.convert("L")), np.asarray(expected))


# --------------------------------------------------------------------------- masks


def region(phantom) -> np.ndarray:
    """The left lung of the phantom: the region every mask row below encodes in its own way."""
    return np.asarray(phantom[2]) > 127


def _rgba(background: tuple, inside: tuple) -> Callable[[np.ndarray], Image.Image]:
    def make(r: np.ndarray) -> Image.Image:
        arr = np.empty((*r.shape, 4), dtype=np.uint8)
        arr[...] = background
        arr[r] = inside
        return Image.fromarray(arr, mode="RGBA")

    return make


def _la(background: tuple, inside: tuple) -> Callable[[np.ndarray], Image.Image]:
    def make(r: np.ndarray) -> Image.Image:
        arr = np.empty((*r.shape, 2), dtype=np.uint8)
        arr[...] = background
        arr[r] = inside
        return Image.fromarray(arr, mode="LA")

    return make


def _grey(values: tuple[int, int], dtype=np.uint8) -> Callable[[np.ndarray], Image.Image]:
    def make(r: np.ndarray) -> Image.Image:
        return Image.fromarray(np.where(r, values[1], values[0]).astype(dtype))

    return make


def _ramp(r: np.ndarray) -> np.ndarray:
    """A soft mask: 0..255 across the image, every value present."""
    h, w = r.shape
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


def _opaque(mode: str) -> Callable[[np.ndarray], Image.Image]:
    def make(r: np.ndarray) -> Image.Image:
        grey = Image.fromarray(_ramp(r), mode="L")
        return grey.convert(mode)  # alpha 255 everywhere

    return make


def _palette(r: np.ndarray) -> Image.Image:
    img = Image.fromarray(np.where(r, 1, 0).astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 255, 255, 255])
    return img


def _grey_as_rgb(r: np.ndarray) -> Image.Image:
    return Image.fromarray(_ramp(r), mode="L").convert("RGB")


def _labels(r: np.ndarray) -> np.ndarray:
    """0 background, 1 the left lung, 2 a box elsewhere."""
    labels = np.where(r, 1, 0).astype(np.uint8)
    labels[40:56, 8:24] = 2
    return labels


def _two_colours(r: np.ndarray) -> Image.Image:
    arr = np.zeros((*r.shape, 4), dtype=np.uint8)
    arr[r] = (255, 0, 0, 255)
    arr[40:56, 8:24] = (0, 255, 0, 255)
    return Image.fromarray(arr, mode="RGBA")


def _strokes(r: np.ndarray) -> Image.Image:
    arr = np.repeat(_ramp(r)[..., None], 3, axis=-1)
    arr[r] = (255, 0, 0)
    return Image.fromarray(arr, mode="RGB")


BINARY = "binary"  # the expected grey: 255 on the region, 0 elsewhere


@dataclass(frozen=True)
class MaskRow:
    make: Callable[[np.ndarray], Image.Image]
    # What pie must read: BINARY, "same" (the file's own grey values), or a function of the region.
    expected: str | Callable[[np.ndarray], np.ndarray]


MASK_ROWS = [
    pytest.param(
        MaskRow(_rgba((0, 0, 0, 0), (255, 255, 255, 255)), BINARY), id="RGBA clear black, opaque white"
    ),
    pytest.param(
        MaskRow(_rgba((255, 255, 255, 0), (255, 255, 255, 255)), BINARY), id="RGBA clear white, opaque white"
    ),
    pytest.param(MaskRow(_rgba((0, 0, 0, 0), (0, 0, 0, 255)), BINARY), id="RGBA clear, opaque black"),
    pytest.param(MaskRow(_rgba((0, 0, 0, 0), (255, 0, 0, 255)), BINARY), id="RGBA clear, opaque red"),
    pytest.param(MaskRow(_la((0, 0), (255, 255)), BINARY), id="LA clear black, opaque white"),
    pytest.param(MaskRow(_la((255, 0), (0, 255)), BINARY), id="LA clear white, opaque black"),
    pytest.param(MaskRow(_opaque("RGBA"), _ramp), id="RGBA opaque grey = grey"),
    pytest.param(MaskRow(_opaque("LA"), _ramp), id="LA opaque grey = grey"),
    pytest.param(MaskRow(_grey((0, 1)), BINARY), id="8-bit labels 0,1"),
    pytest.param(MaskRow(_grey((0, 2)), BINARY), id="8-bit labels 0,2"),
    pytest.param(MaskRow(_grey((0, 1), np.uint16), BINARY), id="16-bit labels 0,1"),
    pytest.param(MaskRow(lambda r: Image.fromarray(_ramp(r), mode="L"), _ramp), id="8-bit soft ramp (kept)"),
    pytest.param(
        MaskRow(_grey((0, 200)), lambda r: np.where(r, 200, 0).astype(np.uint8)), id="8-bit 0,200 (kept)"
    ),
    pytest.param(MaskRow(_grey_as_rgb, _ramp), id="RGB grey stored as colour (kept)"),
    pytest.param(MaskRow(_palette, BINARY), id="palette black,white (kept)"),
]


def _expected(row: MaskRow, r: np.ndarray) -> np.ndarray:
    if row.expected == BINARY:
        return np.where(r, 255, 0).astype(np.uint8)
    return row.expected(r)


def _info(cli, path: Path) -> dict:
    result = check_ok(cli("mask", "info", path, "-r", "64", "--json"))
    return json.loads(result.stdout)


@pytest.mark.parametrize("row", MASK_ROWS)
def test_a_mask_is_read_as_drawn(row: MaskRow, cli, tiny_model, inputs, tmp_path, phantom):
    from pie_cli.imaging.masks import mask_to_grey
    from pie_cli.imaging.media import open_image

    r = region(phantom)
    path = tmp_path / "drawn.png"
    row.make(r).save(path)
    grey = tmp_path / "grey.png"
    Image.fromarray(_expected(row, r), mode="L").save(grey)

    read = np.asarray(mask_to_grey(open_image(path, "mask"), path))
    assert np.array_equal(read, _expected(row, r)), "mask_to_grey read another mask than the one drawn"

    got, want = _info(cli, path), _info(cli, grey)
    for key in ("coverage_percent", "mean_strength_percent", "binary"):
        assert got[key] == want[key], f"mask info {key}: {got[key]} for the drawn mask, {want[key]} for grey"

    check_ok(cli(*simulate_argv(inputs["image"], tmp_path / "drawn", model=tiny_model, mask=path)))
    check_ok(cli(*simulate_argv(inputs["image"], tmp_path / "grey", model=tiny_model, mask=grey)))
    for n, (a, b) in enumerate(zip(frames_of(tmp_path / "drawn"), frames_of(tmp_path / "grey"), strict=True)):
        assert np.array_equal(a, b), f"frame {n} differs from the run with the equivalent grey mask"


@pytest.mark.parametrize("row", MASK_ROWS)
def test_mask_info_says_how_it_read_the_mask(row: MaskRow, cli, tmp_path, phantom):
    path = tmp_path / "drawn.png"
    row.make(region(phantom)).save(path)
    interpretation = _info(cli, path).get("interpretation")
    assert isinstance(interpretation, str) and interpretation.strip(), f"interpretation = {interpretation!r}"


@pytest.mark.parametrize(
    ("make", "keywords"),
    [
        pytest.param(_two_colours, ("colour",), id="RGBA two opaque colours"),
        pytest.param(
            lambda r: Image.fromarray(_labels(r), mode="L"), ("label", "--label"), id="8-bit labels 0,1,2"
        ),
        pytest.param(_strokes, ("colour",), id="RGB coloured strokes (kept)"),
    ],
)
def test_an_ambiguous_mask_is_refused(make, keywords, cli, tiny_model, inputs, tmp_path, phantom):
    path = tmp_path / "drawn.png"
    make(region(phantom)).save(path)
    argv = simulate_argv(inputs["image"], tmp_path / "out", model=tiny_model, mask=path)
    before = snapshot(tmp_path)
    check_refused(cli(*argv), *keywords, before=before, roots=(tmp_path,))


@pytest.mark.parametrize("label", [1, 2])
def test_mask_label_picks_one_label_of_a_label_map(label, cli, inputs, tmp_path, phantom):
    labels = _labels(region(phantom))
    path = tmp_path / "labels.png"
    Image.fromarray(labels, mode="L").save(path)
    out = tmp_path / "m.png"
    check_ok(cli("mask", inputs["image"], "--out", out, "--from", path, "--label", str(label), "-r", "64"))
    made = np.asarray(Image.open(out))
    assert np.array_equal(made, np.where(labels == label, 255, 0)), f"not the region of label {label}"


# --------------------------------------------------------------------------- DICOM


def pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)  # shipped inside the pydicom wheel: no download
    assert path is not None, f"pydicom's test file {name} is missing"
    return Path(path)


def _mask_of(image: Path, out: Path, *extra) -> list:
    return ["mask", image, "--out", out, "--box", "0.1,0.1,0.6,0.6", "-r", "64", *extra]


def test_a_deflated_dicom_is_read(cli, tmp_path):
    out = tmp_path / "m.png"
    check_ok(cli(*_mask_of(pydicom_file("image_dfl.dcm"), out)))
    assert np.asarray(Image.open(out)).max() == 255


JPEG_DECODERS = ("pylibjpeg", "gdcm")


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is not None for m in JPEG_DECODERS),
    reason="a 12-bit JPEG decoder is installed here",
)
@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm"])
def test_a_dicom_without_its_decoder_names_the_package(name, cli, tmp_path):
    image = shutil.copy(pydicom_file(name), tmp_path / name)
    before = snapshot(tmp_path)
    line = check_refused(cli(*_mask_of(image, tmp_path / "m.png")), name, before=before, roots=(tmp_path,))
    assert any(p in line for p in JPEG_DECODERS), f"no package to install named in {line!r}"
    for wrong in ("damaged", "truncated"):
        assert wrong not in line, f"a file pydicom cannot decode here is called {wrong}: {line!r}"


SECRET = "Zyxwv^Secretname-4711"


def ct_copy(path: Path, **tags) -> Path:
    """CT_small.dcm with tags changed (identifying ones included), saved to ``path``."""
    import pydicom

    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


def blank_window(path: Path) -> Path:
    """CT_small with its own VOI window far above every pixel: all of it maps to one grey."""
    import pydicom

    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    top = float(ds.pixel_array.max()) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return ct_copy(path, WindowCenter=top + 5000, WindowWidth=10, PatientName=SECRET)


@pytest.mark.parametrize("command", ["simulate", "mask"])
def test_a_dicom_window_that_blanks_the_image_is_refused(command, cli, tiny_model, tmp_path):
    image = blank_window(tmp_path / "ct.dcm")
    if command == "simulate":
        argv = simulate_argv(image, tmp_path / "out", model=tiny_model)
    else:
        argv = _mask_of(image, tmp_path / "m.png")
    before = snapshot(tmp_path)
    line = check_refused(cli(*argv), "window", before=before, roots=(tmp_path,))
    assert "one grey" in line or "blank" in line, line
    assert SECRET.split("^")[0] not in line and "Secretname" not in line


def test_no_dicom_tag_value_reaches_an_output_or_a_message(cli, tiny_model, tmp_path):
    image = ct_copy(
        tmp_path / "ct.dcm",
        PatientName=SECRET,
        PatientID="PID-Secretname-0815",
        InstitutionName="Secretname Hospital",
        StudyDescription="Secretname study",
    )
    run, outputs = tmp_path / "run", tmp_path / "outputs"
    outputs.mkdir()
    messages = []
    for argv in (
        simulate_argv(image, run, model=tiny_model),
        _mask_of(image, outputs / "m.png", "--preview", outputs / "p.png"),
        ["export-gif", run, "--out", outputs / "a.gif"],
        ["evaluate", run],
        ["mask", "info", outputs / "m.png", "--image", image, "-r", "64"],
    ):
        result = check_ok(cli(*argv))
        messages.append(result.stdout + result.stderr)
    refused = cli(*simulate_argv(blank_window(tmp_path / "blank.dcm"), tmp_path / "r2", model=tiny_model))
    messages.append(refused.stdout + refused.stderr)
    for text in messages:
        assert "Secretname" not in text and "Zyxwv" not in text, text
    for path in [*run.rglob("*"), *outputs.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert b"Secretname" not in data and b"Zyxwv" not in data, f"a tag value is in {path}"
