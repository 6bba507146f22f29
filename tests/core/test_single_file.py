"""Single-file checkpoints (``--model model.safetensors``, ``.ckpt`` with ``--allow-pickle``), offline.

The tiny model is written as one file in the original LDM/CompVis layout (``tests/ldm_checkpoint.py``)
and loaded back through diffusers' single-file loaders with a local config only: the tensors are
the diffusers folder's bit for bit, and so are the frames. Sockets are blocked while it loads.
Without ``--model-config`` pie's built-in SD 1.x configs describe the file; they describe SD 1.5
(parameter counts, CLIP's tokenizer), so the tiny file is refused by them in one sentence.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import frames_of, manifest, simulate_argv
from tests.ldm_checkpoint import TEXT, UNET, VAE, ldm_state_dict, write_checkpoint
from tests.refusals import check_ok, check_refused


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory) -> Path:
    """The tiny model as one .safetensors file in the LDM layout (read-only for the tests: copy to change it)."""
    return write_checkpoint(tiny_model, tmp_path_factory.mktemp("single") / "tiny.safetensors")


@pytest.fixture(scope="module")
def pickled(tiny_model, tmp_path_factory) -> Path:
    """The same, as a ``torch.save({"state_dict": ...})`` .ckpt."""
    return write_checkpoint(tiny_model, tmp_path_factory.mktemp("single") / "tiny.ckpt", pickle=True)


def run(cli, inputs, out: Path, model, *extra):
    return cli(
        *simulate_argv(inputs["image"], out, *extra, model=model, mask=inputs["mask"], steps=2, seed=3)
    )


def save(tensors: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# --------------------------------------------------------------------------- loading


def test_a_single_file_loads_bit_for_bit_with_local_configs_and_no_network(
    tiny_model, checkpoint, monkeypatch
):
    """Every socket is blocked (and HF_HUB_OFFLINE unset): diffusers must never look a config up online."""
    import torch

    from pie_cli.core.loading import load_parts, quiet_libraries
    from pie_cli.core.registry import resolve

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("test: the network is blocked")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    source = resolve(str(checkpoint), config=str(tiny_model))
    assert source.origin == "single-file" and source.checkpoint == checkpoint.resolve()
    assert source.path == tiny_model.resolve()
    with quiet_libraries():
        parts = load_parts(source)
        folder = load_parts(resolve(str(tiny_model)))
    assert attempts == []
    for part, reference in zip(parts[:3], folder[:3], strict=True):
        got, want = part.state_dict(), reference.state_dict()
        assert got.keys() == want.keys(), type(part).__name__
        assert all(torch.equal(got[k], want[k]) for k in want), type(part).__name__
    assert parts[3]("a cat").input_ids == folder[3]("a cat").input_ids


def test_frames_from_the_single_file_equal_the_folders_bit_for_bit(
    cli, inputs, tiny_model, checkpoint, tmp_path
):
    """And the manifest says which file (its SHA-256) and which configs, so --resume rebuilds the model."""
    folder, single = tmp_path / "folder", tmp_path / "single"
    check_ok(run(cli, inputs, folder, tiny_model))
    check_ok(run(cli, inputs, single, checkpoint, "--model-config", tiny_model))
    a, b = frames_of(folder), frames_of(single)
    assert len(a) == len(b) == 3
    for n, (x, y) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(x, y), f"frame {n} differs"
    m = manifest(single)
    assert m["model"]["origin"] == "single-file"
    assert m["model"]["checkpoint"] == str(checkpoint.resolve())
    assert m["model"]["config"] == str(tiny_model) and m["model"]["path"] == str(tiny_model.resolve())
    assert m["run"]["model"] == str(checkpoint) and m["run"]["model_config"] == str(tiny_model)
    [row] = m["model"]["weights"]
    assert (
        row["part"] == "checkpoint" and row["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    )


def test_the_built_in_configs_refuse_a_file_they_do_not_describe(cli, inputs, checkpoint, tmp_path):
    line = check_refused(run(cli, inputs, tmp_path / "run", checkpoint), checkpoint, "--model-config")
    assert "pie's built-in SD 1.x configs" in line and "320" in line
    assert not (tmp_path / "run").exists()


def test_the_built_in_configs_are_stable_diffusion_1_5_with_clips_tokenizer():
    """SD 1.5's published sizes (UNet 859,520,964 parameters, VAE 83,653,863, CLIP ViT-L/14 text 123,060,480),
    PNDM as SD 1.5 ships it, and CLIP's 49,408-token BPE giving CLIP's own ids; no weights, built on meta."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pie_cli.core.single_file import BUILTIN_CONFIG

    root = BUILTIN_CONFIG
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(root, subfolder="text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    assert vae.config.scaling_factor == 0.18215 and unet.config.cross_attention_dim == 768
    scheduler = PNDMScheduler.from_pretrained(root, subfolder="scheduler")
    assert scheduler.config.skip_prk_steps and scheduler.config.steps_offset == 1
    assert not scheduler.config.set_alpha_to_one and scheduler.config.beta_schedule == "scaled_linear"
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not [p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt")]
    assert (root / "tokenizer" / "LICENSE").is_file()


def test_a_ckpt_needs_allow_pickle_then_loads_weights_only(
    cli, inputs, tiny_model, pickled, tmp_path, monkeypatch
):
    import torch

    line = check_refused(
        run(cli, inputs, tmp_path / "refused", pickled, "--model-config", tiny_model),
        pickled,
        "--allow-pickle",
    )
    assert "pie models convert" in line
    assert not (tmp_path / "refused").exists()
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real(*a, **k))
    result = check_ok(
        run(cli, inputs, tmp_path / "run", pickled, "--model-config", tiny_model, "--allow-pickle")
    )
    assert "pickle" in result.stderr  # the warning
    assert calls == [True]
    check_ok(run(cli, inputs, tmp_path / "folder", tiny_model))
    for x, y in zip(frames_of(tmp_path / "run"), frames_of(tmp_path / "folder"), strict=True):
        assert np.array_equal(x, y)


# --------------------------------------------------------------------------- resume


def test_resume_rebuilds_the_single_file_model_and_refuses_a_changed_file(
    cli, inputs, tiny_model, checkpoint, tmp_path, monkeypatch
):
    from pie_cli.runs.writer import RunWriter

    ckpt = shutil.copy(checkpoint, tmp_path / "model.safetensors")
    original = RunWriter.write_frame

    def stop_after_one(self, n, *a, **k):
        original(self, n, *a, **k)
        if n == 1:
            raise KeyboardInterrupt

    out, whole = tmp_path / "run", tmp_path / "whole"
    check_ok(run(cli, inputs, whole, ckpt, "--model-config", tiny_model))
    with monkeypatch.context() as m:
        m.setattr(RunWriter, "write_frame", stop_after_one)
        assert run(cli, inputs, out, ckpt, "--model-config", tiny_model).exit_code == 130
    other = tmp_path / "other"
    shutil.copytree(out, other)
    check_ok(cli("simulate", "--resume", "--out", out))
    for x, y in zip(frames_of(out), frames_of(whole), strict=True):
        assert np.array_equal(x, y)
    # A changed tensor in the middle of the file: same size, same first and last bytes.
    data = bytearray(Path(ckpt).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(ckpt).write_bytes(bytes(data))
    check_refused(cli("simulate", "--resume", "--out", other), "changed since the run started", ckpt)
    check_refused(
        cli("simulate", "--resume", "--out", other, "--model-config", checkpoint.parent),
        "--model-config differs",
    )


# --------------------------------------------------------------------------- refusals


def test_refusals_are_one_sentence_naming_the_file(cli, inputs, tiny_model, tiny_lora, checkpoint, tmp_path):
    state = ldm_state_dict(tiny_model)
    unknown = shutil.copy(checkpoint, tmp_path / "tiny.bin")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    no_vae = save({k: v for k, v in state.items() if not k.startswith(VAE)}, tmp_path / "no-vae.safetensors")
    lacking = save(
        {k: v for k, v in state.items() if k != VAE + "decoder.conv_out.bias"},
        tmp_path / "lacking.safetensors",
    )
    sd2 = {k: v for k, v in state.items() if not k.startswith(TEXT)}
    sd2["cond_stage_model.model.token_embedding.weight"] = state[
        TEXT + "text_model.embeddings.token_embedding.weight"
    ]
    sd2 = save(sd2, tmp_path / "sd2.safetensors")
    unet_only = save(
        {k: v for k, v in state.items() if k.startswith(UNET)}, tmp_path / "unet-only.safetensors"
    )
    cases = [
        (unknown, tiny_model, ["neither a .safetensors nor a .ckpt"]),
        (cut, tiny_model, ["cut short"]),
        (garbage, tiny_model, ["not a safetensors file"]),
        (no_vae, tiny_model, ["no VAE weights"]),
        (lacking, tiny_model, ["lacks some of the VAE's weights"]),
        (sd2, tiny_model, ["Stable Diffusion 2.x"]),
        (unet_only, tiny_model, ["no VAE weights"]),
        (
            tiny_lora / "pytorch_lora_weights.safetensors",
            tiny_model,
            ["not a Stable Diffusion checkpoint", "--lora"],
        ),
        (checkpoint, checkpoint, ["--model-config", "itself a single file"]),
        (checkpoint, tmp_path / "nowhere", ["--model-config", "does not exist"]),
        (tiny_model, tiny_model, ["drop --model-config"]),
        (tmp_path / "missing.safetensors", tiny_model, ["model file", "does not exist"]),
    ]
    for i, (model, config, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        check_refused(run(cli, inputs, out, model, "--model-config", config), *words)
        assert not out.exists(), model
    pickle_objects = tmp_path / "objects.ckpt"
    import argparse

    import torch

    torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=1)}, pickle_objects)
    result = run(cli, inputs, tmp_path / "o", pickle_objects, "--model-config", tiny_model, "--allow-pickle")
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
    warning, error = result.stderr.splitlines()  # --allow-pickle's warning, then the refusal
    assert warning.startswith("warning: loading the pickle checkpoint")
    assert error.startswith(f"Error: single file {pickle_objects} holds Python objects besides tensors")


def test_a_config_folder_without_a_tokenizer_is_refused(cli, inputs, tiny_model, checkpoint, tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(tiny_model, configs, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    (configs / "tokenizer").mkdir()
    check_refused(
        run(cli, inputs, tmp_path / "run", checkpoint, "--model-config", configs),
        "--model-config",
        "tokenizer",
    )
    shutil.rmtree(configs / "tokenizer")
    shutil.copytree(tiny_model / "tokenizer", configs / "tokenizer")  # configs only, no weights: enough
    check_ok(run(cli, inputs, tmp_path / "ok", checkpoint, "--model-config", configs))
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["model"]["path"] == str(
        configs.resolve()
    )


def test_finetune_takes_model_config_and_refuses_a_full_fine_tune_of_a_single_file(
    cli, tiny_model, checkpoint, tmp_path
):
    from tests.helpers import colour_folder, finetune_argv

    data = colour_folder(tmp_path / "data", n=4)
    argv = finetune_argv(data, checkpoint, tmp_path / "ft", "--model-config", tiny_model, "--dry-run")
    check_ok(cli(*argv))
    check_refused(cli(*argv, "--method", "full"), "--method full", "pie models convert")
    check_refused(
        cli(*finetune_argv(data, checkpoint, tmp_path / "ft2", "--dry-run")), checkpoint, "--model-config"
    )
