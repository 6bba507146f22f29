"""What the loader puts together for `pie simulate` and `pie finetune`: --lora and --unet on a base
model, and pickle weights (refused unless --allow-pickle)."""

from __future__ import annotations

import json
import shutil

import numpy as np

from tests.helpers import finetune_argv, frames_of, simulate_argv

SEEDED = {"inference_steps": 20, "seed": 7}


def simulate(cli, inputs, model, out, *extra, **options):
    """`pie simulate` of the phantom with its mask: 3 steps of 10 unless ``options`` say otherwise."""
    options = {"steps": 3, "inference_steps": 10, **options}
    return cli(*simulate_argv(inputs["image"], out, *extra, model=model, mask=inputs["mask"], **options))


def test_lora_changes_frames_and_weight_zero_does_not(cli, inputs, tiny_model, tiny_lora, tmp_path):
    assert simulate(cli, inputs, tiny_model, tmp_path / "base").exit_code == 0
    result = simulate(cli, inputs, tiny_model, tmp_path / "lora", "--lora", tiny_lora)
    assert result.exit_code == 0, result.output
    assert simulate(cli, inputs, tiny_model, tmp_path / "zero", "--lora", f"{tiny_lora}:0").exit_code == 0
    base, lora, zero = (frames_of(tmp_path / n) for n in ("base", "lora", "zero"))
    assert np.abs(lora[-1] - base[-1]).mean() > 1
    assert np.abs(zero[-1] - base[-1]).max() <= 1
    manifest = json.loads((tmp_path / "lora" / "manifest.json").read_text())
    assert manifest["model"]["loras"] == [f"{tiny_lora.resolve()}:1"]


def test_unet_override_from_folder_or_its_unet_subfolder(
    cli, inputs, tiny_model, tiny_unet_variant, tmp_path
):
    assert simulate(cli, inputs, tiny_model, tmp_path / "base").exit_code == 0
    assert simulate(cli, inputs, tiny_model, tmp_path / "ft", "--unet", tiny_unet_variant).exit_code == 0
    assert (
        simulate(cli, inputs, tiny_model, tmp_path / "ft2", "--unet", tiny_unet_variant / "unet").exit_code
        == 0
    )
    assert simulate(cli, inputs, tiny_model, tmp_path / "base2").exit_code == 0  # cache keyed on the UNet
    base, ft, ft2, base2 = (frames_of(tmp_path / n) for n in ("base", "ft", "ft2", "base2"))
    assert np.abs(ft[-1] - base[-1]).mean() > 1
    assert np.array_equal(ft[-1], ft2[-1])
    assert np.array_equal(base[-1], base2[-1])
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert manifest["model"]["unet"] == str((tiny_unet_variant / "unet").resolve())


# --------------------------------------------------------------------------- pickle weights


def test_pickle_only_weights_are_refused(cli, tiny_model, inputs, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").rename(
        model / "unet" / "diffusion_pytorch_model.bin"
    )
    argv = simulate_argv(
        inputs["image"], tmp_path / "o", model=model, prompt="x", steps=None, inference_steps=None
    )
    result = cli(*argv)
    assert result.exit_code == 2
    assert (
        "has only pickle weights (diffusion_pytorch_model.bin), which can run code when opened; "
        "convert them to .safetensors, or pass --allow-pickle if you trust the file." in result.stderr
    )
    assert not (tmp_path / "o").exists()


def test_pickle_weights_need_allow_pickle(cli, tiny_model, inputs, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    refused = tmp_path / "refused"
    result = simulate(cli, inputs, model, refused, steps=1, **SEEDED)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: model {model}: unet ({model / 'unet'}) has only pickle weights")
    assert result.stderr.endswith("or pass --allow-pickle if you trust the file.\n")
    assert not refused.exists()

    loaded, safe = tmp_path / "loaded", tmp_path / "safe"
    result = simulate(cli, inputs, model, loaded, "--allow-pickle", steps=1, **SEEDED)
    assert result.exit_code == 0, result.output
    assert "loading pickle weights" in result.stderr and "load only files you trust" in result.stderr
    assert simulate(cli, inputs, tiny_model, safe, steps=1, **SEEDED).exit_code == 0
    for a, b in zip(frames_of(loaded), frames_of(safe), strict=True):
        assert np.array_equal(a, b)


def test_finetune_refuses_a_pickle_base_model_before_writing_anything(cli, tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert cli("demo", "data", "--out", tmp_path / "data", "-n", "4").exit_code == 0
    data = tmp_path / "data"

    def train(out, *extra):
        return finetune_argv(data, model, out, *extra, resolution=64, max_steps=1)

    result = cli(*train(tmp_path / "refused"))
    assert result.exit_code == 2 and "or pass --allow-pickle if you trust the file." in result.stderr
    assert not (tmp_path / "refused").exists()
    result = cli(*train(tmp_path / "trained", "--allow-pickle"))
    assert result.exit_code == 0, result.output
    assert "loading pickle weights" in result.stderr
    assert (tmp_path / "trained" / "pytorch_lora_weights.safetensors").is_file()
