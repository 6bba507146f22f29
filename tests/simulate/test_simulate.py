"""`pie simulate` end to end through the CLI, on the tiny model: the run folder and its manifest,
options and schedules, provenance and watermark, bad input, internal and numerical failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pie_cli.imaging.media import prepare_image
from tests.helpers import frames_of, manifest, pixels, reset_signals, simulate_argv

FAST = {"steps": 3, "inference_steps": 10}  # at 64 px on the CPU (simulate_argv)
SEEDED = {"inference_steps": 20, "seed": 7}  # the provenance and numerical-safety runs
EXPECTED_FILES = {
    "frame_000.png",
    "frame_001.png",
    "frame_002.png",
    "frame_003.png",
    "mask.png",
    "progression.gif",
    "manifest.json",
    ".pie-files.json",  # the ledger: what pie wrote here, so that --overwrite removes only that
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
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=reset_signals)
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
    steps = [line for line in result.stderr.splitlines() if line.startswith("progression  ")]
    assert [line.split("  ")[1] for line in steps] == ["1/3", "2/3", "3/3"]  # one line per step
    fields = r"progression  \d/3  \d+\.\d\d (it/s|s/it)  elapsed \d+:\d\d  eta \d+:\d\d"  # count, rate, times
    assert all(re.fullmatch(fields, line) for line in steps), steps
    assert steps[-1].endswith("eta 0:00")
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
        ".pie-files.json",
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


# --------------------------------------------------------------------------- provenance and privacy


def test_outputs_say_they_are_synthetic_and_name_no_input_path(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    result = cli(
        *simulate_argv(inputs["image"], out, model=tiny_model, mask=inputs["mask"], steps=2, **SEEDED)
    )
    assert result.exit_code == 0, result.output
    m = manifest(out)
    for png in [*out.glob("frame_*.png"), out / "mask.png"]:
        text = Image.open(png).text
        assert text["synthetic"] == "true" and text["Software"].startswith("pie ")
        assert text["pie_run"] == m["run_id"]
    with Image.open(out / "progression.gif") as gif:
        comment = gif.info["comment"].decode()
    assert "Synthetic image generated by pie" in comment and m["run_id"] in comment
    raw = (out / "manifest.json").read_text()
    assert str(inputs["image"]) not in raw and "chest.png" not in raw and "argv" not in m
    assert m["inputs"]["image_sha256"] and m["inputs"]["image_size"] == [64, 64]
    assert m["synthetic"] is True


def test_watermark_changes_only_its_corner(cli, tiny_model, inputs, tmp_path):
    from pie_cli.imaging.annotate import watermark_box

    plain, marked = tmp_path / "plain", tmp_path / "marked"
    run = {"model": tiny_model, "mask": inputs["mask"], "steps": 2, **SEEDED}
    assert cli(*simulate_argv(inputs["image"], plain, **run)).exit_code == 0
    assert cli(*simulate_argv(inputs["image"], marked, "--watermark", **run)).exit_code == 0
    x0, y0, x1, y1 = watermark_box(Image.new("RGB", (64, 64)))
    for a, b in zip(frames_of(plain), frames_of(marked), strict=True):
        outside = np.ones(a.shape[:2], dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(a[outside], b[outside])
        assert not np.array_equal(a[~outside], b[~outside])
        assert (b[~outside] > 200).any() and (b[~outside] == 0).any()  # white text on black
    assert not (marked / ".resume").exists()


# --------------------------------------------------------------------------- numerical safety


def test_nan_in_decoded_frames_stops_the_run_without_writing_black(
    cli, tiny_model, inputs, tmp_path, monkeypatch
):
    import torch
    from diffusers import AutoencoderKL

    decode = AutoencoderKL.decode
    calls = {"n": 0}

    def broken(self, z, *a, **k):
        calls["n"] += 1
        out = decode(self, z, *a, **k)
        if calls["n"] == 2:  # the second progression step overflows
            out.sample.fill_(float("nan"))
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", broken)
    out = tmp_path / "run"
    result = cli(
        *simulate_argv(inputs["image"], out, model=tiny_model, mask=inputs["mask"], steps=3, **SEEDED)
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: progression step 2: the VAE decoded NaN or infinite pixels")
    assert "Rerun with --dtype fp32." in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in out.glob("frame_*.png")) == ["frame_000.png", "frame_001.png"]
    m = manifest(out)
    assert m["status"] == "failed" and m["last_complete_frame"] == 1
    assert torch.isfinite(torch.tensor(frames_of(out)[1], dtype=torch.float32)).all()


# --------------------------------------------------------------------------- schedules


def test_schedules(cli, inputs, tiny_model, tmp_path):
    schedule = tmp_path / "reports.txt"
    schedule.write_text(
        "# a report per step\n1: small left pleural effusion\n2: large left pleural effusion\n"
    )
    out = tmp_path / "run"
    result = cli(
        *simulate_argv(
            inputs["image"],
            out,
            "--prompt-schedule",
            schedule,
            "--strength-schedule",
            "0.4:0.6",
            "--guidance-schedule",
            "5,9",
            "--beta2-schedule",
            "0.3:0.9",
            "--mask-growth",
            "rise:0.5",
            model=tiny_model,
            mask=inputs["mask"],
            prompt=None,
            steps=2,
            inference_steps=6,
        )
    )
    assert result.exit_code == 0, result.output
    params = json.loads((out / "manifest.json").read_text())["parameters"]
    assert params["prompts"] == ["small left pleural effusion", "large left pleural effusion"]
    assert params["strengths"] == [0.4, 0.6] and params["guidance_scales"] == [5.0, 9.0]
    assert params["beta2s"] == [0.3, 0.9] and params["beta2_schedule"] == "0.3:0.9"
    assert params["mask_growth"] == "rise:0.5"

    (tmp_path / "one.txt").write_text("only one\n")
    for args, message in (
        (["--prompt-schedule", tmp_path / "one.txt"], "has 1 prompts but --steps is 2"),
        (
            ["--prompt", "x", "--strength-schedule", "0.1,0.2,0.3"],
            "--strength-schedule '0.1,0.2,0.3' has 3 values",
        ),
        (
            ["--prompt", "x", "--guidance-schedule", "a:b"],
            "must be a comma list of numbers or a START:END ramp",
        ),
        (
            ["--prompt", "x", "--strength-schedule", "0.5:1.5"],
            "--strength-schedule must be in (0, 1], got 1.5.",
        ),
        (
            ["--prompt", "x", "--beta2-schedule", "0.5,1.2"],
            "--beta2-schedule values must be in [0, 1], got 1.2.",
        ),
        (
            ["--prompt", "x", "--beta2-schedule", "0.5"],
            "--beta2-schedule '0.5' has 1 values but --steps is 2.",
        ),
        (
            ["--prompt", "x", "--mask-growth", "rise"],
            "--mask-growth grows the mask over the steps: give --mask too.",
        ),
        (
            ["--prompt", "x", "--mask", str(inputs["mask"]), "--mask-growth", "fill"],
            "--mask-growth 'fill' is not one of rise, dilate (MODE or MODE:START, e.g. rise:0.2).",
        ),
    ):
        result = cli(
            *simulate_argv(
                inputs["image"],
                tmp_path / "bad",
                *args,
                model=tiny_model,
                prompt=None,
                steps=2,
                inference_steps=6,
            )
        )
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr
        assert not (tmp_path / "bad").exists()
