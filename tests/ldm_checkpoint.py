"""Write a diffusers-layout SD 1.x model as one single-file checkpoint in the original LDM/CompVis layout.

What AUTOMATIC1111, kohya and the CompVis repository save: one state dict whose keys are
``model.diffusion_model.*`` (the UNet), ``first_stage_model.*`` (the VAE) and
``cond_stage_model.transformer.text_model.*`` (the CLIP text encoder). The map below is written
for the standard SD 1.x block structure (any number of blocks and layers per block, as the
model's own config says), which covers the tiny test model and SD 1.5 alike. It is the test's
own: diffusers only ships the opposite direction (LDM -> diffusers), which is what is tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

# Inside one residual block: diffusers' names -> the LDM ResBlock's.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    """``rest`` (``conv1.weight``) with its leading module name looked up in ``table``."""
    for old in sorted(table, key=len, reverse=True):
        if rest.startswith(old + "."):
            return table[old] + rest[len(old) :]
    return rest


def unet_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` state dict in the LDM ``model.diffusion_model.*`` layout."""
    layers = config["layers_per_block"]
    blocks = len(config["block_out_channels"])
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    prefixes: dict[str, str] = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(blocks):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
        prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = (
            f"input_blocks.{1 + i * (layers + 1) + layers}.0.op"
        )
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
        last = i * (layers + 1) + layers
        prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = (
            f"output_blocks.{last}.{2 if up_attention[i] else 1}.conv"
        )
    out = {}
    for key, value in state.items():
        head = next((p for p in sorted(prefixes, key=len, reverse=True) if key.startswith(p + ".")), None)
        if head is None:
            raise KeyError(f"no LDM name for UNet key {key}")
        rest = key[len(head) + 1 :]
        if ".resnets." in head:
            rest = _rename(rest, _UNET_RESNET)
        out[UNET + prefixes[head] + "." + rest] = value
    return out


def vae_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """An ``AutoencoderKL`` state dict in the LDM ``first_stage_model.*`` layout."""
    blocks = len(config["block_out_channels"])
    prefixes = {
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        prefixes[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        prefixes[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(blocks):
        prefixes[f"encoder.down_blocks.{i}.resnets"] = f"encoder.down.{i}.block"
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        # The LDM decoder numbers its up blocks from the lowest resolution's end.
        prefixes[f"decoder.up_blocks.{i}.resnets"] = f"decoder.up.{blocks - 1 - i}.block"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{blocks - 1 - i}.upsample"
    out = {}
    for key, value in state.items():
        head = next((p for p in sorted(prefixes, key=len, reverse=True) if key.startswith(p + ".")), None)
        if head is None:
            out[VAE + key] = value  # conv_in, conv_out, quant_conv, post_quant_conv: the same names
            continue
        rest = key[len(head) + 1 :]
        if ".mid_block.attentions." in head:
            rest = _rename(rest, _VAE_ATTENTION)
            if rest.endswith(".weight") and value.ndim == 2:
                value = value[:, :, None, None]  # the LDM attention projections are 1x1 convolutions
        elif head.endswith(".resnets"):  # "J.norm1.weight": the layer index, then the resnet's own name
            layer, name = rest.split(".", 1)
            rest = f"{layer}.{_rename(name, _VAE_RESNET)}"
        elif ".mid_block.resnets." in head:
            rest = _rename(rest, _VAE_RESNET)
        out[VAE + prefixes[head] + "." + rest] = value
    return out


def text_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    """A ``CLIPTextModel`` state dict as ``cond_stage_model.transformer.text_model.*``.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` prefix in its keys);
    original checkpoints always have it.
    """
    return {TEXT + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def ldm_state_dict(model: Path) -> dict[str, Any]:
    """The UNet, VAE and text encoder of a diffusers-layout model folder as one LDM state dict."""
    from safetensors.torch import load_file

    model = Path(model)

    def config(part: str) -> dict[str, Any]:
        return json.loads((model / part / "config.json").read_text(encoding="utf-8"))

    unet = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(model / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(model / "text_encoder" / "model.safetensors")
    return {
        **unet_to_ldm(unet, config("unet")),
        **vae_to_ldm(vae, config("vae")),
        **text_to_ldm(text),
    }


def write_checkpoint(model: Path, path: Path, *, pickle: bool = False) -> Path:
    """``model`` as one checkpoint: safetensors, or (``pickle``) ``torch.save({"state_dict": ...})`` as a .ckpt."""
    state = {k: v.contiguous() for k, v in ldm_state_dict(model).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if pickle:
        import torch

        torch.save({"state_dict": state, "global_step": 0}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    return path
