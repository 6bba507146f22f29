"""The patient's own image (issue 14): `--fit crop|pad|native`, `--full-res`, `--preserve-outside`.

Every check is numerical, on non-square images and the tiny model: a mask made by `pie mask --fit X`
lines up with the frames of `pie simulate --fit X`; `--full-res` frames have the input's size and
depth and, outside the window, its exact pixels; with `--preserve-outside`, pixels farther than
the feather from the mask equal frame 0 bit for bit in every frame (8- and 16-bit inputs); a
resumed run of each kind equals an uninterrupted one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pie_cli.imaging.geometry import fit_geometry, full_res_window
from pie_cli.imaging.media import open_image, to_rgb8
from tests.helpers import manifest, simulate_argv
from tests.simulate.test_resume import interrupt_after

W, H = 80, 120  # a portrait "film"
BOX = (20, 30, 60, 90)  # the bright finding region, in image pixels
FRAME_SIZES = {"crop": (64, 64), "pad": (43, 64), "native": (64, 96)}


def film(mode: str = "RGB") -> Image.Image:
    """A textured portrait image with a bright rectangle at BOX (8-bit RGB, 8-bit grey or 16-bit grey)."""
    rng = np.random.default_rng(3)
    base = 60 + rng.integers(0, 60, size=(H, W))
    base[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 230
    if mode == "I;16":
        return Image.fromarray((base * 257 + rng.integers(0, 257, size=(H, W))).astype(np.uint16))
    grey = Image.fromarray(base.astype(np.uint8), mode="L")
    return grey if mode == "L" else Image.merge("RGB", (grey, grey.point(lambda v: v * 0.9), grey))


def dilated(on: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within Euclidean ``radius`` of a True pixel (written here, independently of pie)."""
    out = on.copy()
    h, w = on.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            shifted = np.zeros_like(on)
            shifted[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = on[
                max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)
            ]
            out |= shifted
    return out


def frames(run) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)).astype(np.int64) for p in sorted(run.glob("frame_*.png"))]


def simulate(cli, tiny_model, image, mask, out, *extra, steps=3):
    result = cli(*simulate_argv(image, out, *extra, model=tiny_model, mask=mask, steps=steps, seed=5))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def files(tmp_path):
    paths = {}
    for mode, name in (("RGB", "film.png"), ("L", "film-grey.png"), ("I;16", "film16.png")):
        film(mode).save(tmp_path / name)
        paths[mode] = tmp_path / name
    mask = np.zeros((H, W), np.uint8)
    mask[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 255
    Image.fromarray(mask, mode="L").save(tmp_path / "box-full.png")
    paths["full_mask"] = tmp_path / "box-full.png"
    return paths


# --------------------------------------------------------------------------- geometry arithmetic


def test_fit_geometry_of_a_portrait_film():
    crop, pad, native = (fit_geometry((2544, 3056), 512, f) for f in ("crop", "pad", "native"))
    assert crop.frame_size == (512, 512) and round(crop.cut_fraction(), 3) == 0.167  # the 17 %
    assert pad.canvas == (512, 512) and pad.frame_size == (426, 512) and pad.cut_fraction() == 0
    assert pad.content == (43, 0, 469, 512)
    assert native.canvas == native.frame_size == (512, 616) and native.cut_fraction() == 0
    assert all(side % 8 == 0 for side in native.canvas)
    # the default is the original method's geometry, exactly
    from pie_cli.imaging.geometry import square_geometry

    new, box = square_geometry((2544, 3056), 512)
    assert crop.resized == new and crop.offset == (-box[0], -box[1])


def test_full_res_window_is_square_inside_the_image_and_holds_the_box():
    (x0, y0, x1, y1), margin = full_res_window((2544, 3056), (1400, 1800, 2000, 2700), 512)
    assert margin == 225 and x1 - x0 == y1 - y0 == 900 + 450
    assert x0 >= 0 and x1 <= 2544 and y0 >= 0 and y1 <= 3056
    assert x0 <= 1400 - 0 and x1 >= 2000 and y0 <= 1800 and y1 >= 2700
    # a small box still gets a window of at least the working size; at the border it is shifted inside
    assert full_res_window((3000, 3000), (0, 0, 10, 10), 512) == ((0, 0, 512, 512), 32)
    # an image too small for the square keeps the largest rectangle it holds
    assert full_res_window((300, 2000), (100, 100, 250, 700), 512)[0] == (0, 0, 300, 900)


# --------------------------------------------------------------------------- mask and frames line up


@pytest.mark.parametrize("fit", ["crop", "pad", "native"])
def test_mask_made_with_fit_lines_up_with_the_frames(cli, tiny_model, files, tmp_path, fit):
    mask = tmp_path / f"mask-{fit}.png"
    made = cli(
        "mask", files["RGB"], "--box", ",".join(map(str, BOX)), "--fit", fit, "-r", "64", "--out", mask
    )
    assert made.exit_code == 0, made.output
    assert Image.open(mask).size == FRAME_SIZES[fit]
    out = tmp_path / f"run-{fit}"
    result = simulate(cli, tiny_model, files["RGB"], mask, out, "--fit", fit, "--preserve-outside")
    assert ("--fit crop cuts away" in result.stderr) == (fit == "crop")  # 1/3 of this portrait image
    first, *later = frames(out)
    assert first.shape[:2] == (FRAME_SIZES[fit][1], FRAME_SIZES[fit][0])
    on = np.asarray(Image.open(mask)) > 127
    bright = first[..., 0] > 200  # the finding region as the frames show it
    inner, outer = ~dilated(~on, 1), dilated(on, 1)  # away from the one-pixel resampling edge
    assert bright[inner].all() and not bright[~outer].any()
    assert np.array_equal(np.asarray(Image.open(out / "mask.png")), np.asarray(Image.open(mask)))
    assert manifest(out)["geometry"]["fit"] == fit
    # the edit happens inside the mask, and nothing beyond the feather moves
    beyond = ~dilated(on | (np.asarray(Image.open(mask)) > 0), 8)
    for frame in later:
        assert np.array_equal(frame[beyond], first[beyond])
        assert np.abs(frame - first)[on].max() > 0


def test_mask_of_the_image_size_gives_the_same_frames_as_one_from_pie_mask(cli, tiny_model, files, tmp_path):
    """pad: the image-size mask is brought to the frame geometry exactly as `pie mask --fit pad --from` does."""
    made = tmp_path / "made.png"
    assert (
        cli(
            "mask", files["RGB"], "--from", files["full_mask"], "--fit", "pad", "-r", "64", "--out", made
        ).exit_code
        == 0
    )
    a, b = tmp_path / "a", tmp_path / "b"
    simulate(cli, tiny_model, files["RGB"], files["full_mask"], a, "--fit", "pad", steps=1)
    simulate(cli, tiny_model, files["RGB"], made, b, "--fit", "pad", steps=1)
    ma, mb = (np.asarray(Image.open(p / "mask.png")) for p in (a, b))
    assert ma.shape == mb.shape == (64, 43)
    assert np.array_equal(ma > 127, mb > 0)  # the same region (pie mask binarises at --level)


def test_a_mask_made_for_another_fit_is_refused_naming_both_sizes(cli, tiny_model, files, tmp_path):
    mask = tmp_path / "crop-mask.png"
    assert cli("mask", files["RGB"], "--box", "20,30,60,90", "-r", "64", "--out", mask).exit_code == 0
    out = tmp_path / "run"
    result = cli(*simulate_argv(files["RGB"], out, "--fit", "pad", model=tiny_model, mask=mask))
    assert result.exit_code == 2
    assert (
        f"mask {mask} is 64x64 but the image is 80x120; a mask must have the image's size or the working size "
        "43x64 at --fit pad (see `pie mask --fit pad`)." in result.stderr
    )
    assert not out.exists()


# --------------------------------------------------------------------------- exact preservation


@pytest.mark.parametrize("mode", ["RGB", "I;16"])
@pytest.mark.parametrize("feather", [0, 3])
def test_preserve_outside_keeps_every_pixel_beyond_the_feather(
    cli, tiny_model, files, tmp_path, mode, feather
):
    out = tmp_path / "run"
    extra = ("--fit", "native", "--preserve-outside", "--preserve-feather", str(feather))
    simulate(cli, tiny_model, files[mode], files["full_mask"], out, *extra, steps=4)
    first, *later = frames(out)
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    beyond = ~dilated(mask, feather)
    assert len(later) == 4
    for frame in later:
        assert np.array_equal(frame[beyond], first[beyond])  # bit for bit, every step
        assert np.abs(frame - first)[mask].max() > 10  # and the finding does change
    if feather:
        band = dilated(mask, feather) & ~mask
        assert any(np.abs(frame - first)[band].max() > 0 for frame in later)  # the blend band blends


def test_without_preserve_outside_the_vae_changes_pixels_outside(cli, tiny_model, files, tmp_path):
    """The original method (the default) lets pixels outside the mask drift: what the option fixes."""
    out = tmp_path / "run"
    simulate(cli, tiny_model, files["RGB"], files["full_mask"], out, "--fit", "native", steps=2)
    first, *later = frames(out)
    beyond = ~dilated(np.asarray(Image.open(out / "mask.png")) > 0, 8)
    assert np.abs(later[-1] - first)[beyond].max() > 0


def test_pad_padding_is_never_edited_nor_written(components, files):
    """The frames hold no padding, and the padding of the canvas is frame 0's at every step: a step
    started from a written frame (re-padded with black) gives exactly the uninterrupted run's next frame."""
    import torch

    from pie_cli.core.progression import ResumePoint, progress_batch

    image, mask = film("RGB"), Image.open(files["full_mask"])
    params = {"prompt": "x", "steps": 2, "inference_steps": 4, "resolution": 64, "fit": "pad"}
    gens = [torch.Generator("cpu").manual_seed(1)]
    run = progress_batch(components, image, mask, generators=gens, **params)
    first, one = next(run)[0], next(run)[0]
    state = gens[0].get_state()
    two = next(run)[0]
    assert {f.image.size for f in (first, one, two)} == {(43, 64)}
    point = ResumePoint(1, [one.image], [state])
    again = list(
        progress_batch(
            components,
            image,
            mask,
            generators=[torch.Generator("cpu").manual_seed(1)],
            resume=point,
            **params,
        )
    )
    assert len(again) == 1 and np.array_equal(np.asarray(again[0][0].image), np.asarray(two.image))


# --------------------------------------------------------------------------- full resolution


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_full_res_frames_have_the_input_size_depth_and_pixels_outside_the_window(
    cli, tiny_model, files, tmp_path, mode
):
    out = tmp_path / "run"
    simulate(
        cli, tiny_model, files[mode], files["full_mask"], out, "--full-res", "--full-res-margin", "4", steps=2
    )
    record = manifest(out)["geometry"]["full_res"]
    assert record["margin"] == 4 and record["window"] == [6, 26, 74, 94]  # 68 px square around BOX
    x0, y0, x1, y1 = record["window"]
    original = np.asarray(Image.open(files[mode])).astype(np.int64)
    outside = np.ones((H, W), dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert outside.any()
    for n, path in enumerate(sorted(out.glob("frame_*.png"))):
        img = open_image(path)  # as pie reads it (Pillow < 10.? opens a 16-bit PNG as "I")
        assert img.size == (W, H) and img.mode == mode
        frame = np.asarray(img).astype(np.int64)
        assert np.array_equal(frame[outside], original[outside])
        if n == 0:
            assert np.array_equal(frame, original)  # frame 0 is the input itself
        else:
            assert np.abs(frame - original)[~outside].max() > 0
    assert Image.open(out / "mask.png").size == (W, H)
    assert Image.open(out / "progression.gif").size == (W, H)
    # export-gif shows the frames by their depth (a 16-bit film is scaled, never clipped to white)
    strip = tmp_path / "strip.png"
    assert cli("export-gif", out, "--out", strip).exit_code == 0
    first = np.asarray(Image.open(strip).convert("L"))[:, :W].astype(np.int64)
    expected = np.asarray(to_rgb8(Image.open(files[mode])).convert("L")).astype(np.int64)
    assert np.abs(first - expected).max() <= 1


def test_full_res_with_preserve_outside_keeps_the_16_bit_film_beyond_the_feather(
    cli, tiny_model, files, tmp_path
):
    out = tmp_path / "run"
    extra = ("--full-res", "--preserve-outside", "--preserve-feather", "4")
    simulate(cli, tiny_model, files["I;16"], files["full_mask"], out, *extra, steps=3)
    original = np.asarray(Image.open(files["I;16"])).astype(np.int64)
    beyond = ~dilated(np.asarray(Image.open(files["full_mask"])) > 0, 4)
    for path in sorted(out.glob("frame_*.png"))[1:]:
        frame = np.asarray(Image.open(path)).astype(np.int64)
        assert open_image(path).mode == "I;16"
        assert np.array_equal(frame[beyond], original[beyond])
    assert manifest(out)["geometry"]["full_res"]["feather"] == 4


def test_full_res_refusals(cli, tiny_model, files, tmp_path):
    out = tmp_path / "run"
    small = tmp_path / "small.png"
    Image.new("L", (64, 64), 255).save(small)
    cases = [
        ((), None, "--full-res edits a window around the mask: give --mask too (of the image's size)."),
        (
            (),
            small,
            f"--full-res needs a mask of the image's own size 80x120; mask {small} is 64x64 "
            "(make one with `pie mask IMAGE --full-res ...`).",
        ),
        (("--full-res-margin", "-1"), files["full_mask"], "--full-res-margin must be >= 0 pixels, got -1."),
    ]
    for extra, mask, message in cases:
        result = cli(*simulate_argv(files["RGB"], out, "--full-res", *extra, model=tiny_model, mask=mask))
        assert result.exit_code == 2, result.output
        assert message in result.stderr
        assert "Traceback" not in result.output and not out.exists()
    for argv, message in (
        (
            ("--preserve-feather", "3"),
            "--preserve-feather is the width of --preserve-outside's blend: give --preserve-outside too.",
        ),
        (("--full-res-margin", "40"), "--full-res-margin sets --full-res's window: give --full-res too."),
        (("--fit", "square"), "--fit must be one of crop, pad, native, got 'square'."),
    ):
        result = cli(*simulate_argv(files["RGB"], out, *argv, model=tiny_model, mask=files["full_mask"]))
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert not out.exists()
    result = cli(*simulate_argv(files["RGB"], out, "--preserve-outside", model=tiny_model))
    assert result.exit_code == 2
    assert "--preserve-outside keeps every pixel outside the mask: give --mask too." in result.stderr


# --------------------------------------------------------------------------- resume and defaults


@pytest.mark.parametrize(
    "extra",
    [
        ("--fit", "pad", "--preserve-outside"),
        ("--full-res", "--preserve-outside", "--watermark"),
        ("--full-res", "--fit", "native"),
    ],
    ids=["pad", "full-res-watermark", "full-res-native"],
)
def test_resume_is_bit_identical(cli, tiny_model, files, tmp_path, monkeypatch, extra):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    argv = lambda out: simulate_argv(  # noqa: E731
        files["I;16"], out, *extra, model=tiny_model, mask=files["full_mask"], steps=4, seed=9
    )
    assert cli(*argv(whole)).exit_code == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        assert cli(*argv(cut)).exit_code == 130
    result = cli("simulate", "--resume", "--out", cut)
    assert result.exit_code == 0, result.output
    a, b = frames(whole), frames(cut)
    assert len(a) == len(b) == 5
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not (cut / ".resume").exists()
    recorded = manifest(cut)["parameters"]
    assert recorded["full_res"] == ("--full-res" in extra)
    assert json.dumps(manifest(cut)["geometry"]) == json.dumps(manifest(whole)["geometry"])


def test_defaults_are_the_original_crop_without_compositing(cli, tiny_model, files, tmp_path):
    out = tmp_path / "run"
    simulate(cli, tiny_model, files["RGB"], files["full_mask"], out, steps=1)
    record = manifest(out)
    assert record["parameters"]["fit"] == "crop" and record["parameters"]["preserve_outside"] is False
    assert record["geometry"]["full_res"] is None and record["geometry"]["canvas"] == [64, 64]


# --------------------------------------------------------------------------- evaluate in the run's geometry


def test_evaluate_takes_a_mask_of_the_image_size_through_the_runs_fit(cli, tiny_model, files, tmp_path):
    out = tmp_path / "run"
    simulate(
        cli, tiny_model, files["RGB"], files["full_mask"], out, "--fit", "pad", "--preserve-outside", steps=2
    )
    own = cli("evaluate", out, "--json")
    assert own.exit_code == 0, own.output
    given = cli(
        "evaluate", out, "--mask", files["full_mask"], "--json"
    )  # 80x120, mapped like simulate maps it
    assert given.exit_code == 0, given.output
    summary = json.loads(own.stdout)["summary"]
    assert summary["beyond_feather"]["feather"] == 8 and summary["beyond_feather"]["pixels"] > 0
    assert summary["beyond_feather"]["identical_frames"] == 2 and summary["beyond_feather"]["max_abs"] == 0
    assert "beyond the 8 px feather (--preserve-outside): all 2 frames identical to frame 0" in own.stderr
    assert {k: v for k, v in json.loads(given.stdout)["summary"].items() if k != "beyond_feather"} == {
        k: v for k, v in summary.items() if k != "beyond_feather"
    }
    refused = cli("evaluate", out, "--fit", "crop")
    assert refused.exit_code == 2
    assert (
        f"--fit crop: the run in {out} was made with --fit pad, the geometry its frames are in; drop --fit."
        in refused.stderr
    )
    small = tmp_path / "small.png"
    Image.new("L", (64, 64), 255).save(small)
    wrong = cli("evaluate", out, "--mask", small)
    assert wrong.exit_code == 2
    assert (
        f"--mask {small} is 64x64; it must have the frames' size 43x64 or the image's 80x120." in wrong.stderr
    )


def test_native_refuses_a_canvas_above_the_limit_and_crop_warns(cli, tiny_model, tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (40, 400), (90, 90, 90)).save(strip)  # 1:10: native at 512 would be 512 x 5120
    out = tmp_path / "run"
    result = cli(*simulate_argv(strip, out, "--fit", "native", model=tiny_model, resolution=512))
    assert result.exit_code == 2 and not out.exists()
    assert (
        "--fit native would work at 512x5120 for this 40x400 image, above 4096 px; use --fit pad "
        "(or a lower --resolution)." in result.stderr
    )


def test_a_cohort_sets_fit_and_full_res_per_case(cli, tiny_model, files, tmp_path):
    table = tmp_path / "cases.csv"
    table.write_text(
        "image,mask,prompt,out,fit,preserve_outside,full_res\n"
        f"{files['RGB']},{files['full_mask']},effusion,pad,pad,true,false\n"
        f"{files['I;16']},{files['full_mask']},effusion,full,crop,yes,true\n"
        f"{files['RGB']},{files['full_mask']},effusion,plain,crop,false,no\n"
    )
    out = tmp_path / "cohort"
    result = cli(*simulate_argv(None, out, "--cohort", table, model=tiny_model, prompt=None, steps=1))
    assert result.exit_code == 0, result.output
    pad, full, plain = (manifest(out / name) for name in ("pad", "full", "plain"))
    assert (pad["parameters"]["fit"], pad["parameters"]["preserve_outside"]) == ("pad", True)
    assert Image.open(out / "pad" / "frame_001.png").size == (43, 64)
    assert (
        full["parameters"]["full_res"] is True and open_image(out / "full" / "frame_001.png").mode == "I;16"
    )
    assert plain["parameters"]["preserve_outside"] is False and plain["geometry"]["full_res"] is None
    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,mask,prompt,preserve_outside\n{files['RGB']},{files['full_mask']},x,maybe\n")
    refused = cli(*simulate_argv(None, tmp_path / "c2", "--cohort", bad, model=tiny_model, prompt=None))
    assert refused.exit_code == 2
    assert f"--cohort {bad} row 2: preserve_outside 'maybe' is not a valid value." in refused.stderr
