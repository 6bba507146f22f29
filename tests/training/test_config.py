"""`pie finetune` settings: a recipe file, flags and a saved run, and which one wins."""

from __future__ import annotations

import json

from safetensors.torch import load_file


def test_merge_precedence_unit():
    from pie_cli.training.config import merge

    spec = merge(
        {"rank": 2, "seed": 7},
        {"rank"},
        recipe={"rank": 4, "batch_size": 3},
        saved={"batch_size": 9, "lr": 0.1},
    )
    assert (spec.rank, spec.batch_size, spec.lr, spec.seed) == (2, 3, 0.1, 42)
    assert spec.sources["rank"] == "command line" and spec.sources["lr"] == "saved run"


def test_config_file_and_flag_precedence(cli, data, tiny_model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_model}\nrank: 4\nbatch-size: 3\nlr: 0.002\nmax_steps: 2\n"
        "validation_prompt: [a red square]\n"
    )
    out = tmp_path / "run"
    result = cli(
        "finetune",
        "--config",
        recipe,
        "--data",
        data,
        "--out",
        out,
        "--rank",
        "2",
        "--resolution",
        "32",
        "--num-workers",
        "0",
    )
    assert result.exit_code == 0, result.output
    import yaml

    effective = yaml.safe_load((out / "training_config.yaml").read_text())
    assert (effective["rank"], effective["batch_size"], effective["lr"], effective["max_steps"]) == (
        2,
        3,
        0.002,
        2,
    )
    assert effective["validation_prompt"] == ["a red square"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["sources"]["rank"] == "command line" and summary["sources"]["batch_size"] == "config file"
    assert summary["sources"]["seed"] == "default"
    first = next(iter(load_file(out / "pytorch_lora_weights.safetensors").values()))
    assert 2 in first.shape  # rank 2 from the flag, not 4 from the file


def test_the_shared_environment_variables_reach_finetune(cli, data, tiny_model, tmp_path, monkeypatch):
    """`$PIE_MODEL` and `$PIE_SEED` mean for finetune what they mean for simulate, and their source is recorded."""
    from tests.helpers import finetune_argv

    out = tmp_path / "run"
    argv = [a for a in finetune_argv(data, tiny_model, out, max_steps=1) if a not in ("--model", tiny_model)]
    result = cli(*argv, "--dry-run")  # without $PIE_MODEL the default sd-v1-5 is not in the (empty) cache
    assert result.exit_code == 2 and "sd-v1-5" in result.stderr, result.output
    monkeypatch.setenv("PIE_MODEL", str(tiny_model))
    monkeypatch.setenv("PIE_SEED", "7")
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["sources"]["model"] == "environment ($PIE_MODEL)"
    assert summary["sources"]["seed"] == "environment ($PIE_SEED)"
    assert summary["model"]["path"] == str(tiny_model.resolve())
    import yaml

    assert yaml.safe_load((out / "training_config.yaml").read_text())["seed"] == 7


def test_the_summary_names_no_command_line_and_no_input_path(cli, tiny_model, tmp_path):
    """Like a simulate manifest: folder and file names often carry patient IDs."""
    from tests.helpers import colour_folder, finetune_argv

    data = colour_folder(tmp_path / "MRN-0042-images")
    out = tmp_path / "run"
    result = cli(*finetune_argv(data, tiny_model, out, "--checkpoint-every", "1", max_steps=2))
    assert result.exit_code == 0, result.output
    text = (out / "training_summary.json").read_text()
    summary = json.loads(text)
    assert "argv" not in summary and "MRN-0042" not in text
    assert summary["data"] == {"format": "folder", "examples": 8, "held_out": 0}
    assert summary["weights"] == "pytorch_lora_weights.safetensors"
    resumed = cli(
        "finetune", "--out", out, "--resume", "latest", "--max-steps", "3", "--allow-schedule-change"
    )
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["resumed_from"] == "checkpoints/step_000002"
