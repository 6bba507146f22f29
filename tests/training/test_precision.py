"""`pie finetune --mixed-precision` defaults to what `accelerate launch --mixed_precision` says (issue 16,
item 1): before, pie's explicit "no" overrode the launcher and `accelerate launch --mixed_precision bf16`
silently trained in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import colour_folder, finetune_argv, reset_signals


def recorded(out):
    effective = yaml.safe_load((out / "training_config.yaml").read_text())
    summary = json.loads((out / "training_summary.json").read_text())
    return effective["mixed_precision"], summary["sources"]["mixed_precision"]


def test_accelerate_launch_mixed_precision_bf16_trains_in_bf16_and_says_so(tiny_model, tmp_path):
    data = colour_folder(tmp_path / "data", n=4)
    out = tmp_path / "ft"
    argv = [str(a) for a in finetune_argv(data, tiny_model, out, max_steps=1)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    launch += ["--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "bf16"]
    proc = subprocess.run(
        [*launch, "-m", "pie_cli", "--progress", "off", *argv],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        preexec_fn=reset_signals,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert recorded(out) == ("bf16", "accelerate launch / config ($ACCELERATE_MIXED_PRECISION)")


def test_an_explicit_option_or_recipe_wins_over_the_launcher(cli, tiny_model, tmp_path, monkeypatch):
    data = colour_folder(tmp_path / "data", n=4)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "explicit"
    result = cli(*finetune_argv(data, tiny_model, out, "--mixed-precision", "no", max_steps=1))
    assert result.exit_code == 0, result.output
    assert recorded(out) == ("no", "command line")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("mixed_precision: 'no'\n")
    out = tmp_path / "recipe"
    result = cli(*finetune_argv(data, tiny_model, out, "--config", recipe, max_steps=1))
    assert result.exit_code == 0, result.output
    assert recorded(out)[0] == "no"


@pytest.mark.parametrize(("value", "expected"), [(None, ("no", "default")), ("BF16", None), ("fp8", None)])
def test_the_launcher_value_is_taken_checked_or_absent(
    cli, tiny_model, tmp_path, monkeypatch, value, expected
):
    data = colour_folder(tmp_path / "data", n=4)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if value is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", value)
    out = tmp_path / "ft"
    result = cli(*finetune_argv(data, tiny_model, out, max_steps=1))
    if value == "fp8":
        assert result.exit_code == 2
        assert (
            "$ACCELERATE_MIXED_PRECISION is 'fp8' (set by accelerate launch or its config); pie trains with one of "
            "no, fp16, bf16." in result.stderr
        )
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    if value is None:
        assert recorded(out) == expected
    else:
        assert recorded(out)[0] == "bf16"


def test_adapter_files_are_readable_like_every_other_file(cli, tiny_model, tmp_path):
    """safetensors wrote adapters 0600 while metrics and configs were 0644 (issue 16, item 5)."""
    import stat

    data = colour_folder(tmp_path / "data", n=4)
    out = tmp_path / "ft"
    result = cli(*finetune_argv(data, tiny_model, out, "--checkpoint-every", "1", max_steps=1))
    assert result.exit_code == 0, result.output
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_the_effective_config_has_no_null_and_a_resume_may_not_change_the_schedule(cli, tiny_model, tmp_path):
    """training_config.yaml said `lr: null`; a resume with another --max-steps silently changed the LR
    schedule (issue 16, item 5)."""
    data = colour_folder(tmp_path / "data", n=4)
    out = tmp_path / "ft"
    argv = finetune_argv(data, tiny_model, out, "--checkpoint-every", "1", "--lr-scheduler", "cosine")
    result = cli(*argv, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    effective = yaml.safe_load((out / "training_config.yaml").read_text())
    assert (effective["lr"], effective["alpha"], effective["max_steps"]) == (1e-4, 8.0, 2)
    assert "allow_schedule_change" not in effective
    for extra, key, now, before in (
        (("--max-steps", "4"), "max-steps", 4, 2),
        (("--warmup-steps", "1"), "warmup-steps", 1, 0),
        (("--lr-scheduler", "constant"), "lr-scheduler", "constant", "cosine"),
    ):
        refused = cli("finetune", "--out", out, "--resume", "latest", *extra)
        assert refused.exit_code == 2, refused.output
        assert (
            f"--resume latest: --{key} {now} differs from the run's {before}, which would change its learning-rate "
            "schedule; add --allow-schedule-change to continue with the new value." in refused.stderr
        )
    assert len(list((out / "checkpoints").iterdir())) == 2  # nothing was trained by the refusals
    same = cli("finetune", "--out", out, "--resume", "latest", "--max-steps", "2")  # the same value is fine
    assert same.exit_code == 0, same.output
    longer = cli(
        "finetune", "--out", out, "--resume", "latest", "--max-steps", "3", "--allow-schedule-change"
    )
    assert longer.exit_code == 0, longer.output
    assert yaml.safe_load((out / "training_config.yaml").read_text())["max_steps"] == 3
