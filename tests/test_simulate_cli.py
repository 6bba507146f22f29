"""`pie simulate` end to end through the CLI, on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pie_cli.imaging.media import prepare_image
from tests.helpers import frames_of, pixels, simulate_argv

FAST = {"steps": 3, "inference_steps": 10}  # at 64 px on the CPU (simulate_argv)
EXPECTED_FILES = {
    "frame_000.png",
    "frame_001.png",
    "frame_002.png",
    "frame_003.png",
    "mask.png",
    "progression.gif",
    "manifest.json",
}


def simulate(cli, inputs, tiny_model, out, *extra, mask=True):
    return cli(
        *simulate_argv(
            inputs["image"], out, *extra, model=tiny_model, mask=inputs["mask"] if mask else None, **FAST
        )
    )


def test_full_run_writes_exactly_the_run_files(cli, inputs, tiny_model, tmp_path, phantom):
    out = tmp_path / "run"
    result = simulate(cli, inputs, tiny_model, out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert "Traceback" not in result.stderr

    frame0 = Image.open(out / "frame_000.png")
    assert frame0.size == (64, 64) and frame0.mode == "RGB"
    assert np.array_equal(pixels(frame0), pixels(prepare_image(phantom[0], 64)))
    mask = Image.open(out / "mask.png")
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), np.asarray(phantom[2]))

    gif = Image.open(out / "progression.gif")
    assert gif.n_frames == 4 and gif.info.get("loop") == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["last_complete_frame"] == 3
    assert [f["file"] for f in manifest["frames"]] == [f"frame_{i:03d}.png" for i in range(4)]
    assert all(f["seconds"] >= 0 for f in manifest["frames"])
    p = manifest["parameters"]
    assert (p["steps"], p["strength"], p["guidance_scale"], p["beta1"], p["beta2"], p["seed"]) == (
        3,
        0.5,
        7.5,
        0.01,
        0.75,
        42,
    )
    assert p["prompt"] == "large left pleural effusion"
    assert manifest["model"]["path"] == str(tiny_model.resolve())
    assert manifest["placement"] == {"device": "cpu", "dtype": "fp32", "vae_dtype": "fp32"}
    assert manifest["scheduler"]["class"] == "PNDMScheduler"
    assert manifest["scheduler"]["unet_calls_per_step"] == 6
    assert manifest["environment"]["torch"]
    assert len(manifest["inputs"]["image_sha256"]) == 64


def test_python_dash_m_writes_the_same_files(inputs, tiny_model, tmp_path):
    out = tmp_path / "run"
    argv = simulate_argv(
        inputs["image"],
        out,
        model=tiny_model,
        mask=inputs["mask"],
        prompt="small left pleural effusion",
        **FAST,
    )
    cmd = [sys.executable, "-m", "pie_cli", *map(str, argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert proc.stdout.strip() == str(out)


def test_seed_reproduces_and_changes(cli, inputs, tiny_model, tmp_path):
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert simulate(cli, inputs, tiny_model, tmp_path / name, "--seed", seed).exit_code == 0
    a, b, c = (frames_of(tmp_path / n) for n in "abc")
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[-1], c[-1])


def test_no_mask_and_no_gif(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "run"
    result = simulate(cli, inputs, tiny_model, out, "--no-gif", mask=False)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES - {"mask.png", "progression.gif"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["mask"] is False and "gif" not in manifest["outputs"]


def test_quiet_prints_only_the_run_directory(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "run"
    argv = simulate_argv(inputs["image"], out, model=tiny_model, prompt="effusion", device=None)
    result = cli("-q", *argv)  # --device auto: no CPU note either
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    assert result.stderr == ""


def test_plain_progress_reports_each_step(cli, inputs, tiny_model, tmp_path):
    argv = simulate_argv(inputs["image"], tmp_path / "run", model=tiny_model, prompt="effusion", **FAST)
    result = cli("--progress", "plain", *argv)
    assert result.exit_code == 0, result.output
    for n in (1, 2, 3):
        assert f"progression {n}/3 done in" in result.stderr
    assert "progression steps in" in result.stderr  # the summary line


def test_overwrite_replaces_only_pie_files(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert simulate(cli, inputs, tiny_model, out, "--steps", "4").exit_code == 0
    (out / "notes.txt").write_text("mine")
    assert (out / "frame_004.png").exists()
    result = simulate(cli, inputs, tiny_model, out, "--steps", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "frame_000.png",
        "frame_001.png",
        "frame_002.png",
        "mask.png",
        "progression.gif",
        "manifest.json",
        "notes.txt",
    }
    assert (out / "notes.txt").read_text() == "mine"


def _write(path: Path, img: Image.Image) -> Path:
    img.save(path)
    return path


BAD_INPUTS = {
    "missing image": (
        lambda d, i: ["simulate", d / "nope.png", "--prompt", "x"],
        "image {d}/nope.png does not exist",
    ),
    "unreadable image": (
        lambda d, i: ["simulate", _text(d / "fake.png"), "--prompt", "x"],
        "is not an image pie can read",
    ),
    "mask of another size": (
        lambda d, i: [
            "simulate",
            i["image"],
            "--prompt",
            "x",
            "--mask",
            _write(d / "m.png", Image.new("L", (40, 30), 255)),
        ],
        "is 40x30 but the image is 64x64",
    ),
    "empty mask": (
        lambda d, i: [
            "simulate",
            i["image"],
            "--prompt",
            "x",
            "--mask",
            _write(d / "m.png", Image.new("L", (64, 64), 0)),
        ],
        "is empty (no white pixels)",
    ),
    "colour mask": (
        lambda d, i: [
            "simulate",
            i["image"],
            "--prompt",
            "x",
            "--mask",
            _write(d / "m.png", Image.new("RGB", (64, 64), (255, 0, 0))),
        ],
        "is a colour image",
    ),
    "strength 0": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--strength", "0"],
        "--strength must be in (0, 1], got 0.",
    ),
    "strength above 1": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--strength", "1.5"],
        "--strength must be in (0, 1], got 1.5.",
    ),
    "steps 0": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--steps", "0"],
        "--steps must be at least 1, got 0.",
    ),
    "no denoising step": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--strength", "0.01"],
        "leaves no denoising step",
    ),
    "beta out of range": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--beta2", "2"],
        "--beta2 must be in [0, 1], got 2.",
    ),
    "resolution": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--resolution", "100"],
        "--resolution must be a positive multiple of 8, got 100.",
    ),
    "empty prompt": (lambda d, i: ["simulate", i["image"], "--prompt", "  "], "--prompt is empty"),
    "unknown model": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--model", "no-such-model"],
        "unknown model 'no-such-model'",
    ),
    "model not cached": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--model", "sd-v1-5"],
        "`pie models pull sd-v1-5`",
    ),
    "missing model dir": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--model", "./nowhere"],
        "model directory ./nowhere does not exist",
    ),
    "lora missing": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--lora", d / "lora:0.5"],
        "--lora",
    ),
    "unet not a unet": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--unet", d],
        "is not a UNet in diffusers layout",
    ),
    "fp16 on cpu": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--device", "cpu", "--dtype", "fp16"],
        "--dtype fp16 is not supported on the CPU",
    ),
    "cuda absent": (
        lambda d, i: ["simulate", i["image"], "--prompt", "x", "--device", "cuda"],
        "--device cuda was asked for",
    ),
}


def _text(path: Path) -> Path:
    path.write_text("not an image")
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_sentence_and_no_files(case, cli, inputs, tiny_model, tmp_path):
    if case == "cuda absent":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    build, expected = BAD_INPUTS[case]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = [str(a) for a in build(scratch, inputs)]
    if "--model" not in args:
        args += ["--model", str(tiny_model)]
    out = tmp_path / "out"
    before = set(tmp_path.rglob("*"))
    result = (
        cli(*args, "--out", out, "--resolution", "64")
        if "--resolution" not in args
        else cli(*args, "--out", out)
    )
    assert result.exit_code == 2, result.output
    assert expected.format(d=scratch) in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not out.exists()
    assert set(tmp_path.rglob("*")) == before


def test_out_not_empty_is_refused_and_left_alone(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "frame_000.png").write_bytes(b"precious")
    result = simulate(cli, inputs, tiny_model, out)
    assert result.exit_code == 2
    assert f"--out {out} is not empty; pass --overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["frame_000.png"]
    assert (out / "frame_000.png").read_bytes() == b"precious"


def test_internal_error_is_short_and_debug_shows_it(cli, inputs, tiny_model, tmp_path, monkeypatch):
    import pie_cli.core.progression as progression

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(progression, "_progression_step", broken)
    out = tmp_path / "run"
    result = simulate(cli, inputs, tiny_model, out)
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        == "Error: internal error: RuntimeError: boom (rerun with --debug for the traceback)."
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == "RuntimeError: boom"
    assert manifest["last_complete_frame"] == 0  # frame 0 was whole; nothing partial after it
    assert not list(out.glob(".*.tmp"))

    result = simulate(cli, inputs, tiny_model, tmp_path / "run2", "--debug")
    assert isinstance(result.exception, RuntimeError)


def test_interrupt_marks_the_manifest(cli, inputs, tiny_model, tmp_path, monkeypatch):
    import pie_cli.core.progression as progression

    real = progression._progression_step

    def interrupt_at_two(components, prep, x_prev, n, *args):
        if n == 2:
            raise KeyboardInterrupt
        return real(components, prep, x_prev, n, *args)

    monkeypatch.setattr(progression, "_progression_step", interrupt_at_two)
    out = tmp_path / "run"
    result = simulate(cli, inputs, tiny_model, out)
    assert result.exit_code == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["last_complete_frame"] == 1
    assert sorted(p.name for p in out.glob("frame_*.png")) == ["frame_000.png", "frame_001.png"]


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
