"""`pie simulate --cohort CSV`: one case per row, resumable, split over processes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pie_cli.evaluation.evaluate import headline as evaluate_headline
from tests.helpers import frames_of, manifest, reset_signals, simulate_argv

FAST = {"steps": 2, "inference_steps": 6}  # at 64 px on the CPU (simulate_argv)


def cohort_argv(cohort: Path, out: Path, *extra, model) -> list:
    return simulate_argv(None, out, "--cohort", cohort, *extra, model=model, prompt=None, **FAST)


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
    assert [(r["seed"], r["prompts"]) for r in summary] == [
        ("42", "small effusion"),
        ("7", "large effusion"),
        ("44", "effusion"),
    ]
    for r in summary:  # the headline measures of each case's frames, as pie evaluate computes them
        measured = json.loads(json.dumps(evaluate_headline(out / r["case"])))
        assert {k: float(r[k]) for k in measured} == pytest.approx(measured)
        assert float(r["final_change_in_mask"]) > 0
    assert summary[1]["steps_to_90"] == "1" and summary[1]["first_step_share"] == "1.0"  # one step
    assert summary[1]["min_psnr_outside"] == ""  # no mask: no outside
    assert 0 < float(summary[0]["min_psnr_outside"]) < 99
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
    ("change", "message"),
    [
        ({"strength": "0.6"}, "strength 0.5 -> 0.6"),
        ({"beta2-schedule": "0.2:0.8"}, "--beta2-schedule [] -> [0.2, 0.8]"),
        ({"prompt": "large effusion"}, "prompt 'small effusion' -> 'large effusion'"),
    ],
)
def test_a_cohort_rerun_with_other_settings_refuses_or_reruns(
    cli, inputs, tiny_model, tmp_path, change, message
):
    """A complete case is skipped only when its manifest holds the same settings; else refused, or rerun."""
    row = {"image": str(inputs["image"]), "mask": str(inputs["mask"]), "prompt": "small effusion", "out": "a"}
    out = tmp_path / "cohort"
    assert cli(*cohort_argv(write_cohort(tmp_path, inputs, [row]), out, model=tiny_model)).exit_code == 0
    frames = {p.name: p.read_bytes() for p in (out / "a").glob("frame_*.png")}
    cohort = write_cohort(tmp_path, inputs, [{**row, **change}])
    result = cli(*cohort_argv(cohort, out, model=tiny_model))
    assert result.exit_code == 2, result.output
    assert f"case a is complete in {out / 'a'} with other settings ({message}); pass --overwrite" in " ".join(
        result.stderr.split()
    )
    assert {p.name: p.read_bytes() for p in (out / "a").glob("frame_*.png")} == frames  # nothing touched
    result = cli(*cohort_argv(cohort, out, "--overwrite", model=tiny_model))
    assert result.exit_code == 0, result.output
    with open(out / "cohort_summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["complete"]
    assert {p.name: p.read_bytes() for p in (out / "a").glob("frame_*.png")} != frames
    # Run again with the new settings: now they match, the case is skipped.
    result = cli(*cohort_argv(cohort, out, model=tiny_model))
    assert result.exit_code == 0, result.output
    with open(out / "cohort_summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["skipped (complete)"]


def test_a_schedule_spelled_otherwise_is_the_same_schedule(cli, inputs, tiny_model, tmp_path):
    row = {"image": str(inputs["image"]), "prompt": "effusion", "out": "a", "strength-schedule": "0.4:0.6"}
    out = tmp_path / "cohort"
    assert cli(*cohort_argv(write_cohort(tmp_path, inputs, [row]), out, model=tiny_model)).exit_code == 0
    cohort = write_cohort(tmp_path, inputs, [{**row, "strength-schedule": "0.4,0.6"}])
    result = cli(*cohort_argv(cohort, out, model=tiny_model))
    assert result.exit_code == 0, result.output
    with open(out / "cohort_summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["skipped (complete)"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"image": "missing.png", "prompt": "x"}], "row 2: image"),
        ([{"image": "{img}", "prompt": "x", "colour": "red"}], "unknown column 'colour'"),
        ([{"image": "{img}", "prompt": "x", "steps": "many"}], "row 2: steps 'many' is not a valid value"),
        (
            [{"image": "{img}", "prompt": "x", "out": "a"}, {"image": "{img}", "prompt": "y", "out": "a"}],
            "both write to 'a'",
        ),
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
        preexec_fn=reset_signals,
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


def test_an_interrupted_cohort_goes_on_where_it_stopped(cli, tiny_model, inputs, tmp_path, monkeypatch):
    import csv

    from pie_cli.runs.writer import RunWriter

    cohort = tmp_path / "cases.csv"
    with open(cohort, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "mask", "prompt", "out"])
        writer.writerow([inputs["image"], inputs["mask"], "small effusion", "a"])
        writer.writerow([inputs["image"], inputs["mask"], "large effusion", "b"])

    def run(out):
        return simulate_argv(
            None, out, "--cohort", cohort, model=tiny_model, prompt=None, steps=3, inference_steps=20, seed=7
        )

    assert cli(*run(tmp_path / "whole")).exit_code == 0

    original = RunWriter.write_frame

    def write_frame(self, n, *a, **k):
        original(self, n, *a, **k)
        if self.path.name == "b" and n == 1:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(RunWriter, "write_frame", write_frame)
        result = cli(*run(out))
    assert result.exit_code == 130
    assert "interrupted during cohort case b" in result.stderr and "Rerun the same command" in result.stderr
    with open(out / "cohort_summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["complete", "interrupted"]
    result = cli(*run(out))
    assert result.exit_code == 0, result.output
    with open(out / "cohort_summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["skipped (complete)", "complete"]
    assert manifest(out / "b")["resumed"][0]["after_step"] == 1
    for case in ("a", "b"):
        got, want = frames_of(out / case), frames_of(tmp_path / "whole" / case)
        assert len(got) == 4 and all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))
