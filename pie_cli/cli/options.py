"""Shared option declarations, so --model, --seed, --device, --out mean the same everywhere."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pie_cli.core.parameters import MAX_RESOLUTION  # one definition, shared with the core
from pie_cli.errors import UserError


class Dtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class SchedulerName(str, Enum):
    model = "model"
    pndm = "pndm"
    ddim = "ddim"
    dpmpp = "dpm++"
    euler = "euler"


class ProgressMode(str, Enum):
    auto = "auto"
    on = "on"
    plain = "plain"
    off = "off"


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="PIE_MODEL",
        help="Model: a diffusers directory, an alias (`pie models list`) or a Hugging Face repo id in the local cache.",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", envvar="PIE_SEED", help="Seed of the one random generator.")]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", envvar="PIE_DEVICE", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps, cpu."
    ),
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option(
        "--dtype",
        envvar="PIE_DTYPE",
        help="auto = fp16 on CUDA (VAE kept in fp32 when it would overflow), fp32 elsewhere.",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Output directory (default: runs/<image>-<time>).", show_default=False),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace pie's files in a non-empty --out (other files are kept).")
]
ResolutionOpt = Annotated[
    int, typer.Option("--resolution", "-r", help="Frames are R x R: short side resized to R, centre-cropped.")
]
WatermarkOpt = Annotated[
    bool, typer.Option("--watermark", help='Burn a small "SYNTHETIC" label into the corner of every frame.')
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library logs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]

# Working resolutions above MAX_RESOLUTION are refused up front (a 4096 x 4096 mask already needs a few
# GB of numpy temporaries; a typo like 51200 would otherwise end in an out-of-memory error).
# The smallest image side pie accepts: one 8 x 8 latent cell of Stable Diffusion's VAE.
MIN_IMAGE_SIDE = 8


def check_resolution(resolution: int, option: str = "--resolution") -> None:
    """A working resolution: a multiple of 8 in [8, MAX_RESOLUTION], or a ``UserError`` naming the option."""
    if resolution < 8 or resolution % 8:
        raise UserError(f"{option} must be a positive multiple of 8, got {resolution}.")
    if resolution > MAX_RESOLUTION:
        raise UserError(f"{option} must be at most {MAX_RESOLUTION}, got {resolution}.")
