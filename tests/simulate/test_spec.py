"""A PIE parameter is defined once, and every way into a run goes through one validated builder.

`PieConfig`'s fields give the simulate options' defaults, the manifest's recorded parameters and
the cohort columns; a fresh run, a cohort case and a resumed run are all checked by
`simulate.spec.build_config`, so a damaged manifest is refused like a bad option, never an
internal error.
"""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from pie_cli.core.parameters import DEFAULTS, SCHEDULES, TUNABLE, PieConfig
from pie_cli.simulate.spec import COLUMNS, RECORDED, SimulateSpec, build_config
from tests.helpers import manifest, simulate_argv


def test_every_pie_parameter_is_an_option_a_record_and_a_cohort_column():
    from typer.main import get_command

    from pie_cli.cli.app import app

    simulate = get_command(app).commands["simulate"]
    options = {p.name: p for p in simulate.params}
    assert set(TUNABLE) == {f.name for f in fields(PieConfig)} - {"prompt", *SCHEDULES}
    for name in TUNABLE:
        assert options[name].default == getattr(DEFAULTS, name), name  # the default is PieConfig's
        assert name in RECORDED and name in COLUMNS, name
    assert COLUMNS["strength"] is float and COLUMNS["steps"] is int and COLUMNS["negative_prompt"] is str


def test_the_spec_records_what_it_was_given():
    spec = SimulateSpec(None, "effusion", None, "m", out=None).with_values(strength=0.3, seed=9, steps=4)
    recorded = spec.parameters()
    assert list(recorded) == list(RECORDED)
    assert (recorded["strength"], recorded["seed"], recorded["steps"]) == (0.3, 9, 4)
    config = build_config(spec)
    assert (config.strength, config.steps, config.prompt) == (0.3, 4, "effusion")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strength": 5.0}, "--strength must be in (0, 1], got 5."),
        ({"steps": 0}, "--steps must be at least 1, got 0."),
        ({"beta2": -1.0}, "--beta2 must be in [0, 1], got -1."),
        ({"resolution": 100}, "--resolution must be a positive multiple of 8, got 100."),
        ({"seed": -1}, "--seed must be in [0, 2^63), got -1."),
        ({"trajectories": 65}, "--trajectories must be in 1..64, got 65."),
    ],
    ids=["strength", "steps", "beta2", "resolution", "seed", "trajectories"],
)
def test_build_config_names_the_first_bad_option(values, message):
    from pie_cli.errors import UserError

    spec = SimulateSpec(None, "effusion", None, "m", out=None).with_values(**values)
    with pytest.raises(UserError) as caught:
        build_config(spec)
    assert str(caught.value) == message


# --------------------------------------------------------------------------- resume of a damaged manifest


@pytest.fixture(scope="module")
def stopped_template(tmp_path_factory, tiny_model, phantom):
    """A finished 2-step run turned back into one interrupted after step 1 (as a kill leaves it)."""
    import torch
    from typer.testing import CliRunner

    from pie_cli.cli.app import app
    from pie_cli.runs.manifest import encode_state

    base = tmp_path_factory.mktemp("stopped")
    image, _, left = phantom
    image.save(base / "chest.png")
    left.save(base / "left-lung.png")
    out = base / "run"
    argv = simulate_argv(base / "chest.png", out, model=tiny_model, mask=base / "left-lung.png", steps=2)
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    data = manifest(out)
    data.update(
        status="interrupted",
        last_complete_frame=1,
        rng_states=[encode_state(torch.Generator("cpu").manual_seed(42).get_state())],
    )
    data["frames"] = [f for f in data["frames"] if f["index"] <= 1]
    (out / "frame_002.png").unlink()
    (out / "manifest.json").write_text(json.dumps(data))
    return out


@pytest.fixture
def stopped_run(stopped_template, tmp_path):
    """A fresh copy of the stopped run for one test."""
    import shutil

    return shutil.copytree(stopped_template, tmp_path / "run")


def _tamper(out, change) -> None:
    data = manifest(out)
    change(data)
    (out / "manifest.json").write_text(json.dumps(data))


def test_an_intact_stopped_run_resumes(cli, stopped_run):
    result = cli("simulate", "--resume", "--out", stopped_run)
    assert result.exit_code == 0, result.output
    assert manifest(stopped_run)["status"] == "complete" and (stopped_run / "frame_002.png").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["parameters"].update(strength=5),
            "holds parameters pie cannot run: --strength must be in (0, 1], got 5.",
        ),
        (lambda m: m["parameters"].update(steps="10"), "records steps = '10', which is not a int."),
        (
            lambda m: m["parameters"].update(guidance_scale=True),
            "records guidance_scale = True, which is not a float.",
        ),
        (
            lambda m: m["parameters"].update(resolution=100000),
            "--resolution must be at most 4096, got 100000.",
        ),
        (lambda m: m["parameters"].update(trajectories=0), "trajectories is 0, not a count of trajectories."),
        (
            lambda m: m["parameters"].update(strengths=["a", "b"]),
            "records strengths = ['a', 'b'], which is not a list of numbers.",
        ),
        (
            lambda m: m["parameters"].update(prompts=[1, 2]),
            "records prompts = [1, 2], which is not a list of texts.",
        ),
        (lambda m: m.update(last_complete_frame="one"), "last_complete_frame is 'one', not a count."),
        (lambda m: m.update(rng_states=["not base64!"]), "holds generator states that cannot be decoded."),
        (lambda m: m.update(rng_states=[]), "has 0 generator states for 1 trajectories."),
        (
            lambda m: m["run"].update(lora="x.safetensors"),
            "records run.lora = 'x.safetensors', which is not a list",
        ),
        (lambda m: m["run"].update(model=None), "records run.model = None, which is not a model reference."),
        (lambda m: m.update(run=[]), "was not written by a resumable pie simulate run."),
    ],
    ids=[
        "strength-out-of-range",
        "steps-as-text",
        "guidance-as-bool",
        "huge-resolution",
        "zero-trajectories",
        "strengths-not-numbers",
        "prompts-not-texts",
        "frame-not-a-count",
        "rng-garbage",
        "rng-missing",
        "lora-not-a-list",
        "model-missing",
        "run-not-a-mapping",
    ],
)
def test_resume_refuses_a_damaged_manifest_with_one_sentence(cli, stopped_run, change, message):
    _tamper(stopped_run, change)
    before = sorted(p.name for p in stopped_run.iterdir())
    result = cli("simulate", "--resume", "--out", stopped_run)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --resume: ") and message in lines[0], lines
    assert "manifest.json" in lines[0]
    assert sorted(p.name for p in stopped_run.iterdir()) == before  # nothing written, nothing removed
