"""`pie finetune` on the tiny model and tiny datasets written here."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import colour_folder, finetune_argv, losses, reset_signals, simulate_argv

FAST = ["--checkpoint-every", "1000"]  # with finetune_argv's 32 px, batches of 2, no data workers


def finetune(cli, data, model, out, *extra):
    return cli(*finetune_argv(data, model, out, *FAST, *extra))


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 4, 4, generator=g)
    e = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), e).sample


def test_lora_writes_diffusers_weights_that_a_plain_pipeline_loads(cli, data, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    out = tmp_path / "lora"
    result = finetune(
        cli,
        data,
        tiny_model,
        out,
        "--max-steps",
        "3",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lora-dropout",
        "0.1",
        "--checkpoint-every",
        "3",
        "--lr",
        "1e-2",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "pytorch_lora_weights.safetensors")
    assert {p.name for p in out.iterdir()} >= {
        "pytorch_lora_weights.safetensors",
        "training_config.yaml",
        "metrics.csv",
        "checkpoints",
        "training_summary.json",
    }
    assert len(losses(out)) == 3
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and ".lora." in k for k in weights)  # diffusers key format
    assert json.loads((out / "training_summary.json").read_text())["status"] == "complete"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(out)
    pipe.unet.eval()  # injected LoRA dropout starts in training mode
    with_lora = unet_output(pipe.unet)
    assert (with_lora - base).abs().max() > 1e-4
    # ...and it is exactly the trained adapter (rank 4, alpha 8 travel in the file's metadata).
    trained = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    set_peft_model_state_dict(
        trained, load_file(out / "checkpoints" / "step_000003" / "unet_lora.safetensors")
    )
    trained.eval()
    assert torch.equal(unet_output(trained), with_lora)


def test_lora_output_is_used_by_simulate_and_the_registry(cli, data, tiny_model, tmp_path):
    out = tmp_path / "lora"
    assert finetune(cli, data, tiny_model, out, "--max-steps", "2", "--lr", "1e-2").exit_code == 0
    result = cli("models", "add", "colours", out)  # base model read from training_config.yaml
    assert result.exit_code == 0, result.output
    for name, model in (("alias", "colours"), ("flag", str(tiny_model))):
        extra = [] if name == "alias" else ["--lora", str(out)]
        argv = simulate_argv(
            data / "0.png", tmp_path / name, *extra, model=model, prompt="a red square", resolution=32
        )
        result = cli(*argv)
        assert result.exit_code == 0, result.output
    a = np.asarray(Image.open(tmp_path / "alias" / "frame_001.png"))
    b = np.asarray(Image.open(tmp_path / "flag" / "frame_001.png"))
    assert np.array_equal(a, b)


def test_full_training_writes_a_unet_and_a_complete_model(cli, data, tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "full"
    result = finetune(
        cli,
        data,
        tiny_model,
        out,
        "--method",
        "full",
        "--max-steps",
        "2",
        "--lr",
        "1e-3",
        "--train-text-encoder",
    )
    assert result.exit_code == 0, result.output
    base = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    tuned = UNet2DConditionModel.from_pretrained(out / "unet")
    assert (unet_output(tuned) - unet_output(base)).abs().max() > 1e-4
    assert (out / "text_encoder" / "model.safetensors").is_file()
    result = cli(
        *simulate_argv(data / "0.png", tmp_path / "sim", model=out, prompt="a red square", resolution=32)
    )
    assert result.exit_code == 0, result.output
    argv = simulate_argv(
        data / "0.png", tmp_path / "sim2", "--unet", out, model=tiny_model, prompt="x", resolution=32
    )
    result = cli(*argv)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("method", "lr", "ratio"), [("full", "1e-3", 0.6), ("lora", "1e-2", 0.95)])
def test_loss_goes_down_on_a_learnable_task(cli, tmp_path, tiny_model, method, lr, ratio):
    data = colour_folder(tmp_path / "colours", n=16)
    out = tmp_path / method
    result = finetune(
        cli, data, tiny_model, out, "--method", method, "--lr", lr, "--max-steps", "60", "--batch-size", "4"
    )
    assert result.exit_code == 0, result.output
    curve = losses(out)
    assert len(curve) == 60
    first, last = np.mean(curve[:15]), np.mean(curve[-15:])
    assert last < ratio * first, (first, last)


def test_cache_latents_gives_the_same_loss_trajectory(cli, data, tiny_model, tmp_path):
    assert finetune(cli, data, tiny_model, tmp_path / "plain", "--max-steps", "5").exit_code == 0
    assert (
        finetune(cli, data, tiny_model, tmp_path / "cached", "--max-steps", "5", "--cache-latents").exit_code
        == 0
    )
    assert np.allclose(losses(tmp_path / "plain"), losses(tmp_path / "cached"), atol=1e-4)
    result = finetune(cli, data, tiny_model, tmp_path / "bad", "--cache-latents", "--random-flip")
    assert result.exit_code == 2 and "--cache-latents encodes each image once" in result.stderr


def test_options_that_change_the_loss_all_run(cli, data, tiny_model, tmp_path):
    classes = tmp_path / "class"
    classes.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 32), (120, 120, 120)).save(classes / f"c{i}.png")
    result = finetune(
        cli,
        data,
        tiny_model,
        tmp_path / "o",
        "--method",
        "full",
        "--max-steps",
        "2",
        "--class-data",
        classes,
        "--class-prompt",
        "a grey square",
        "--snr-gamma",
        "5",
        "--noise-offset",
        "0.05",
        "--gradient-checkpointing",
        "--grad-accum",
        "2",
        "--random-crop",
        "--random-flip",
        "--mixed-precision",
        "bf16",
    )
    assert result.exit_code == 0, result.output
    assert len(losses(tmp_path / "o")) == 2


def test_validation_samples_and_progress(cli, data, tiny_model, tmp_path):
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    result = cli(
        "--progress",
        "plain",
        *finetune_argv(data, tiny_model, tmp_path / "v", *FAST),
        "--max-steps",
        "2",
        "--validation-prompt",
        "a red square",
        "--validation-every",
        "2",
        "--validation-image",
        data / "0.png",
        "--validation-mask",
        tmp_path / "mask.png",
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "v" / "samples").iterdir()} == {
        "step_000002_prompt0.png",
        "step_000002_pie.png",
    }
    assert Image.open(tmp_path / "v" / "samples" / "step_000002_pie.png").size == (4 * 32, 32)
    last = [line for line in result.stderr.splitlines() if line.startswith("finetune  2/2  ")]
    assert len(last) == 1 and re.fullmatch(
        r"finetune  2/2  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  \d+\.\d\d (it/s|s/it)  elapsed \d+:\d\d  eta 0:00",
        last[0],
    ), result.stderr


def test_dry_run_prints_prompts_and_writes_nothing(cli, data, tiny_model, tmp_path):
    out = tmp_path / "run"
    result = cli(
        "finetune",
        "--data",
        data,
        "--model",
        tiny_model,
        "--out",
        out,
        "--dry-run",
        "--instance-prompt",
        "A photo",
        "--max-samples",
        "5",
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("5 examples (folder:")
    assert lines[1] == "  metadata.jsonl row 1: A photo, a red square"
    assert not out.exists()


BAD = {
    "missing data": (lambda d, t: ["--data", t / "nope"], "--data {t}/nope does not exist."),
    "no caption column": (
        lambda d, t: ["--data", _table(t, "a.csv", "file_name,notes\n0.png,x\n")],
        "has no caption column (looked for text, caption",
    ),
    "unreadable image": (
        lambda d, t: ["--data", _table(t, "b.csv", "file_name,text\n0.png,ok\nbad.png,x\n")],
        "image {t}/tables/bad.png (b.csv row 3) cannot be read: not an image pie can read.",
    ),
    "escaping file_name": (
        lambda d, t: ["--data", _table(t, "c.csv", "file_name,text\n../../etc/passwd,x\n")],
        "c.csv row 2: '../../etc/passwd' escapes the data folder",
    ),
    "rank 0": (lambda d, t: ["--data", d, "--rank", "0"], "--rank must be at least 1, got 0."),
    "unknown recipe key": (
        lambda d, t: ["--data", d, "--config", _recipe(t, "learning_rate: 1e-4\n")],
        "unknown key 'learning_rate' (did you mean 'lr'?)",
    ),
    "bad recipe type": (
        lambda d, t: ["--data", d, "--config", _recipe(t, "rank: eight\n")],
        "rank must be int, got 'eight'.",
    ),
    "unknown model": (lambda d, t: ["--data", d, "--model", "nope-model"], "unknown model 'nope-model'"),
    "bad method": (lambda d, t: ["--data", d, "--method", "dora"], "--method must be one of lora, full"),
    "fp16 on cpu": (
        lambda d, t: ["--data", d, "--mixed-precision", "fp16"],
        "--mixed-precision fp16 needs a GPU",
    ),
}


def _table(tmp: Path, name: str, text: str) -> Path:
    folder = tmp / "tables"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / "0.png")
    (folder / "bad.png").write_text("not an image")
    (folder / name).write_text(text)
    return folder / name


def _recipe(tmp: Path, text: str) -> Path:
    (tmp / "r.yaml").write_text(text)
    return tmp / "r.yaml"


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_exits_2_and_writes_nothing(cli, data, tiny_model, tmp_path, case):
    if case == "fp16 on cpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    build, expected = BAD[case]
    args = [str(a) for a in build(data, tmp_path)]
    if "--model" not in args:
        args += ["--model", str(tiny_model)]
    out = tmp_path / "out"
    result = cli(*finetune_argv(None, None, out, *args, batch_size=None, max_steps=1))
    assert result.exit_code == 2, result.output
    assert expected.format(t=tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output
    if (
        case != "fp16 on cpu"
    ):  # found once accelerate has the device: the folder exists, but stays empty of weights
        assert not out.exists()
    else:
        assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_non_empty_out_needs_resume_or_overwrite(cli, data, tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = finetune(cli, data, tiny_model, out, "--max-steps", "1")
    assert (
        result.exit_code == 2
        and "continue it with --resume latest, start over with --overwrite" in result.stderr
    )
    result = finetune(cli, data, tiny_model, out, "--max-steps", "1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"
    result = cli("finetune", "--out", tmp_path / "empty", "--resume", "latest")
    assert result.exit_code == 2


# --------------------------------------------------------------------------- data formats


def test_two_cpu_processes_train_one_run_together(data, tiny_model, tmp_path):
    """torchrun with 2 CPU processes: one process group (not two runs racing on one --out)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ft"
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = finetune_argv(data, tiny_model, out, *FAST)
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29573", "-m", "pie_cli", "--progress", "off"]
        + [str(a) for a in argv]
        + ["--max-steps", "4", "--checkpoint-every", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
        preexec_fn=reset_signals,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        str(out / "pytorch_lora_weights.safetensors")
    ]  # the main process only
    assert proc.stderr.count("finetune: 4 steps") == 1
    with open(out / "metrics.csv") as fh:
        assert [row["step"] for row in csv.DictReader(fh)] == ["1", "2", "3", "4"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
