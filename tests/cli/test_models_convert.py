"""`pie models add NAME FILE [--model-config X]` and `pie models convert SRC --out DIR`.

A single file registers as its own kind with the configs that describe it (`list` and `info`
show both); `convert` writes it, or a model folder whose weights are pickles only, once as a
diffusers-layout folder in safetensors, under pie's output rules, and `--model DIR` then loads the
same tensors: the same frames, with no --allow-pickle or --model-config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import frames_of, simulate_argv
from tests.ldm_checkpoint import write_checkpoint
from tests.refusals import check_ok, check_refused


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory) -> Path:
    return write_checkpoint(tiny_model, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def frames(cli, inputs, out: Path, model, *extra) -> list[np.ndarray]:
    argv = simulate_argv(inputs["image"], out, *extra, model=model, mask=inputs["mask"], steps=2, seed=5)
    check_ok(cli(*argv))
    return frames_of(out)


def equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) == 3
    for n, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x, y), f"frame {n} differs"


def same_tensors(a: Path, b: Path) -> None:
    """Two diffusers folders load to equal UNet, VAE and text encoder tensors."""
    import torch

    from pie_cli.core.loading import load_parts, quiet_libraries
    from pie_cli.core.registry import resolve

    with quiet_libraries():
        left, right = load_parts(resolve(str(a))), load_parts(resolve(str(b)))
    for x, y in zip(left[:3], right[:3], strict=True):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sy), type(x).__name__


def test_a_single_file_alias_keeps_its_configs(cli, tiny_model, checkpoint, inputs, tmp_path):
    check_refused(cli("models", "add", "tiny-file", checkpoint), checkpoint, "--model-config")
    result = check_ok(cli("models", "add", "tiny-file", checkpoint, "--model-config", tiny_model))
    assert "single-file" in result.stderr
    stored = json.loads(_registry())["models"]["tiny-file"]
    assert stored["kind"] == "single-file" and stored["target"] == str(checkpoint.resolve())
    assert stored["config"] == str(tiny_model.resolve())
    rows = {r["name"]: r for r in json.loads(check_ok(cli("models", "list", "--json")).stdout)}
    row = rows["tiny-file"]
    assert (
        row["kind"] == "single-file" and row["status"] == "ok" and row["config"] == str(tiny_model.resolve())
    )
    assert row["path"] == str(checkpoint.resolve()) and row["weights"].startswith("single file")
    assert "(configs: " in check_ok(cli("models", "list")).stdout.replace("\n", "")
    info = json.loads(check_ok(cli("models", "info", "tiny-file", "--json")).stdout)
    assert info["origin"] == "single-file" and info["checkpoint"] == str(checkpoint.resolve())
    assert info["config"] == str(tiny_model.resolve()) and info["weights"][0]["part"] == "checkpoint"
    text = check_ok(cli("models", "info", "tiny-file")).stdout
    assert "checkpoint" in text and "sha256" in text
    equal(
        frames(cli, inputs, tmp_path / "alias", "tiny-file"),
        frames(cli, inputs, tmp_path / "dir", tiny_model),
    )
    pickled = write_checkpoint(
        tiny_model, tmp_path / "tiny.ckpt", pickle=True
    )  # registered without opening it
    check_ok(cli("models", "add", "tiny-ckpt", pickled, "--model-config", tiny_model))
    check_refused(
        cli("models", "add", "lora-cfg", tiny_model, "--model-config", tiny_model), "--model-config"
    )


def _registry() -> str:
    import os

    return (Path(os.environ["PIE_HOME"]) / "models.json").read_text()


def test_convert_a_single_file_then_load_the_folder_alone(cli, tiny_model, checkpoint, inputs, tmp_path):
    out = tmp_path / "converted"
    result = check_ok(cli("models", "convert", checkpoint, "--out", out, "--model-config", tiny_model))
    assert result.stdout.strip() == str(out)
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "unet/diffusion_pytorch_model.safetensors" in names and "text_encoder/model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".ckpt", ".pt"))]
    assert not list(tmp_path.glob(".converted.*.tmp")), "the temporary folder stays behind"
    ledger = json.loads((out / ".pie-files.json").read_text())["files"]
    assert sorted(ledger) == [n for n in names if n != ".pie-files.json"]
    record = json.loads((out / "conversion.json").read_text())
    import hashlib

    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    same_tensors(out, tiny_model)
    equal(frames(cli, inputs, tmp_path / "a", out), frames(cli, inputs, tmp_path / "b", tiny_model))

    # --out's rules: not empty without --overwrite; with it a user's file stays, a changed file of pie's is refused.
    again = ("models", "convert", checkpoint, "--out", out, "--model-config", tiny_model)
    check_refused(cli(*again), out, "not empty")
    (out / "notes.txt").write_text("mine")
    check_ok(cli(*again, "--overwrite"))
    assert (out / "notes.txt").read_text() == "mine"
    same_tensors(out, tiny_model)
    (out / "unet" / "config.json").write_text("{}")
    check_refused(cli(*again, "--overwrite"), "unet/config.json", "pie did not write")
    check_refused(
        cli("models", "convert", checkpoint, "--out", tiny_model / "sub", "--model-config", tiny_model),
        "--model-config",
    )
    check_refused(cli("models", "convert", tiny_model, "--out", tmp_path / "x"), "nothing to convert")
    pickled = write_checkpoint(tiny_model, tmp_path / "tiny.ckpt", pickle=True)
    check_refused(
        cli("models", "convert", pickled, "--out", tmp_path / "y", "--model-config", tiny_model),
        "--allow-pickle",
    )
    assert not (tmp_path / "y").exists()
    check_ok(
        cli(
            "models",
            "convert",
            pickled,
            "--out",
            tmp_path / "y",
            "--model-config",
            tiny_model,
            "--allow-pickle",
        )
    )
    same_tensors(tmp_path / "y", tiny_model)


def test_convert_a_pickle_only_folder_once_then_drop_allow_pickle(cli, tiny_model, inputs, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    for part, name, pickle_name in (
        ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ):
        torch.save(load_file(model / part / name), model / part / pickle_name)
        (model / part / name).unlink()
    out = tmp_path / "safe"
    check_refused(cli("models", "convert", model, "--out", out), "--allow-pickle")
    assert not out.exists()
    check_ok(cli("models", "convert", model, "--out", out, "--allow-pickle"))
    same_tensors(out, tiny_model)
    equal(frames(cli, inputs, tmp_path / "a", out), frames(cli, inputs, tmp_path / "b", tiny_model))
