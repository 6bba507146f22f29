"""`pie evaluate` and `pie export-gif` on pie's own --trajectories runs and --cohort folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import PROMPT, phantom_run, pixels, simulate_argv

K, STEPS = 3, 2


@pytest.fixture(scope="module")
def trajectory_run(tmp_path_factory, tiny_model, phantom) -> Path:
    return phantom_run(
        tmp_path_factory.mktemp("traj"), tiny_model, phantom, "--trajectories", str(K), steps=STEPS
    )


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory, tiny_model, phantom) -> Path:
    from tests.conftest import Cli

    folder = tmp_path_factory.mktemp("cohort")
    image, _, left = phantom
    image.save(folder / "chest.png")
    left.save(folder / "left.png")
    rows = [
        {"image": folder / "chest.png", "mask": folder / "left.png", "prompt": PROMPT, "out": "b-case"},
        {
            "image": folder / "chest.png",
            "mask": folder / "left.png",
            "prompt": PROMPT,
            "out": "a-case",
            "trajectories": 2,
        },
        {"image": folder / "chest.png", "prompt": "small left pleural effusion", "out": "c-case", "seed": 5},
    ]
    cases = folder / "cases.csv"
    with open(cases, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "mask", "prompt", "out", "trajectories", "seed"])
        writer.writeheader()
        writer.writerows(rows)
    out = folder / "cohort"
    argv = simulate_argv(None, out, "--cohort", cases, model=tiny_model, prompt=None, steps=STEPS)
    result = Cli()(*argv)
    assert result.exit_code == 0, result.output
    return out


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def test_a_trajectory_run_is_evaluated_per_trajectory_and_aggregated(cli, trajectory_run):
    result = cli("evaluate", trajectory_run, "--classifier", "demo")
    assert result.exit_code == 0, result.output
    assert f"{K} trajectories of {STEPS + 1} frames each" in result.stderr
    for j in range(K):
        assert (trajectory_run / f"traj_{j:02d}" / "metrics.json").is_file()
    data = json.loads((trajectory_run / "metrics.json").read_text())
    assert data["kind"] == "trajectories" and data["summary"]["trajectories"] == K
    per_traj = [json.loads((trajectory_run / f"traj_{j:02d}" / "metrics.json").read_text()) for j in range(K)]
    # mean and sd per step are those of the trajectories' own per-frame values
    for i in range(STEPS + 1):
        values = [t["frames"][i]["change_in_mask"] for t in per_traj]
        assert data["per_step"]["change_in_mask"]["mean"][i] == pytest.approx(np.mean(values), abs=1e-5)
        assert data["per_step"]["change_in_mask"]["sd"][i] == pytest.approx(np.std(values, ddof=1), abs=1e-5)
        assert data["per_step"]["severity"]["mean"][i] == pytest.approx(
            np.mean([t["frames"][i]["severity"] for t in per_traj]), abs=1e-5
        )
    assert data["per_step"]["psnr_outside"]["mean"][0] is None  # frame 0 has no PSNR: no stand-in
    finals = [t["summary"]["final_change_in_mask"] for t in per_traj]
    assert data["summary"]["aggregate"]["final_change_in_mask"]["mean"] == pytest.approx(
        np.mean(finals), abs=1e-4
    )
    with open(trajectory_run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["trajectory"] for r in rows] == [
        f"traj_{j:02d}" for j in range(K) for _ in range(STEPS + 1)
    ] + ["mean"] * (STEPS + 1) + ["sd"] * (STEPS + 1)
    assert rows[0]["psnr_outside"] == ""
    report = Image.open(trajectory_run / "report.png")
    assert report.width >= 64 and report.height > (K + 1) * 80  # K rows of frames and the spread row


def test_the_spread_row_is_the_per_pixel_sd_on_the_colour_scale(trajectory_run):
    from pie_cli.evaluation.report import colour_scale, uncertainty_maps

    grid = [
        [Image.open(p) for p in sorted((trajectory_run / f"traj_{j:02d}").glob("frame_*.png"))]
        for j in range(K)
    ]
    maps, top = uncertainty_maps(grid)
    last = np.stack([grey(trajectory_run / f"traj_{j:02d}" / f"frame_{STEPS:03d}.png") for j in range(K)])
    assert np.allclose(maps[-1], last.std(axis=0, ddof=1))
    assert np.all(maps[0] == 0)  # frame 0 is the same input in every trajectory
    assert top == pytest.approx(max(m.max() for m in maps))
    ends = colour_scale(np.array([0.0, 1.0]))
    assert ends.tolist() == [[68, 1, 84], [253, 231, 37]]


def test_a_cohort_is_evaluated_per_case_in_its_order(cli, cohort_run):
    result = cli("evaluate", cohort_run)
    assert result.exit_code == 0, result.output
    data = json.loads((cohort_run / "metrics.json").read_text())
    cases = [r["case"] for r in data["cases"]]
    assert cases == ["b-case", "a-case", "c-case", "mean", "sd"]  # cohort_summary.csv's order
    assert [r.get("trajectories") for r in data["cases"][:3]] == [1, 2, 1]
    b = json.loads((cohort_run / "b-case" / "metrics.json").read_text())["summary"]
    a = json.loads((cohort_run / "a-case" / "metrics.json").read_text())["summary"]
    assert data["cases"][0]["final_change_in_mask"] == b["final_change_in_mask"]
    assert data["cases"][1]["final_change_in_mask"] == a["aggregate"]["final_change_in_mask"]["mean"]
    c = json.loads((cohort_run / "c-case" / "metrics.json").read_text())["summary"]
    values = [
        b["final_change_in_mask"],
        a["aggregate"]["final_change_in_mask"]["mean"],
        c["final_change_in_mask"],
    ]
    assert data["summary"]["aggregate"]["final_change_in_mask"]["mean"] == pytest.approx(
        np.mean(values), abs=1e-5
    )
    assert (
        "min_psnr_outside" not in data["summary"]["aggregate"]
    )  # c-case has no mask: not averaged, not guessed
    assert (cohort_run / "a-case" / "traj_01" / "metrics.json").is_file()


def test_an_unfinished_case_is_listed_not_evaluated(cli, cohort_run, tmp_path):
    import shutil

    copy = tmp_path / "cohort"
    shutil.copytree(cohort_run, copy)
    manifest = json.loads((copy / "c-case" / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    (copy / "c-case" / "manifest.json").write_text(json.dumps(manifest))
    result = cli("evaluate", copy)
    assert result.exit_code == 0, result.output
    data = json.loads((copy / "metrics.json").read_text())
    assert data["cases"][2] == {"case": "c-case", "status": "not evaluated (interrupted)"}
    assert data["summary"]["cases"] == 2 and data["summary"]["not_evaluated"] == 1


def test_a_users_metrics_file_in_a_trajectory_run_is_never_replaced(cli, trajectory_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trajectory_run, copy)
    (copy / "metrics.csv").write_text("mine\n")
    for j in range(K):
        (copy / f"traj_{j:02d}" / "metrics.json").unlink(missing_ok=True)
    result = cli("evaluate", copy)
    assert result.exit_code == 2
    assert "holds metrics.csv, which pie did not write" in result.stderr
    assert (copy / "metrics.csv").read_text() == "mine\n"
    assert not (copy / "traj_00" / "metrics.json").exists()  # refused before anything was written


def test_export_gif_tiles_trajectories_and_writes_the_k_by_n_grid(cli, trajectory_run, tmp_path):
    gif, png = tmp_path / "all.gif", tmp_path / "grid.png"
    result = cli("export-gif", trajectory_run, "--out", gif, "--hold-last-ms", "0")
    assert result.exit_code == 0, result.output
    anim = Image.open(gif)
    assert anim.n_frames == STEPS + 1 and anim.size == (K * 64, 64)
    result = cli("export-gif", trajectory_run, "--out", png)
    assert result.exit_code == 0, result.output
    sheet = Image.open(png)
    assert sheet.size == ((STEPS + 1) * 64, K * 64)
    # Row j, column n is trajectory j's frame n (away from the label in the corner).
    for j in range(K):
        for n in range(STEPS + 1):
            tile = pixels(sheet.crop((n * 64, j * 64, (n + 1) * 64, (j + 1) * 64)))
            frame = pixels(Image.open(trajectory_run / f"traj_{j:02d}" / f"frame_{n:03d}.png"))
            assert np.array_equal(tile[32:], frame[32:])


def test_export_gif_of_a_cohort_shows_each_finished_case(cli, cohort_run, tmp_path):
    out = tmp_path / "cohort.gif"
    result = cli("export-gif", cohort_run, "--out", out, "--columns", "2")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (2 * 64, 2 * 64)
    assert "3 runs x 3 frames" in result.stderr
