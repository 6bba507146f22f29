"""`pie mask` and `pie mask info`: geometry, regions, morphology, heuristics, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pie_cli.imaging.media import fit_square
from tests.helpers import simulate_argv


def grey_image(path: Path, size: tuple[int, int], value: int = 90) -> Path:
    Image.new("L", size, value).save(path)
    return path


def make(cli, image, out, *args, resolution=None):
    extra = ["--resolution", str(resolution)] if resolution else []
    return cli("mask", image, "--out", out, *extra, *args)


def read(path: Path) -> np.ndarray:
    img = Image.open(path)
    assert img.mode == "L"
    return np.asarray(img)


@pytest.mark.parametrize(
    ("size", "resolution", "box"),
    [
        ((960, 480), 240, "340,100,540,300"),  # scale 0.5, 120 px cropped left
        ((480, 960), 240, "100,340,300,540"),  # scale 0.5, 120 px cropped top
        ((640, 480), 240, "180,100,380,300"),  # scale 0.5, 40 px cropped left
        ((304, 304), 304, "50,50,150,150"),  # no resize, no crop
    ],
)
def test_box_in_original_pixels_lands_on_the_right_working_pixels(cli, tmp_path, size, resolution, box):
    image = grey_image(tmp_path / "img.png", size)
    result = make(cli, image, tmp_path / "m.png", "--box", box, resolution=resolution)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "m.png")
    mask = read(tmp_path / "m.png")
    expected = np.zeros((resolution, resolution), dtype=np.uint8)
    expected[50:150, 50:150] = 255  # worked out by hand for each case
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("size", [(500, 300), (333, 517), (1024, 1000)])
def test_box_matches_a_mask_drawn_at_full_size_and_resampled(cli, tmp_path, size):
    """Independent check at non-round scales: draw at original size, resize like the image, compare."""
    w, h = size
    box = (round(w * 0.3), round(h * 0.35), round(w * 0.62), round(h * 0.8))
    image = grey_image(tmp_path / "img.png", size)
    assert (
        make(cli, image, tmp_path / "m.png", "--box", ",".join(map(str, box)), resolution=256).exit_code == 0
    )
    full = Image.new("L", size, 0)
    ImageDraw.Draw(full).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    reference = np.asarray(fit_square(full, 256, Image.Resampling.BILINEAR)) >= 128
    mask = read(tmp_path / "m.png") == 255
    assert (mask != reference).sum() <= 2 * 256  # at most the boundary rows/columns differ
    assert (mask & reference).sum() / (mask | reference).sum() > 0.97


def test_fractions_and_pixels_agree(cli, tmp_path):
    image = grey_image(tmp_path / "img.png", (960, 480))
    assert make(cli, image, tmp_path / "a.png", "--box", "0.3,0.1,0.5,0.5", resolution=240).exit_code == 0
    assert make(cli, image, tmp_path / "b.png", "--box", "288,48,480,240", resolution=240).exit_code == 0
    assert make(cli, image, tmp_path / "c.png", "--ellipse", "0.5,0.5,0.1,0.2", resolution=240).exit_code == 0
    assert make(cli, image, tmp_path / "d.png", "--ellipse", "480,240,96,96", resolution=240).exit_code == 0
    assert np.array_equal(read(tmp_path / "a.png"), read(tmp_path / "b.png"))
    assert np.array_equal(read(tmp_path / "c.png"), read(tmp_path / "d.png"))


def test_union_polygon_and_invert(cli, tmp_path):
    image = grey_image(tmp_path / "img.png", (96, 96))
    make(cli, image, tmp_path / "box.png", "--box", "10,10,30,30", resolution=96)
    make(cli, image, tmp_path / "tri.png", "--polygon", "50,10,90,10,50,50", resolution=96)
    both = make(
        cli,
        image,
        tmp_path / "both.png",
        "--box",
        "10,10,30,30",
        "--polygon",
        "50,10,90,10,50,50",
        resolution=96,
    )
    assert both.exit_code == 0
    box, tri, union = (read(tmp_path / f"{n}.png") for n in ("box", "tri", "both"))
    assert np.array_equal(union, np.maximum(box, tri))
    assert tri[12, 52] == 255 and tri[45, 85] == 0  # inside / outside the triangle's hypotenuse
    inv = make(cli, image, tmp_path / "inv.png", "--box", "10,10,30,30", "--invert", resolution=96)
    assert inv.exit_code == 0
    assert np.array_equal(read(tmp_path / "inv.png"), 255 - box)


def test_dilate_and_erode_by_exact_pixel_counts(cli, tmp_path):
    image = grey_image(tmp_path / "img.png", (96, 96))
    make(cli, image, tmp_path / "d.png", "--box", "40,40,60,60", "--dilate", "3", resolution=96)
    make(cli, image, tmp_path / "e.png", "--box", "40,40,60,60", "--erode", "3", resolution=96)
    d, e = read(tmp_path / "d.png") > 0, read(tmp_path / "e.png") > 0
    ys, xs = np.nonzero(d)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (37, 62, 37, 62)
    assert d[50, 37] and not d[50, 36] and d[37, 50] and not d[36, 50]
    assert not d[37, 37] and d[38, 38]  # Euclidean disk: the corner is rounded (38-40 offsets 2,2 < 3)
    ys, xs = np.nonzero(e)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (43, 56, 43, 56)
    assert e[43:57, 43:57].all() and e.sum() == 14 * 14


def test_feather_is_an_inward_linear_ramp(cli, tmp_path):
    image = grey_image(tmp_path / "img.png", (96, 96))
    assert (
        make(cli, image, tmp_path / "f.png", "--box", "0,0,50,96", "--feather", "4", resolution=96).exit_code
        == 0
    )
    mask = read(tmp_path / "f.png")
    assert mask[50, 44:52].tolist() == [255, 255, 255, 191, 128, 64, 0, 0]
    assert (mask[:, :46] == 255).all()  # the image border does not feather
    assert (mask[:, 50:] == 0).all()  # nothing outside the original box becomes editable


def test_fill_holes_and_otsu_with_keep_largest(cli, tmp_path):
    arr = np.zeros((96, 96), dtype=np.uint8)
    arr[10:40, 10:40] = 200  # big bright blob
    arr[70:80, 70:80] = 200  # small bright blob
    Image.fromarray(arr).save(tmp_path / "blobs.png")
    result = make(
        cli, tmp_path / "blobs.png", tmp_path / "o.png", "--otsu", "--keep-largest", "1", resolution=96
    )
    assert result.exit_code == 0, result.output
    mask = read(tmp_path / "o.png") > 0
    assert mask[10:40, 10:40].all() and mask.sum() == 900
    ring = np.zeros((96, 96), dtype=np.uint8)
    ring[20:80, 20:80] = 220
    ring[35:65, 35:65] = 10
    Image.fromarray(ring).save(tmp_path / "ring.png")
    assert (
        make(
            cli, tmp_path / "ring.png", tmp_path / "r.png", "--threshold", "200:255", resolution=96
        ).exit_code
        == 0
    )
    assert (
        make(
            cli,
            tmp_path / "ring.png",
            tmp_path / "rf.png",
            "--threshold",
            "200",
            "--fill-holes",
            resolution=96,
        ).exit_code
        == 0
    )
    assert read(tmp_path / "r.png")[50, 50] == 0
    assert (read(tmp_path / "rf.png")[20:80, 20:80] == 255).all()


def test_from_mask_of_another_size_is_resampled(cli, tmp_path):
    image = grey_image(tmp_path / "img.png", (960, 480))
    small = np.zeros((24, 48), dtype=np.uint8)
    small[5:15, 17:27] = 255  # = original pixels (340,100)-(540,300) = working (50,50)-(150,150)
    Image.fromarray(small).save(tmp_path / "small.png")
    result = make(cli, image, tmp_path / "m.png", "--from", tmp_path / "small.png", resolution=240)
    assert result.exit_code == 0, result.output
    assert "stretched" not in result.stderr
    mask = read(tmp_path / "m.png") > 0
    assert mask[55:145, 55:145].all() and not mask[:, :45].any() and not mask[:, 155:].any()
    Image.fromarray(np.full((40, 40), 255, dtype=np.uint8)).save(tmp_path / "square.png")
    result = make(cli, image, tmp_path / "s.png", "--from", tmp_path / "square.png", resolution=240)
    assert result.exit_code == 0 and "another aspect ratio" in result.stderr


def draw_chest(size: tuple[int, int], seed: int):
    """A chest-X-ray-like phantom drawn here: dark lungs with ribs inside a brighter body."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 20.0)
    body = ((x - w / 2) / (0.46 * w)) ** 2 + ((y - 0.55 * h) / (0.52 * h)) ** 2 <= 1
    img[body] = 150
    lungs = []
    for side in (-1, 1):
        cx = w / 2 + side * w * rng.uniform(0.17, 0.21)
        lung = ((x - cx) / (w * rng.uniform(0.12, 0.15))) ** 2 + (
            (y - 0.47 * h) / (h * rng.uniform(0.26, 0.31))
        ) ** 2 <= 1
        lungs.append(lung)
        img[lung] = 60
    for k in range(6):
        rib = np.abs(y - h * (0.25 + 0.08 * k) - 0.002 * (x - w / 2) ** 2 * 256 / w) < h * 0.012
        img[rib & (lungs[0] | lungs[1])] += 30
    heart = ((x - 0.55 * w) / (0.15 * w)) ** 2 + ((y - 0.63 * h) / (0.13 * h)) ** 2 <= 1
    img[heart] = 170
    img[(np.abs(x - w / 2) < 0.03 * w) & body] = 200
    img += rng.normal(0, 6, size=img.shape)
    truth = [lung & ~heart for lung in lungs]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize(
    ("size", "seed"), [((256, 256), 0), ((320, 256), 1), ((256, 300), 2), ((512, 512), 3)]
)
def test_auto_lungs_finds_both_lung_fields(cli, tmp_path, size, seed):
    img, (right_lung, left_lung) = draw_chest(size, seed)  # right_lung is on the image's left
    img.save(tmp_path / "cxr.png")
    r = min(size)
    to_working = lambda m: np.asarray(fit_square(Image.fromarray(m.astype(np.uint8) * 255), r)) >= 128  # noqa: E731
    assert make(cli, tmp_path / "cxr.png", tmp_path / "l.png", "--auto", "lungs", resolution=r).exit_code == 0
    both = read(tmp_path / "l.png") > 0
    assert iou(both, to_working(right_lung | left_lung)) >= 0.8
    assert (
        make(cli, tmp_path / "cxr.png", tmp_path / "ll.png", "--auto", "left-lung", resolution=r).exit_code
        == 0
    )
    assert iou(read(tmp_path / "ll.png") > 0, to_working(left_lung)) >= 0.8  # patient's left = image right


def test_auto_foreground_of_a_fundus_photo(cli, tmp_path):
    h = w = 256
    y, x = np.mgrid[0:h, 0:w]
    disc = (x - 128) ** 2 + (y - 128) ** 2 <= 110**2
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[disc] = (190, 90, 40)
    vessels = disc & (np.abs(np.sin(x / 9.0) * 30 + 128 - y) < 3)
    rgb[vessels] = (120, 30, 20)
    rgb[(x - 170) ** 2 + (y - 120) ** 2 <= 15**2] = (250, 220, 150)  # optic disc
    Image.fromarray(rgb).save(tmp_path / "fundus.png")
    assert (
        make(
            cli, tmp_path / "fundus.png", tmp_path / "f.png", "--auto", "foreground", resolution=256
        ).exit_code
        == 0
    )
    assert iou(read(tmp_path / "f.png") > 0, disc) >= 0.8


def test_auto_lungs_refuses_an_image_without_lungs(cli, tmp_path):
    image = grey_image(tmp_path / "flat.png", (128, 128), 128)
    result = make(cli, image, tmp_path / "m.png", "--auto", "lungs", resolution=128)
    assert result.exit_code == 2
    assert "--auto lungs found no lung fields" in result.stderr
    assert not (tmp_path / "m.png").exists()


def test_preview_tints_and_outlines(cli, tmp_path):
    image = grey_image(tmp_path / "img.png", (96, 96), 100)
    result = make(
        cli, image, tmp_path / "m.png", "--box", "20,20,60,60", "--preview", tmp_path / "p.png", resolution=96
    )
    assert result.exit_code == 0, result.output
    prev = np.asarray(Image.open(tmp_path / "p.png"))
    assert prev.shape == (96, 96, 3)
    assert tuple(prev[20, 30]) == (255, 220, 0)  # outline
    assert prev[40, 40, 0] > prev[40, 40, 1]  # tinted red inside
    assert tuple(prev[80, 80]) == (100, 100, 100)  # untouched outside


def test_a_made_mask_always_fits_simulate(cli, tmp_path, tiny_model):
    image = grey_image(tmp_path / "img.png", (96, 64))
    assert make(cli, image, tmp_path / "m.png", "--box", "40,10,70,50", resolution=64).exit_code == 0
    result = cli(
        *simulate_argv(image, tmp_path / "run", model=tiny_model, mask=tmp_path / "m.png", prompt="x")
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(read(tmp_path / "run" / "mask.png"), read(tmp_path / "m.png"))


BAD = {
    "unreadable image": (lambda d: [_text(d / "x.png"), "--box", "1,1,5,5"], "is not an image pie can read"),
    "missing image": (lambda d: [d / "nope.png", "--box", "1,1,5,5"], "does not exist"),
    "malformed box": (
        lambda d: [d / "img.png", "--box", "1,2,x,4"],
        "--box '1,2,x,4' is not a list of numbers",
    ),
    "short box": (
        lambda d: [d / "img.png", "--box", "1,2,3"],
        "--box '1,2,3' needs 4 numbers X0,Y0,X1,Y1, got 3.",
    ),
    "inverted box": (lambda d: [d / "img.png", "--box", "30,30,10,40"], "X1 must be greater than X0"),
    "box outside": (
        lambda d: [d / "img.png", "--box", "200,10,300,50"],
        "--box 200,10,300,50 lies outside the image (160x100 pixels).",
    ),
    "empty after crop": (lambda d: [d / "img.png", "--box", "0,0,20,100"], "would be empty"),
    "polygon too short": (
        lambda d: [d / "img.png", "--polygon", "1,1,5,5"],
        "needs at least three X,Y points",
    ),
    "no region": (lambda d: [d / "img.png"], "no region given"),
    "unknown auto": (lambda d: [d / "img.png", "--auto", "liver"], "--auto 'liver' is not one of"),
    "bad threshold": (
        lambda d: [d / "img.png", "--threshold", "200:100"],
        "must satisfy 0 <= LOW <= HIGH <= 255",
    ),
    "colour from": (lambda d: [d / "img.png", "--from", _colour(d / "c.png")], "is a colour image"),
}


def _text(path: Path) -> Path:
    path.write_text("not an image")
    return path


def _colour(path: Path) -> Path:
    Image.new("RGB", (10, 10), (0, 200, 0)).save(path)
    return path


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_mask_input_exits_2_and_writes_nothing(cli, tmp_path, case):
    grey_image(tmp_path / "img.png", (160, 100))
    build, expected = BAD[case]
    out = tmp_path / "out.png"
    result = cli("mask", *build(tmp_path), "--out", out, "--resolution", "96")
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output
    assert not out.exists()


def test_existing_output_is_not_overwritten(cli, tmp_path):
    image = grey_image(tmp_path / "img.png", (96, 96))
    (tmp_path / "m.png").write_bytes(b"mine")
    result = make(cli, image, tmp_path / "m.png", "--box", "1,1,50,50", resolution=96)
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.stderr
    assert (tmp_path / "m.png").read_bytes() == b"mine"
    result = make(cli, image, tmp_path / "m.png", "--box", "1,1,50,50", "--overwrite", resolution=96)
    assert result.exit_code == 2 and "was not written by pie" in result.stderr  # the user's: never replaced
    assert (tmp_path / "m.png").read_bytes() == b"mine"
    assert make(cli, image, tmp_path / "p.png", "--box", "1,1,50,50", resolution=96).exit_code == 0
    again = make(cli, image, tmp_path / "p.png", "--box", "1,1,60,60", "--overwrite", resolution=96)
    assert again.exit_code == 0  # pie's own mask is replaced


def test_explicit_make_subcommand(cli, tmp_path):
    image = grey_image(tmp_path / "img.png", (96, 96))
    result = cli(
        "mask", "make", image, "--out", tmp_path / "m.png", "--box", "0,0,10,10", "--resolution", "96"
    )
    assert result.exit_code == 0, result.output


def _info(cli, *args):
    result = cli("mask", "info", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_mask_info(cli, tmp_path):
    arr = np.zeros((64, 64), dtype=np.uint8)
    arr[8:24, 8:16] = 255
    arr[40:48, 40:56] = 255
    Image.fromarray(arr).save(tmp_path / "two.png")
    data, err = _info(cli, tmp_path / "two.png")
    assert data["binary"] is True and data["components"] == 2
    assert data["bbox"] == [8, 8, 56, 48]
    assert data["coverage_percent"] == pytest.approx(100 * 256 / 4096, abs=1e-3)
    assert data["latent_grid"] == [8, 8]
    assert data["latent_cells_percent"] == pytest.approx(100 * 4 / 64)  # cells whose 4 central pixels are set
    assert data["warnings"] == [] and err == ""

    soft = arr.copy()
    soft[8:24, 8:10] = 100
    Image.fromarray(soft).save(tmp_path / "soft.png")
    assert _info(cli, tmp_path / "soft.png")[0]["binary"] is False

    Image.new("L", (64, 64), 0).save(tmp_path / "empty.png")
    data, err = _info(cli, tmp_path / "empty.png")
    assert "the mask is empty" in err and data["bbox"] is None

    Image.new("L", (64, 64), 255).save(tmp_path / "full.png")
    assert "(> 90%)" in _info(cli, tmp_path / "full.png")[1]

    grey_image(tmp_path / "img.png", (100, 80))
    data, err = _info(cli, tmp_path / "two.png", "--image", tmp_path / "img.png", "--resolution", "80")
    assert "pie simulate would refuse it" in err
    data, err = _info(cli, tmp_path / "two.png", "--image", tmp_path / "img.png", "--resolution", "64")
    assert err == ""

    text = cli("mask", "info", tmp_path / "two.png")
    assert "components        2" in text.stdout and "binary" in text.stdout
