"""Batched trajectories, per-step schedules and cohorts through `pie simulate`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import pixels, simulate_argv

FAST = {"steps": 2, "inference_steps": 6}  # at 64 px on the CPU (simulate_argv)


def cohort_argv(cohort: Path, out: Path, *extra, model) -> list:
    return simulate_argv(None, out, "--cohort", cohort, *extra, model=model, prompt=None, **FAST)


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

    # --overwrite with fewer trajectories leaves no stale traj_ folders behind
    result = cli(
        *simulate_argv(inputs["image"], out, "--overwrite", model=tiny_model, prompt="effusion", **FAST)
    )
    assert result.exit_code == 0
    assert not any(p.name.startswith("traj_") for p in out.iterdir())


def test_schedules(cli, inputs, tiny_model, tmp_path):
    schedule = tmp_path / "reports.txt"
    schedule.write_text(
        "# a report per step\n1: small left pleural effusion\n2: large left pleural effusion\n"
    )
    out = tmp_path / "run"
    result = cli(
        *simulate_argv(
            inputs["image"],
            out,
            "--prompt-schedule",
            schedule,
            "--strength-schedule",
            "0.4:0.6",
            "--guidance-schedule",
            "5,9",
            model=tiny_model,
            mask=inputs["mask"],
            prompt=None,
            **FAST,
        )
    )
    assert result.exit_code == 0, result.output
    params = json.loads((out / "manifest.json").read_text())["parameters"]
    assert params["prompts"] == ["small left pleural effusion", "large left pleural effusion"]
    assert params["strengths"] == [0.4, 0.6] and params["guidance_scales"] == [5.0, 9.0]

    (tmp_path / "one.txt").write_text("only one\n")
    for args, message in (
        (["--prompt-schedule", tmp_path / "one.txt"], "has 1 prompts but --steps is 2"),
        (
            ["--prompt", "x", "--strength-schedule", "0.1,0.2,0.3"],
            "--strength-schedule '0.1,0.2,0.3' has 3 values",
        ),
        (
            ["--prompt", "x", "--guidance-schedule", "a:b"],
            "must be a comma list of numbers or a START:END ramp",
        ),
        (
            ["--prompt", "x", "--strength-schedule", "0.5:1.5"],
            "--strength-schedule must be in (0, 1], got 1.5.",
        ),
    ):
        result = cli(
            *simulate_argv(inputs["image"], tmp_path / "bad", *args, model=tiny_model, prompt=None, **FAST)
        )
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr
        assert not (tmp_path / "bad").exists()


def write_cohort(tmp_path: Path, inputs, rows: list[dict]) -> Path:
    path = tmp_path / "cases.csv"
    columns = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_cohort_runs_each_case_once_and_resumes(cli, inputs, tiny_model, tmp_path):
    rows = [
        {"image": str(inputs["image"]), "mask": str(inputs["mask"]), "prompt": "small effusion", "out": "a"},
        {"image": str(inputs["image"]), "prompt": "large effusion", "out": "b", "seed": "7", "steps": "1"},
        {
            "image": str(inputs["image"]),
            "mask": str(inputs["mask"]),
            "prompt": "effusion",
            "out": "c",
            "guidance-scale": "3",
        },
    ]
    cohort = write_cohort(tmp_path, inputs, rows)
    out = tmp_path / "cohort"
    result = cli(*cohort_argv(cohort, out, model=tiny_model))
    assert result.exit_code == 0, result.output
    with open(out / "cohort_summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert [(r["case"], r["status"]) for r in summary] == [
        ("a", "complete"),
        ("b", "complete"),
        ("c", "complete"),
    ]
    b = json.loads((out / "b" / "manifest.json").read_text())["parameters"]
    assert (b["seed"], b["steps"]) == (7, 1)
    a = json.loads((out / "a" / "manifest.json").read_text())["parameters"]
    c = json.loads((out / "c" / "manifest.json").read_text())["parameters"]
    assert a["seed"] == 42 and c["seed"] == 44 and c["guidance_scale"] == 3.0  # --seed + row index

    manifest = out / "c" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["status"] = "interrupted"
    manifest.write_text(json.dumps(data))
    frame = (out / "a" / "frame_002.png").read_bytes()
    result = cli(*cohort_argv(cohort, out, model=tiny_model))
    assert result.exit_code == 0, result.output
    with open(out / "cohort_summary.csv") as fh:
        statuses = [r["status"] for r in csv.DictReader(fh)]
    assert statuses == ["skipped (complete)", "skipped (complete)", "complete"]
    assert (out / "a" / "frame_002.png").read_bytes() == frame


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"image": "missing.png", "prompt": "x"}], "row 2: image"),
        ([{"image": "{img}", "prompt": "x", "colour": "red"}], "unknown column 'colour'"),
        ([{"image": "{img}", "prompt": "x", "steps": "many"}], "row 2: steps 'many' is not a valid value"),
        ([{"image": "{img}", "prompt": "x"}, {"image": "{img}", "prompt": "y"}], "both write to 'chest'"),
    ],
)
def test_bad_cohorts(cli, inputs, tiny_model, tmp_path, rows, message):
    rows = [{k: v.format(img=inputs["image"]) for k, v in r.items()} for r in rows]
    cohort = write_cohort(tmp_path, inputs, rows)
    result = cli(*cohort_argv(cohort, tmp_path / "out", model=tiny_model))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_cohort_split_is_a_partition_with_stable_seeds():
    from pie_cli.simulate.cohort import Case, split

    cases = [Case(i, i + 2, f"c{i}", {}) for i in range(10)]
    for world in (1, 2, 3, 4):
        parts = [split(cases, rank, world) for rank in range(world)]
        names = [c.name for part in parts for c in part]
        assert sorted(names) == sorted(c.name for c in cases) and len(names) == len(set(names))
        assert all(
            c.index == int(c.name[1:]) for part in parts for c in part
        )  # seeds follow the row, not the rank


def test_a_cohort_split_over_two_processes_gives_the_same_outputs(cli, inputs, tiny_model, tmp_path):
    """torchrun with 2 CPU processes (what `accelerate launch` uses under the hood on GPUs)."""
    import os
    import subprocess
    import sys

    rows = [
        {"image": str(inputs["image"]), "mask": str(inputs["mask"]), "prompt": p, "out": name}
        for name, p in (("a", "small effusion"), ("b", "large effusion"), ("c", "effusion"))
    ]
    cohort = write_cohort(tmp_path, inputs, rows)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1): the same float order
    try:
        assert cli(*cohort_argv(cohort, tmp_path / "one", "--steps", "2", model=tiny_model)).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29571", "-m", "pie_cli", "--progress", "off"]
        + [str(a) for a in cohort_argv(cohort, tmp_path / "two", "--steps", "2", model=tiny_model)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("cohort: ") == 2  # both processes ran cases
    with open(tmp_path / "two" / "cohort_summary.csv") as fh:
        assert [(r["case"], r["status"]) for r in csv.DictReader(fh)] == [
            ("a", "complete"),
            ("b", "complete"),
            ("c", "complete"),
        ]
    assert not list((tmp_path / "two").glob("cohort_summary.rank*.csv"))
    for case in "abc":
        one = sorted((tmp_path / "one" / case).glob("frame_*.png"))
        two = sorted((tmp_path / "two" / case).glob("frame_*.png"))
        assert len(one) == len(two) == 3
        for x, y in zip(one, two, strict=True):
            diff = np.abs(
                np.asarray(Image.open(x), dtype=np.int16) - np.asarray(Image.open(y), dtype=np.int16)
            )
            assert diff.max() == 0, f"{case}/{x.name} differs by {diff.max()}"
