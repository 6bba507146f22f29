"""The outside of the mask that `pie evaluate` measures: it keeps the SSIM window's reach (5 px) from
every mask pixel, so an edit inside never leaks into PSNR/SSIM/drift outside; 8-bit RGB, 8-bit grey and
16-bit grey frames of any shape."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pie_cli.evaluation.metrics import (
    OUTSIDE,
    WINDOW_RADIUS,
    dilate_square,
    frame_metrics,
    outside_of,
    ssim_map,
    summarise,
)


def grey_frames(arrays: list[np.ndarray]) -> list[Image.Image]:
    return [Image.fromarray(a.astype(np.uint8), "L") for a in arrays]


def sixteen_bit(arrays: list[np.ndarray]) -> list[Image.Image]:
    images = [Image.fromarray(a.astype(np.uint16)) for a in arrays]
    assert all(img.mode == "I;16" for img in images)
    return images


def texture(shape: tuple[int, int], seed: int = 0, low: int = 30, high: int = 220) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.int64)


def write_run(root: Path, frames: list[Image.Image], mask: np.ndarray | None = None) -> Path:
    root.mkdir(parents=True)
    for k, img in enumerate(frames):
        img.save(root / f"frame_{k:03d}.png")
    if mask is not None:
        Image.fromarray(mask.astype(np.uint8), "L").save(root / "mask.png")
    return root


def evaluate(cli, run: Path) -> dict:
    result = cli("evaluate", run, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_outside_is_the_mask_dilated_by_a_square_of_the_window_radius():
    rng = np.random.default_rng(4)
    mask = rng.random((23, 31)) > 0.97
    mask[0, 30] = mask[22, 0] = True  # at the border: the square is cut there, nothing wraps
    brute = np.zeros_like(mask)
    r = WINDOW_RADIUS
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            brute[y, x] = mask[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].any()
    assert np.array_equal(dilate_square(mask), brute)
    assert np.array_equal(outside_of(mask.astype(np.uint8) * 3), ~brute)  # any value > 0 is mask
    assert not dilate_square(np.zeros((4, 5), dtype=bool)).any()
    assert str(WINDOW_RADIUS) in OUTSIDE


def test_an_edit_inside_the_mask_does_not_leak_outside(cli, tmp_path):
    base = texture((48, 48))
    mask = np.zeros((48, 48), dtype=bool)
    mask[14:34, 14:34] = True
    arrays = [base.copy() for _ in range(3)]
    arrays[1][mask] = np.clip(arrays[1][mask] + 30, 0, 255)
    arrays[2][mask] = 255 - arrays[2][mask]
    frames = grey_frames(arrays)
    metrics = frame_metrics(frames, mask)
    for m in metrics:
        assert m.psnr_outside is None  # identical outside (and frame 0 is the reference)
        assert m.ssim_outside == pytest.approx(1.0, abs=1e-12)
        assert m.drift_outside == 0.0 and m.max_abs_outside == 0.0
    assert metrics[2].change_in_mask > 0
    # Why the erosion matters: measured on every pixel outside the mask, SSIM would have seen the edit.
    ref, cur = (np.asarray(f, dtype=np.float64) for f in (frames[0], frames[2]))
    assert ssim_map(cur, ref)[~mask].mean() < 0.99
    summary = summarise(metrics)
    assert summary["identical_outside"] == 2 and summary["max_drift_outside"] == 0.0
    assert summary["final_drift_outside"] == 0.0 and summary["max_abs_outside"] == 0.0
    assert "min_psnr_outside" not in summary

    data = evaluate(cli, write_run(tmp_path / "run", frames, mask.astype(np.uint8) * 255))
    assert data["outside"] == OUTSIDE
    assert data["outside_pixels"] == 48 * 48 - 30 * 30  # the 20 x 20 mask grown by 5 px on each side
    assert [f["drift_outside"] for f in data["frames"]] == [0.0, 0.0, 0.0]
    assert [f["max_abs_outside"] for f in data["frames"]] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("dy", "dx", "counted"), [(0, 5, False), (0, 6, True), (5, 5, False), (6, 5, True)])
def test_the_boundary_is_exactly_the_window_radius(dy, dx, counted):
    base = texture((40, 40), seed=1)
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 10:20] = True
    changed = base.copy()
    y, x = 19 + dy, 19 + dx  # dy, dx pixels below and right of the mask's corner pixel (19, 19)
    changed[y, x] += 7
    metrics = frame_metrics(grey_frames([base, changed]), mask)
    area = int(outside_of(mask).sum())
    assert area == 40 * 40 - 20 * 20
    if counted:
        assert metrics[1].drift_outside == pytest.approx(7 / area, rel=1e-12)
        assert metrics[1].max_abs_outside == 7.0
        assert metrics[1].psnr_outside == pytest.approx(10 * np.log10(255**2 * area / 49), rel=1e-12)
        assert metrics[1].ssim_outside < 1.0
    else:
        assert metrics[1].drift_outside == 0.0 and metrics[1].max_abs_outside == 0.0
        assert metrics[1].psnr_outside is None
        # Not a mask pixel, so the windows of outside pixels near it still see it: a change of the
        # image outside the mask (the mask's own pixels are what no window reaches).
        assert metrics[1].ssim_outside < 1.0


def test_a_partial_strength_grey_counts_as_mask(cli, tmp_path):
    base = texture((40, 52), seed=2)
    mask = np.zeros((40, 52), dtype=np.uint8)
    mask[12:28, 12:28] = 255
    mask[12:28, 28:32] = 40  # a faint ramp: not "inside" (< 128), but the edit may reach it
    changed = base.copy()
    changed[20, 36] += 9  # 5 px right of the ramp's last column: not outside
    changed[20, 38] += 3  # 7 px right of it: outside
    data = evaluate(cli, write_run(tmp_path / "run", grey_frames([base, changed]), mask))
    area = 40 * 52 - 26 * 30
    assert data["outside_pixels"] == area
    assert data["frames"][1]["drift_outside"] == pytest.approx(3 / area, rel=1e-12)
    assert data["frames"][1]["max_abs_outside"] == 3.0


def test_sixteen_bit_frames_keep_their_depth(cli, tmp_path):
    # Grey levels well above 255 in 16 bits: an 8-bit reading (convert("L")) clips them all to 255.
    base = texture((36, 44), seed=3, low=20000, high=60000)
    mask = np.zeros((36, 44), dtype=np.uint8)
    mask[8:20, 8:20] = 255
    one = base.copy()
    one[30, 40] += 1  # one unit of 65535, outside
    inside = one.copy()
    inside[10:18, 10:18] += 5000
    frames = sixteen_bit([base, one, inside])
    area = 36 * 44 - 22 * 22
    metrics = frame_metrics(frames, mask > 0)
    for m in metrics[1:]:
        assert m.drift_outside == pytest.approx(1 / 257 / area, rel=1e-12)
        assert m.max_abs_outside == pytest.approx(1 / 257, rel=1e-12)
        assert m.psnr_outside == pytest.approx(10 * np.log10(255**2 * area * 257**2), rel=1e-12)
    assert metrics[2].change_in_mask == pytest.approx(5000 / 257 * 64 / 144, rel=1e-12)
    summary = summarise(metrics)
    assert summary["identical_outside"] == 0  # not lost to rounding either
    assert summary["max_drift_outside"] == pytest.approx(1 / 257 / area, rel=1e-5)

    run = write_run(tmp_path / "run", frames, mask)
    from pie_cli.imaging.media import open_image

    assert open_image(run / "frame_001.png").mode == "I;16"  # as pie reads it, whatever Pillow's own mode
    data = evaluate(cli, run)
    assert data["frames"][1]["drift_outside"] == pytest.approx(1 / 257 / area, rel=1e-12)
    assert data["frames"][2]["change_in_mask"] == pytest.approx(5000 / 257 * 64 / 144, rel=1e-12)
    assert data["summary"]["final_drift_outside"] > 0
    assert (run / "report.png").is_file() and (run / "report.html").is_file()


@pytest.mark.parametrize(("kind", "shape"), [("RGB", (56, 40)), ("L", (40, 66)), ("I;16", (61, 51))])
def test_non_square_frames_of_every_depth(cli, tmp_path, kind, shape):
    h, w = shape
    base = texture(shape, seed=5)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[5:20, 5:15] = 255
    moved = base.copy()
    moved[h - 10 :, w - 10 :] += 4  # outside: 100 pixels
    if kind == "RGB":
        frames = [Image.fromarray(np.stack([a] * 3, axis=2).astype(np.uint8), "RGB") for a in (base, moved)]
    elif kind == "L":
        frames = grey_frames([base, moved])
    else:
        frames = sixteen_bit([base * 257, moved * 257])  # 4 grey levels = 4 * 257 units of 65535
    run = write_run(tmp_path / "run", frames, mask)
    data = evaluate(cli, run)
    area = h * w - 25 * 20  # rows 0-24, columns 0-19: the mask grown by 5 px, cut at the border
    assert data["outside_pixels"] == area
    assert data["frames"][1]["drift_outside"] == pytest.approx(4 * 100 / area, rel=1e-12)
    assert data["frames"][1]["max_abs_outside"] == pytest.approx(4.0, rel=1e-12)
    report = Image.open(run / "report.png")
    assert report.mode == "RGB" and report.width > 0


def test_no_outside_left_after_the_erosion(cli, tmp_path):
    base = texture((30, 34), seed=6)
    mask = np.zeros((30, 34), dtype=np.uint8)
    mask[4:26, 4:30] = 255  # every pixel is within 5 px of it
    changed = base.copy()
    changed[0, 0] += 10
    frames = grey_frames([base, changed])
    metrics = frame_metrics(frames, mask > 0)
    for m in metrics:
        assert m.psnr_outside is m.ssim_outside is m.drift_outside is m.max_abs_outside is None
    summary = summarise(metrics)
    assert not any("outside" in key for key in summary)

    run = write_run(tmp_path / "run", frames, mask)
    result = cli("evaluate", run)
    assert result.exit_code == 0, result.output
    assert "nothing outside to measure" in result.stderr
    data = json.loads((run / "metrics.json").read_text())
    assert data["outside_pixels"] == 0 and data["outside"] == OUTSIDE
    rows = csv_rows(run)
    for column in ("psnr_outside", "ssim_outside", "drift_outside", "max_abs_outside"):
        assert [r[column] for r in rows] == ["", ""]


def test_metrics_csv_has_the_drift_columns(cli, tmp_path):
    base = texture((32, 32), seed=7)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :10] = 255
    moved = base.copy()
    moved[:, 20:] += 2  # columns 15-31 are outside; 12 of the 17 changed by 2
    run = write_run(tmp_path / "run", grey_frames([base, moved]), mask)
    result = cli("evaluate", run)
    assert result.exit_code == 0, result.output
    assert "1.41" in result.stdout.splitlines()[-1]  # the table's drift column
    assert "drift <= 1.41 grey levels (final 1.41), largest |difference| 2" in result.stderr
    rows = csv_rows(run)
    header = list(rows[0])
    assert header.index("ssim_outside") < header.index("drift_outside") < header.index("max_abs_outside")
    assert rows[0]["psnr_outside"] == "" and float(rows[0]["drift_outside"]) == 0.0
    assert float(rows[1]["drift_outside"]) == pytest.approx(2 * 12 / 17)
    assert float(rows[1]["max_abs_outside"]) == 2.0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Drift outside the mask" in page and "dilated by 5 px" in page

    no_mask = write_run(tmp_path / "plain", grey_frames([base, moved]))
    data = evaluate(cli, no_mask)
    assert data["outside"] is None and data["outside_pixels"] is None
    assert [r["drift_outside"] for r in csv_rows(no_mask)] == ["", ""]
