"""`pie export-gif`: formats, frame counts and durations, panels, captions, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pie_cli.imaging.animation import sequence
from pie_cli.imaging.annotate import HEAT_LUT, OUTLINE_RGB, caption_box
from tests.helpers import simulate_argv

W, H = 48, 32


def run_dir(tmp_path: Path, count: int = 4, names=None, repeat_last=False) -> Path:
    """A fake run directory: distinct grey frames (frame k has level 40 + 30 k in its left half) and a mask."""
    d = tmp_path / "run"
    d.mkdir()
    for k in range(count):
        arr = np.full((H, W, 3), 90, dtype=np.uint8)
        level = 40 + 30 * (min(k, count - 2) if repeat_last else k)
        arr[:, : W // 2] = level
        name = names[k] if names else f"frame_{k:03d}.png"
        Image.fromarray(arr).save(d / name)
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[8:24, 8:20] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return d


def gif_frames(path: Path) -> tuple[list[np.ndarray], list[int], dict]:
    img = Image.open(path)
    frames, durations = [], []
    for i in range(img.n_frames):
        img.seek(i)
        frames.append(np.asarray(img.convert("RGB")).astype(np.int16))
        durations.append(img.info["duration"])
    img.seek(0)
    return frames, durations, dict(img.info)


def export(cli, *args):
    return cli("export-gif", *[str(a) for a in args])


def test_gif_keeps_every_frame_duration_and_loop(cli, tmp_path):
    src = run_dir(tmp_path, count=5, repeat_last=True)  # the last two frames are identical
    out = tmp_path / "a.gif"
    result = export(cli, src, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    frames, durations, info = gif_frames(out)
    assert len(frames) == 5 and durations == [500, 500, 500, 500, 1500] and info["loop"] == 0
    for k, frame in enumerate(frames):  # grey frames survive exactly (grey palette)
        original = np.asarray(Image.open(src / f"frame_{k:03d}.png")).astype(np.int16)
        assert np.array_equal(frame, original)
    result = export(
        cli, src, "--out", tmp_path / "b.gif", "--duration-ms", "200", "--hold-last-ms", "0", "--loop", "3"
    )
    assert result.exit_code == 0
    _, durations, info = gif_frames(tmp_path / "b.gif")
    assert durations == [200] * 5 and info["loop"] == 3


def test_frames_are_ordered_numerically(cli, tmp_path):
    names = ["frame_0.png", "frame_2.png", "frame_10.png", "frame_9.png"]
    src = run_dir(tmp_path, count=4, names=names)  # levels by position: 40, 70, 100, 130
    assert export(cli, src, "--out", tmp_path / "o.gif").exit_code == 0
    frames, _, _ = gif_frames(tmp_path / "o.gif")
    assert [int(f[0, 0, 0]) for f in frames] == [40, 70, 130, 100]  # 0, 2, 9, 10


def test_explicit_frame_files_in_the_given_order(cli, tmp_path):
    src = run_dir(tmp_path, count=3)
    files = [src / "frame_002.png", src / "frame_000.png"]
    assert export(cli, *files, "--out", tmp_path / "o.gif", "--caption", "{i}/{n}").exit_code == 0
    frames, durations, _ = gif_frames(tmp_path / "o.gif")
    assert len(frames) == 2 and durations == [500, 1500]


def test_sequence_every_and_bounce():
    assert sequence(5, every=2) == ([0, 2, 4], 2)
    assert sequence(6, every=2) == ([0, 2, 4, 5], 3)
    assert sequence(4, bounce=True) == ([0, 1, 2, 3, 2, 1], 3)
    assert sequence(1) == ([0], 0)


def test_bounce_holds_the_turning_frame(cli, tmp_path):
    src = run_dir(tmp_path, count=4)
    assert export(cli, src, "--out", tmp_path / "o.gif", "--bounce").exit_code == 0
    frames, durations, _ = gif_frames(tmp_path / "o.gif")
    assert [int(f[0, 0, 0]) for f in frames] == [40, 70, 100, 130, 100, 70]
    assert durations == [500, 500, 500, 1500, 500, 500]


def test_panels_dimensions_and_diff_scale(cli, tmp_path):
    src = run_dir(tmp_path, count=4)
    for flags, width in (
        (["--side-by-side"], 2 * W),
        (["--diff"], 2 * W),
        (["--side-by-side", "--diff"], 3 * W),
    ):
        out = tmp_path / f"{'-'.join(flags)}.gif"
        assert export(cli, src, "--out", out, *flags).exit_code == 0
        frames, _, _ = gif_frames(out)
        assert all(f.shape == (H, width, 3) for f in frames)
    frames, _, _ = gif_frames(tmp_path / "--diff.gif")
    diff0 = frames[0][:, W:]
    assert (diff0 == 0).all()  # frame 0 against itself
    # One colour scale for all frames: frame 3 has the largest change (90 levels) -> top of the ramp,
    # frame 1 has a third of it, anywhere in the changed half.
    assert tuple(frames[3][0, W]) == tuple(HEAT_LUT[255])
    assert tuple(frames[1][0, W]) == tuple(HEAT_LUT[85])
    assert (frames[2][:, W + W // 2 :] == 0).all()  # the unchanged half stays black


def test_caption_changes_only_the_caption_area(cli, tmp_path):
    src = run_dir(tmp_path, count=3)
    assert export(cli, src, "--out", tmp_path / "plain.png").exit_code == 0
    assert export(cli, src, "--out", tmp_path / "cap.png", "--caption", "step {i}/{n}").exit_code == 0
    plain = np.asarray(Image.open(tmp_path / "plain.png")).astype(np.int16)
    cap = np.asarray(Image.open(tmp_path / "cap.png")).astype(np.int16)
    assert plain.shape == cap.shape == (H, 3 * W, 3)
    for k in range(3):
        panel = Image.fromarray(plain[:, k * W : (k + 1) * W].astype(np.uint8))
        x0, y0, x1, y1 = caption_box(panel, f"step {k}/2")
        changed = np.argwhere(
            np.abs(cap[:, k * W : (k + 1) * W] - plain[:, k * W : (k + 1) * W]).sum(axis=2) > 0
        )
        assert len(changed) > 0
        assert changed[:, 0].min() >= y0 and changed[:, 0].max() < y1
        assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1


def test_png_strip_and_grid_dimensions(cli, tmp_path):
    src = run_dir(tmp_path, count=5)
    assert export(cli, src, "--out", tmp_path / "strip.png").exit_code == 0
    assert Image.open(tmp_path / "strip.png").size == (5 * W, H)
    assert export(cli, src, "--out", tmp_path / "grid.png", "--columns", "2").exit_code == 0
    assert Image.open(tmp_path / "grid.png").size == (2 * W, 3 * H)
    assert export(cli, src, "--out", tmp_path / "every.png", "--every", "2", "--resize", "24").exit_code == 0
    assert Image.open(tmp_path / "every.png").size == (3 * 24, 16)


def test_mask_outline(cli, tmp_path):
    src = run_dir(tmp_path, count=2)
    assert export(cli, src, "--out", tmp_path / "o.png", "--mask-outline").exit_code == 0
    sheet = np.asarray(Image.open(tmp_path / "o.png"))
    assert tuple(sheet[8, 10]) == OUTLINE_RGB and tuple(sheet[8, W + 10]) == OUTLINE_RGB
    assert tuple(sheet[16, 14]) != OUTLINE_RGB  # inside the mask, not on its contour
    (src / "mask.png").unlink()
    result = export(cli, src, "--out", tmp_path / "p.png", "--mask-outline")
    assert result.exit_code == 2 and "--mask-outline needs a run directory with mask.png" in result.stderr


def test_webp_frames_and_durations(cli, tmp_path):
    src = run_dir(tmp_path, count=4)
    assert export(cli, src, "--out", tmp_path / "a.webp", "--duration-ms", "250").exit_code == 0
    img = Image.open(tmp_path / "a.webp")
    durations = []
    for i in range(img.n_frames):
        img.seek(i)
        img.load()
        durations.append(img.info["duration"])
    assert img.n_frames == 4 and durations == [250, 250, 250, 1500] and img.info["loop"] == 0


def test_mp4_frames_and_durations(cli, tmp_path):
    av = pytest.importorskip("av")
    src = run_dir(tmp_path, count=3)
    assert export(cli, src, "--out", tmp_path / "a.mp4", "--side-by-side").exit_code == 0
    with av.open(str(tmp_path / "a.mp4")) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert (stream.width, stream.height) == (2 * W, H)
        assert [round(float(f.pts * f.time_base), 3) for f in frames] == [0.0, 0.5, 1.0]
        assert round(float(container.duration / 1e6), 2) == 2.5


def test_mp4_without_the_extra_names_it(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    src = run_dir(tmp_path, count=2)
    result = export(cli, src, "--out", tmp_path / "a.mp4")
    assert result.exit_code == 2
    assert "pip install 'pie-cli[video]'" in result.stderr
    assert not (tmp_path / "a.mp4").exists()


def test_simulate_writes_its_gif_with_the_same_code(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "sim"
    result = cli(
        *simulate_argv(inputs["image"], out, model=tiny_model, mask=inputs["mask"], prompt="x", steps=2)
    )
    assert result.exit_code == 0, result.output
    frames, durations, info = gif_frames(out / "progression.gif")
    assert durations == [500, 500, 1500] and info["loop"] == 0
    assert json.loads((out / "manifest.json").read_text())["outputs"]["gif"] == "progression.gif"


def _sized(path: Path, size) -> Path:
    Image.new("RGB", size).save(path)
    return path


BAD = {
    "unknown extension": (lambda d, s: [s, "--out", d / "a.bmp"], "unknown format '.bmp'"),
    "empty frames dir": (
        lambda d, s: [_empty(d / "empty"), "--out", d / "a.gif"],
        "has no frame_NNN.png files",
    ),
    "missing input": (lambda d, s: [d / "nope", "--out", d / "a.gif"], "does not exist"),
    "unreadable frame": (
        lambda d, s: [_text(d / "f.png"), "--out", d / "a.gif"],
        "is not an image pie can read",
    ),
    "mixed sizes": (
        lambda d, s: [s / "frame_000.png", _sized(d / "big.png", (64, 64)), "--out", d / "a.gif"],
        "frames of one animation must have one size",
    ),
    "bad caption": (
        lambda d, s: [s, "--out", d / "a.gif", "--caption", "{step}"],
        "--caption '{step}' is not a valid template",
    ),
    "bad every": (
        lambda d, s: [s, "--out", d / "a.gif", "--every", "0"],
        "--every must be at least 1, got 0.",
    ),
    "missing out dir": (lambda d, s: [s, "--out", d / "no" / "a.gif"], "does not exist"),
}


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


def _text(path: Path) -> Path:
    path.write_text("text")
    return path


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_export_input_exits_2_and_writes_nothing(cli, tmp_path, case):
    src = run_dir(tmp_path, count=3)
    build, expected = BAD[case]
    args = build(tmp_path, src)
    before = set(tmp_path.rglob("*"))
    result = export(cli, *args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output
    assert set(tmp_path.rglob("*")) == before


def test_existing_output_needs_overwrite(cli, tmp_path):
    src = run_dir(tmp_path, count=2)
    (tmp_path / "a.gif").write_bytes(b"mine")
    result = export(cli, src, "--out", tmp_path / "a.gif")
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.stderr
    assert (tmp_path / "a.gif").read_bytes() == b"mine"
    result = export(cli, src, "--out", tmp_path / "a.gif", "--overwrite")  # not pie's: never replaced
    assert result.exit_code == 2 and "was not written by pie" in result.stderr
    assert (tmp_path / "a.gif").read_bytes() == b"mine"
    assert export(cli, src, "--out", tmp_path / "b.gif").exit_code == 0
    assert export(cli, src, "--out", tmp_path / "b.gif", "--overwrite").exit_code == 0  # pie's own


def test_every_format_says_it_is_synthetic_and_watermark_marks_only_the_corner(cli, tmp_path):
    from pie_cli.imaging.annotate import watermark_box

    src = run_dir(tmp_path, count=3)
    (src / "manifest.json").write_text(json.dumps({"run_id": "0123456789abcdef"}))
    for name in ("a.gif", "a.webp", "a.png"):
        assert export(cli, src, "--out", tmp_path / name).exit_code == 0
    with Image.open(tmp_path / "a.gif") as gif:
        assert "Synthetic image generated by pie" in gif.info["comment"].decode()
        assert "run 0123456789abcdef" in gif.info["comment"].decode()
    with Image.open(tmp_path / "a.webp") as webp:
        assert "synthetic=true" in webp.getexif()[0x010E]
    with Image.open(tmp_path / "a.png") as strip:
        assert strip.text["synthetic"] == "true" and strip.text["pie_run"] == "0123456789abcdef"

    assert export(cli, src, "--out", tmp_path / "m.png", "--watermark").exit_code == 0
    plain = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"), dtype=np.int16)
    marked = np.asarray(Image.open(tmp_path / "m.png").convert("RGB"), dtype=np.int16)
    frame = Image.open(sorted(src.glob("frame_*.png"))[0])
    x0, y0, x1, y1 = watermark_box(frame)
    inside = np.zeros(plain.shape[:2], dtype=bool)
    for k in range(3):  # the strip's three frames side by side, each with its own label
        inside[y0:y1, k * frame.width + x0 : k * frame.width + x1] = True
    assert np.array_equal(plain[~inside], marked[~inside]) and not np.array_equal(
        plain[inside], marked[inside]
    )
