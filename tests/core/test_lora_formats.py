"""LoRAs as they come (issue 15, item 5): a `pie finetune` checkpoint, a kohya/A1111-format file, and
files that are no LoRA for this model, which are refused in one sentence (exit 2), never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from tests.helpers import colour_folder, finetune_argv, frames_of, simulate_argv


def simulate(cli, inputs, tiny_model, out, *extra):
    return cli(
        *simulate_argv(inputs["image"], out, *extra, model=tiny_model, mask=inputs["mask"], steps=2, seed=3)
    )


def kohya_keys(diffusers_state: dict) -> dict:
    """A diffusers-format SD 1.x UNet LoRA with kohya's key names (lora_unet_*, lora_down/lora_up, alpha)."""
    out = {}
    for key, value in diffusers_state.items():
        assert key.startswith("unet.")
        module, _, kind = key[len("unet.") :].rpartition(".lora.")  # diffusers: ...to_q.lora.down.weight
        name = "lora_unet_" + module.replace(".", "_")
        part = {"down.weight": "lora_down.weight", "up.weight": "lora_up.weight"}[kind]
        out[f"{name}.{part}"] = value
        if part == "lora_down.weight":
            out[f"{name}.alpha"] = value.new_tensor(float(value.shape[0]))
    return out


def test_a_kohya_format_lora_gives_the_diffusers_lora_s_frames(cli, inputs, tiny_model, tiny_lora, tmp_path):
    state = load_file(str(tiny_lora / "pytorch_lora_weights.safetensors"))
    kohya = tmp_path / "effusion_kohya.safetensors"
    save_file(kohya_keys(state), str(kohya))
    assert not any(k.startswith("unet.") for k in load_file(str(kohya)))
    for name, lora in (("diffusers", tiny_lora), ("kohya", kohya), ("none", None)):
        extra = ("--lora", lora) if lora is not None else ()
        result = simulate(cli, inputs, tiny_model, tmp_path / name, *extra)
        assert result.exit_code == 0, result.output
    a, b, c = (frames_of(tmp_path / n) for n in ("diffusers", "kohya", "none"))
    assert np.abs(a[-1] - c[-1]).mean() > 1  # the LoRA matters
    assert np.abs(a[-1] - b[-1]).max() <= 1  # and kohya's file is the same LoRA


def test_finetune_checkpoints_are_loras_and_the_last_equals_the_final_weights(
    cli, tiny_model, inputs, tmp_path
):
    data = colour_folder(tmp_path / "data")
    out = tmp_path / "ft"
    argv = finetune_argv(data, tiny_model, out, "--checkpoint-every", "2", "--lr", "1e-2", max_steps=4)
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    steps = sorted((out / "checkpoints").glob("step_*"))
    assert [p.name for p in steps][-1].endswith("4")
    for step in steps:
        assert (step / "pytorch_lora_weights.safetensors").is_file()
    final, last = out / "pytorch_lora_weights.safetensors", steps[-1] / "pytorch_lora_weights.safetensors"
    assert load_file(str(final)).keys() == load_file(str(last)).keys()
    runs = {}
    for name, lora in (("final", out), ("last", steps[-1]), ("first", steps[0])):
        result = simulate(cli, inputs, tiny_model, tmp_path / name, "--lora", lora)
        assert result.exit_code == 0, result.output
        runs[name] = frames_of(tmp_path / name)
    assert all(np.array_equal(x, y) for x, y in zip(runs["final"], runs["last"], strict=True))
    assert not np.array_equal(runs["final"][-1], runs["first"][-1])  # step 2 is another adapter


@pytest.mark.parametrize("kind", ["peft", "foreign", "garbage"])
def test_a_lora_that_does_not_fit_is_one_sentence(cli, inputs, tiny_model, tiny_lora, tmp_path, kind):
    import torch

    bad = tmp_path / f"{kind}_lora.safetensors"
    if kind == "peft":  # a checkpoint's peft-keyed file given directly
        state = load_file(str(tiny_lora / "pytorch_lora_weights.safetensors"))
        save_file({k[len("unet.") :]: v for k, v in state.items()}, str(bad))
    elif kind == "foreign":  # an SDXL-style key the tiny SD 1.x UNet does not have
        save_file(
            {
                "unet.mid_block.nothing_here.lora_A.weight": torch.zeros(4, 8),
                "unet.mid_block.nothing_here.lora_B.weight": torch.zeros(8, 4),
            },
            str(bad),
        )
    else:
        bad.write_bytes(b"not a safetensors file at all")
    out = tmp_path / "run"
    result = simulate(cli, inputs, tiny_model, out, "--lora", bad)
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.stderr and "Traceback" not in result.output
    assert str(bad) in result.stderr
    assert len([line for line in result.stderr.strip().splitlines() if line.strip()]) == 1
    manifest = out / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "complete"
