"""Device and dtype choice. CUDA is used when present, never assumed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pie_cli.core.parameters import DTYPE_CHOICES
from pie_cli.errors import UserError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # UNet and text encoder
    vae_dtype: torch.dtype
    notes: tuple[str, ...] = ()

    def describe(self) -> dict[str, str]:
        return {
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "vae_dtype": dtype_name(self.vae_dtype),
        }


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def choose_device(requested: str = "auto") -> tuple[torch.device, tuple[str, ...]]:
    """``auto``: CUDA, then MPS, then CPU (with a note that it is slow)."""
    requested = requested.lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), ()
        if mps_available():
            return torch.device("mps"), ()
        return torch.device("cpu"), ("no GPU found; running on the CPU, which is slow for full-size models.",)
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
            raise UserError(
                f"--device {requested} was asked for, but this torch {torch.__version__} {built}."
            )
        dev = torch.device(requested)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {requested} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        return dev, ()
    if requested == "mps":
        if not mps_available():
            raise UserError("--device mps was asked for, but Apple MPS is not available here.")
        return torch.device("mps"), ()
    if requested == "cpu":
        return torch.device("cpu"), ()
    raise UserError(f"--device must be one of auto, cuda, cuda:N, mps, cpu; got {requested!r}.")


def choose_placement(device: str = "auto", dtype: str = "auto", vae_force_upcast: bool = True) -> Placement:
    """Pick device and dtypes.

    ``auto`` dtype is fp16 on CUDA and fp32 elsewhere. In fp16 the VAE stays in fp32
    when its config says it overflows in half precision (``force_upcast``, true for
    SD 1.x), so decoded frames never turn to NaN/black. bf16 has fp32's range and
    needs no such care.
    """
    dev, notes = choose_device(device)
    dtype = dtype.lower()
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}.")
    if dtype == "auto":
        dtype = "fp16" if dev.type == "cuda" else "fp32"
    if dtype == "fp16" and dev.type == "cpu":
        raise UserError("--dtype fp16 is not supported on the CPU; use fp32 or bf16.")
    model_dtype = _DTYPES[dtype]
    vae_dtype = torch.float32 if (model_dtype == torch.float16 and vae_force_upcast) else model_dtype
    return Placement(dev, model_dtype, vae_dtype, notes)


def tune_for_speed(components, placement: Placement, compile_unet: bool = False) -> None:
    """CUDA: channels-last UNet/VAE; optionally torch.compile the UNet (once: the model cache keeps it).

    Attention already runs on PyTorch's scaled_dot_product_attention (diffusers' default
    processor on torch 2), which picks flash/memory-efficient kernels on the GPU.
    """
    if placement.device.type == "cuda":
        components.unet.to(memory_format=torch.channels_last)
        components.vae.to(memory_format=torch.channels_last)
    if compile_unet and not hasattr(components.unet, "_orig_mod"):
        components.unet = torch.compile(components.unet)
