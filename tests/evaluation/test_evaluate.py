"""`pie evaluate` on runs whose answers are known: preservation outside the mask, change inside it,
classifiers (the demo one, TorchScript, Hugging Face) and CLIP, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pie_cli.demo.phantom import Findings, render


def fake_run(
    root: Path, frames: list[np.ndarray], mask: np.ndarray | None = None, prompt: str | None = None
) -> Path:
    root.mkdir(parents=True)
    for k, arr in enumerate(frames):
        Image.fromarray(arr.astype(np.uint8)).save(root / f"frame_{k:03d}.png")
    if mask is not None:
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "mask.png")
    if prompt is not None:
        (root / "manifest.json").write_text(json.dumps({"parameters": {"prompt": prompt}}))
    return root


def evaluate(cli, run, *args):
    result = cli("evaluate", run, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def textured(seed: int = 0, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 220, size=(size, size, 3))


def test_identical_frames(cli, tmp_path):
    base = textured()
    mask = np.zeros((48, 48), dtype=bool)
    mask[10:30, 10:30] = True
    data = evaluate(cli, fake_run(tmp_path / "run", [base] * 4, mask))
    for frame in data["frames"]:
        assert frame["change_in_mask"] == 0 and frame["step_change"] == 0
        # identical pixels have no finite PSNR: no stand-in value, the cell stays empty
        assert frame["psnr_outside"] is None and frame["ssim_outside"] == pytest.approx(1.0)
    assert data["summary"]["identical_outside"] == 3 and "min_psnr_outside" not in data["summary"]
    assert (
        data["summary"]["pace"]["sentence"]
        == "The change is the same in the last frame as in frame 0: no progression."
    )
    csv_rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert csv_rows[1].split(",")[2] == "" and "100" not in csv_rows[1]
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"metrics.json", "metrics.csv", "report.png"}


def test_change_only_inside_the_mask(cli, tmp_path):
    base = textured()
    mask = np.zeros((48, 48), dtype=bool)
    mask[10:30, 10:30] = True
    frames = [base.copy() for _ in range(3)]
    frames[1][mask] = np.clip(frames[1][mask] + 20, 0, 255)
    frames[2][mask] = np.clip(frames[2][mask] + 40, 0, 255)
    data = evaluate(cli, fake_run(tmp_path / "run", frames, mask))
    f = data["frames"]
    assert [m["psnr_outside"] for m in f] == [None] * 3  # frame 0 is the reference; then identical outside
    # the outside keeps the SSIM window's reach from the mask: the edit inside does not leak out
    assert [m["ssim_outside"] for m in f][1:] == [pytest.approx(1.0, abs=1e-9)] * 2
    assert [m["drift_outside"] for m in f] == [0.0] * 3 and [m["max_abs_outside"] for m in f] == [0.0] * 3
    assert 0 < f[1]["change_in_mask"] < f[2]["change_in_mask"] <= 40
    assert f[2]["step_change"] == pytest.approx(np.abs(frames[2] - frames[1]).mean(axis=2).mean(), abs=0.6)
    assert data["summary"]["identical_outside"] == 2 and "min_psnr_outside" not in data["summary"]
    pace = data["summary"]["pace"]  # no classifier: the pace of the change inside the mask
    assert pace["of"] == "change_in_mask" and pace["spearman"] == 1.0
    assert pace["first_step_share"] == pytest.approx(
        f[1]["change_in_mask"] / f[2]["change_in_mask"], abs=1e-4
    )


def test_change_outside_lowers_psnr(cli, tmp_path):
    base = textured()
    mask = np.zeros((48, 48), dtype=bool)
    mask[:, :24] = True
    moved = base.copy()
    moved[:, 30:] = np.clip(moved[:, 30:] + 10, 0, 255)  # a change outside the mask, 10 levels
    data = evaluate(cli, fake_run(tmp_path / "run", [base, moved], mask))
    # The outside keeps 5 px from the mask: columns 29-47; 18 of those 19 changed by 10 levels.
    expected = 10 * np.log10(255**2 / (10**2 * 18 / 19))
    assert data["frames"][1]["psnr_outside"] == pytest.approx(expected, abs=1e-9)
    assert data["frames"][1]["drift_outside"] == pytest.approx(10 * 18 / 19, abs=1e-9)
    assert data["frames"][1]["max_abs_outside"] == 10
    assert data["frames"][1]["change_in_mask"] == 0


def phantom_frames(levels: list[int], seed: int = 3) -> list[np.ndarray]:
    return [np.asarray(render(Findings(effusion_left=k), seed=seed).image.convert("RGB")) for k in levels]


def test_demo_classifier_follows_the_prompt(cli, tmp_path):
    frames = phantom_frames([0, 1, 2, 3])
    run = fake_run(tmp_path / "run", frames, prompt="large left pleural effusion")
    data = evaluate(cli, run, "--classifier", "demo")
    assert data["target_label"] == "effusion_left"
    conf = [m["confidence"] for m in data["frames"]]
    assert conf[0] < 0.2 and conf[-1] > 0.8
    severity = [m["severity"] for m in data["frames"]]  # the demo classifier grades: expected grade / 3
    assert [round(3 * s) for s in severity] == [0, 1, 2, 3]
    pace = data["summary"]["pace"]
    assert pace["of"] == "severity" and pace["spearman"] == 1.0 and pace["steps_to_90"] == 3
    assert pace["sentence"].startswith(
        f"{pace['first_step_share'] * 100:.0f} % of the severity at step 1, 90 % by step 3"
    )
    assert data["summary"]["confidence_rise"] == pytest.approx(conf[-1] - conf[0], abs=1e-4)
    right = evaluate(cli, run, "--classifier", "demo", "--target-label", "effusion_right")
    assert right["frames"][-1]["confidence"] < 0.5


def test_torchscript_and_huggingface_classifiers_and_clip(cli, tmp_path):
    frames = [textured(0), textured(1)]
    run = fake_run(tmp_path / "run", frames, prompt="brightness")

    class Bright(torch.nn.Module):
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m * 10, -m * 10], dim=1)

    script = tmp_path / "bright.pt"
    torch.jit.script(Bright()).save(str(script))
    script.with_suffix(".json").write_text(
        json.dumps({"labels": ["brightness", "darkness"], "activation": "softmax"})
    )
    data = evaluate(cli, run, "--classifier", script)
    assert data["target_label"] == "brightness" and all(0.5 < m["confidence"] <= 1 for m in data["frames"])

    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        ViTConfig,
        ViTForImageClassification,
    )

    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            num_labels=2,
            id2label={0: "normal", 1: "effusion"},
            label2id={"normal": 0, "effusion": 1},
        )
    )
    vit.save_pretrained(tmp_path / "vit", safe_serialization=True)
    data = evaluate(cli, run, "--classifier", tmp_path / "vit", "--target-label", "effusion")
    conf = [m["confidence"] for m in data["frames"]]
    assert all(0 < c < 1 for c in conf)

    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            projection_dim=16,
        )
    )
    clip.save_pretrained(tmp_path / "clip", safe_serialization=True)
    data = evaluate(cli, run, "--clip", tmp_path / "clip")
    clip_i = [m["clip_i"] for m in data["frames"]]
    assert clip_i[0] == pytest.approx(1.0) and clip_i[1] < 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nowhere"], "RUN_DIR nowhere is not a directory."),
        (["{empty}"], "has no frame_NNN.png files"),
        (
            ["{run}", "--classifier", "demo"],
            "cannot tell which classifier label the prompt 'something' is about",
        ),
        (
            ["{run}", "--classifier", "demo", "--target-label", "pneumonia"],
            "--target-label 'pneumonia' is not one of",
        ),
        (["{run}", "--classifier", "/no/such/model"], "--classifier /no/such/model: expected 'demo'"),
        (["{run}", "--target-label", "x"], "--target-label needs --classifier."),
    ],
)
def test_bad_evaluate_input(cli, tmp_path, args, message):
    run = fake_run(tmp_path / "run", [textured()] * 2, prompt="something")
    (tmp_path / "empty").mkdir()
    args = [a.format(run=run, empty=tmp_path / "empty") for a in args]
    result = cli("evaluate", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
