"""`pie simulate --pace`: the closed-loop pace through the command line, its record, resume and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pie_cli.demo import classifier as clf
from tests.helpers import frames_of, manifest, simulate_argv

PACE = ("--pace", "linear", "--classifier", "demo")


def paced(tiny_model, inputs, out, *extra, steps=3):
    return simulate_argv(
        inputs["image"], out, *PACE, *extra, model=tiny_model, mask=inputs["mask"], steps=steps
    )


def demo_severity(paths) -> list[float]:
    model = clf.load(clf.builtin_dir())
    column = list(model.labels).index("effusion_left_severity")
    return [float(v) for v in clf.predict(model, [Image.open(p) for p in paths])[:, column]]


def test_a_paced_run_records_its_curve_and_each_frames_choice(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    result = cli(*paced(tiny_model, inputs, out, "--pace-candidates", "0,0.5,1"))
    assert result.exit_code == 0, result.output
    m = manifest(out)
    assert m["pace"]["classifier"] == "demo"
    assert m["pace"]["target"] == "effusion_left"  # named by the prompt
    assert m["pace"]["output"] == "effusion_left_severity"
    assert m["pace"]["candidates"] == [0.0, 0.5, 1.0]
    assert m["parameters"]["pace"] == "linear" and m["parameters"]["classifier"] == "demo"
    frames = sorted(m["frames"], key=lambda f: f["index"])
    assert "pace" not in frames[0]
    scores = demo_severity([out / f["file"] for f in frames])
    targets = [scores[0] + (1 - scores[0]) * n / 3 for n in (1, 2, 3)]
    for n, entry in enumerate(frames[1:], start=1):
        choice = entry["pace"]
        assert choice["beta2"] is None or 0.0 <= choice["beta2"] <= 1.0
        # The recorded score is the demo classifier's score of the frame as saved.
        assert choice["score"] == pytest.approx(scores[n], abs=1e-4)
        assert choice["target"] == pytest.approx(targets[n - 1], abs=1e-4)


def test_an_explicit_curve_and_another_label(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    argv = paced(tiny_model, inputs, out, "--pace", "0.1:0.3", "--target", "cardiomegaly")
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    m = manifest(out)
    assert m["pace"]["target"] == "cardiomegaly" and m["pace"]["output"] == "cardiomegaly_severity"
    assert [f["pace"]["target"] for f in sorted(m["frames"], key=lambda f: f["index"])[1:]] == [0.1, 0.2, 0.3]
    assert len(m["pace"]["candidates"]) == 21  # the default 0:1


def test_paced_trajectories_record_a_choice_each(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    result = cli(*paced(tiny_model, inputs, out, "--trajectories", "2", steps=2))
    assert result.exit_code == 0, result.output
    for traj in ("traj_00", "traj_01"):
        frames = sorted(manifest(out / traj)["frames"], key=lambda f: f["index"])
        assert [("pace" in f) for f in frames] == [False, True, True]


def test_an_interrupted_paced_run_resumes_bit_identical(cli, tiny_model, inputs, tmp_path, monkeypatch):
    from pie_cli.runs.writer import RunWriter

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli(*paced(tiny_model, inputs, whole)).exit_code == 0
    original = RunWriter.write_frame

    def write_frame(self, n, *a, **k):
        original(self, n, *a, **k)
        if n == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RunWriter, "write_frame", write_frame)
        assert cli(*paced(tiny_model, inputs, cut)).exit_code == 130
    # Repeating the command line with another curve is refused, naming the option; nothing changes.
    result = cli("simulate", "--resume", "--out", cut, "--pace", "linear:0.5")
    assert result.exit_code == 2
    assert "--resume: --pace differs from the run in" in result.stderr
    assert manifest(cut)["last_complete_frame"] == 1
    result = cli("simulate", "--resume", "--out", cut)
    assert result.exit_code == 0, result.output
    a, b = frames_of(whole), frames_of(cut)
    assert len(a) == len(b) == 4
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    paces = [
        [f.get("pace") for f in sorted(manifest(r)["frames"], key=lambda f: f["index"])] for r in (whole, cut)
    ]
    assert paces[0] == paces[1]


@pytest.mark.parametrize(
    ("extra", "mask", "message"),
    [
        (("--pace", "linear"), True, "--pace follows a classifier's score of each frame: give --classifier"),
        (("--classifier", "demo"), True, "--classifier steers a closed-loop pace: give --pace too"),
        (("--target", "effusion_left"), True, "--target steers a closed-loop pace: give --pace too"),
        (("--pace-candidates", "0,1"), True, "--pace-candidates steers a closed-loop pace: give --pace too"),
        ((*PACE,), False, "--pace chooses how much of each step's edit the mask shows: give --mask too."),
        (("--pace", "lin", "--classifier", "demo"), True, "--pace 'lin' must be a comma list of numbers"),
        (("--pace", "linear:x", "--classifier", "demo"), True, "linear:END needs a number END"),
        (("--pace", "linear:1.5", "--classifier", "demo"), True, "targets are classifier scores in [0, 1]"),
        (("--pace", "0.1,0.2", "--classifier", "demo"), True, "has 2 values but --steps is 3"),
        (
            (*PACE, "--pace-candidates", "0,2"),
            True,
            "--pace-candidates values are blend weights in [0, 1], got 2.",
        ),
        (
            (*PACE, "--pace-candidates", "a:b"),
            True,
            "must be a comma list of blend weights or a START:END range",
        ),
        ((*PACE, "--pace-candidates", ","), True, "--pace-candidates is empty"),
        ((*PACE, "--target", "nope"), True, "--target 'nope' is not one of the classifier's labels"),
        (
            ("--pace", "linear", "--classifier", "missing-folder"),
            True,
            "--classifier missing-folder: expected",
        ),
    ],
)
def test_bad_pace_options_exit_2_and_write_nothing(cli, tiny_model, inputs, tmp_path, extra, mask, message):
    out = tmp_path / "run"
    argv = simulate_argv(
        inputs["image"], out, *extra, model=tiny_model, mask=inputs["mask"] if mask else None, steps=3
    )
    result = cli(*argv)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
