"""Shared fixtures: hermetic user/HF directories, one tiny SD model per session, inputs, a CLI runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pie_cli.cli.app import app


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path_factory, monkeypatch):
    """Never read or write the real user's pie registry or Hugging Face cache; never go online."""
    home = tmp_path_factory.mktemp("pie_home")
    hf = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("PIE_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("PIE_MODEL", "PIE_DEVICE", "PIE_DTYPE", "PIE_SEED", "PIE_PROGRESS"):
        monkeypatch.delenv(var, raising=False)
    from pie_cli.cli.console import ui

    ui.debug, ui.quiet, ui.progress = False, False, "auto"
    yield
    _reset_accelerate()


def _reset_accelerate() -> None:
    """accelerate keeps one process-wide state (e.g. mixed precision); a CLI process trains once,
    but the test process runs many trainings in a row."""
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny randomly initialised SD-1.x-shaped model in diffusers layout (built once)."""
    from pie_cli.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def components(tiny_model):
    """The tiny model loaded through the registry and loader, like the CLI does."""
    from pie_cli.core.devices import choose_placement
    from pie_cli.core.loading import load
    from pie_cli.core.registry import resolve

    return load(resolve(str(tiny_model)), choose_placement("cpu", "fp32"))


@pytest.fixture(scope="session")
def phantom():
    """(image, right-lung mask, left-lung mask) of the synthetic chest phantom, 64 x 64."""
    from pie_cli.demo.phantom import chest_phantom

    return chest_phantom(64, seed=0)


@pytest.fixture
def inputs(tmp_path, phantom) -> dict[str, Path]:
    image, _right, left = phantom
    paths = {"image": tmp_path / "chest.png", "mask": tmp_path / "left-lung.png"}
    image.save(paths["image"])
    left.save(paths["mask"])
    return paths


def half_mask(size: int, side: str = "left") -> Image.Image:
    arr = np.zeros((size, size), dtype=np.uint8)
    if side == "left":
        arr[:, : size // 2] = 255
    else:
        arr[:, size // 2 :] = 255
    return Image.fromarray(arr, mode="L")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


class Cli:
    """Runs `pie` in-process; keeps stdout and stderr apart."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str | Path):
        return self.runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def cli() -> Cli:
    return Cli()


def zeros_randn(monkeypatch) -> None:
    """Replace every torch.randn draw by zeros (the noise-free mode of DESIGN.md section 2)."""
    import torch

    def zeros(*size, generator=None, **kwargs):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        kwargs.pop("layout", None)
        return torch.zeros(*size, **kwargs)

    monkeypatch.setattr(torch, "randn", zeros)


@pytest.fixture(scope="session")
def tiny_lora(tiny_model, tmp_path_factory) -> Path:
    """A diffusers-format LoRA for the tiny UNet, with non-zero weights so it changes results."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("lora") / "effusion-lora"
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_unet_variant(tiny_model, tmp_path_factory) -> Path:
    """A "fine-tuned" UNet: the tiny UNet with perturbed weights, saved as DIR/unet."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(2)
        for param in unet.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    out = tmp_path_factory.mktemp("finetuned") / "ft"
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out
