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
