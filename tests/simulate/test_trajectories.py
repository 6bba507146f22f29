"""`pie simulate --trajectories K`: K seeds in one batch, their folders, uncertainty and mean images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import pixels, simulate_argv

FAST = {"steps": 2, "inference_steps": 6}  # at 64 px on the CPU (simulate_argv)


def test_trajectories_layout_and_equality_with_single_runs(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "k3"
    result = cli(
        *simulate_argv(
            inputs["image"],
            out,
            "--trajectories",
            "3",
            model=tiny_model,
            mask=inputs["mask"],
            prompt="effusion",
            seed=10,
            **FAST,
        )
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "traj_00",
        "traj_01",
        "traj_02",
        "manifest.json",
        "mask.png",
        "uncertainty.png",
        "mean_final.png",
        ".pie-files.json",  # one ledger for the whole case, traj_KK/ included
    }
    for k in range(3):
        names = {p.name for p in (out / f"traj_{k:02d}").iterdir()}
        assert names == {
            "frame_000.png",
            "frame_001.png",
            "frame_002.png",
            "mask.png",
            "progression.gif",
            "manifest.json",
        }
        manifest = json.loads((out / f"traj_{k:02d}" / "manifest.json").read_text())
        assert manifest["parameters"]["seed"] == 10 + k and manifest["status"] == "complete"
    top = json.loads((out / "manifest.json").read_text())
    assert top["trajectories"] == ["traj_00", "traj_01", "traj_02"] and top["status"] == "complete"

    single = tmp_path / "single"
    result = cli(
        *simulate_argv(
            inputs["image"], single, model=tiny_model, mask=inputs["mask"], prompt="effusion", seed=11, **FAST
        )
    )
    assert result.exit_code == 0
    for n in range(3):
        a = pixels(Image.open(out / "traj_01" / f"frame_{n:03d}.png"))
        b = pixels(Image.open(single / f"frame_{n:03d}.png"))
        assert np.abs(a - b).max() <= 1

    finals = np.stack([pixels(Image.open(out / f"traj_{k:02d}" / "frame_002.png")) for k in range(3)])
    mean = pixels(Image.open(out / "mean_final.png"))
    assert np.abs(mean - np.round(finals.mean(axis=0))).max() <= 1
    assert Image.open(out / "uncertainty.png").size == (64, 64)

    # A cohort summary's measures of a trajectory case: the mean over its trajectories.
    from pie_cli.evaluation.evaluate import headline

    each = [headline(out / f"traj_{k:02d}") for k in range(3)]
    assert set(headline(out)) == set(each[0]) >= {"final_change_in_mask", "min_psnr_outside", "spearman"}
    for key, value in headline(out).items():
        assert value == pytest.approx(np.mean([e[key] for e in each]), abs=1e-4), key

    # --overwrite with fewer trajectories leaves no stale traj_ folders behind
    result = cli(
        *simulate_argv(inputs["image"], out, "--overwrite", model=tiny_model, prompt="effusion", **FAST)
    )
    assert result.exit_code == 0
    assert not any(p.name.startswith("traj_") for p in out.iterdir())
