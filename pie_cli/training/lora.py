"""LoRA adapters: attaching them (peft), checkpointing them, and saving the final weights in
the diffusers LoRA format that ``pipeline.load_lora_weights(DIR)`` and ``pie simulate --lora`` read."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from pie_cli.core.model_files import LORA_FILE  # the diffusers format's file name, defined once


def add_lora(
    model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: tuple[str, ...]
) -> None:
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )
    model.add_adapter(config)


def _metadata(model: torch.nn.Module) -> dict | None:
    config = getattr(model, "peft_config", {}).get("default")
    return config.to_dict() if config is not None else None


def peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint_lora(
    directory: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> None:
    """Adapter weights only (peft key names); the base model stays where it is."""
    from safetensors.torch import save_file

    save_file(peft_state(unet), str(directory / "unet_lora.safetensors"))
    readable(directory / "unet_lora.safetensors")
    if text_encoder is not None:
        save_file(peft_state(text_encoder), str(directory / "text_encoder_lora.safetensors"))
        readable(directory / "text_encoder_lora.safetensors")


def load_checkpoint_lora(
    directory: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(unet, load_file(str(directory / "unet_lora.safetensors")))
    _check_loaded(result, directory)
    if text_encoder is not None:
        result = set_peft_model_state_dict(
            text_encoder, load_file(str(directory / "text_encoder_lora.safetensors"))
        )
        _check_loaded(result, directory)


def _check_loaded(result, directory: Path) -> None:
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(
            f"checkpoint {directory} has LoRA weights this model does not have: {unexpected[:3]}"
        )


def save_final_lora(out: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> Path:
    """``out/pytorch_lora_weights.safetensors`` in diffusers format, with the adapters' rank/alpha metadata."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet_layers = convert_state_dict_to_diffusers(peft_state(unet))
    te_layers = (
        convert_state_dict_to_diffusers(peft_state(text_encoder)) if text_encoder is not None else None
    )
    with tempfile.TemporaryDirectory(dir=out, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=unet_layers,
            text_encoder_lora_layers=te_layers,
            unet_lora_adapter_metadata=_metadata(unet),
            text_encoder_lora_adapter_metadata=_metadata(text_encoder) if text_encoder is not None else None,
            safe_serialization=True,
        )
        readable(Path(tmp) / LORA_FILE)
        os.replace(Path(tmp) / LORA_FILE, out / LORA_FILE)
    return out / LORA_FILE


def readable(path: Path) -> None:
    """The file's mode as every other file pie writes (0666 less the umask, e.g. 0644): safetensors writes
    0600, which a group sharing a run folder (a lab's SLURM account, a shared scratch) cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link files of a folder tree (no extra disk), copying where links are impossible."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            link_or_copy(child, dst / child.name)
        return
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)
