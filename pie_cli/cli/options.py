"""The options every command shares, declared once, so ``--model``, ``--seed``, ``--device``,
``--out``, ``--resolution``, ``--allow-pickle`` and ``--debug`` mean the same in every command
that has them (and read the same ``PIE_*`` variables). Choice lists are built from the
tuples the core defines, so a new scheduler or dtype is added in one place.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from pie_cli.cli.console import ui
from pie_cli.cli.display import MODES
from pie_cli.core.parameters import DTYPE_CHOICES, SCHEDULER_CHOICES, resolution_problem
from pie_cli.errors import UserError


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum whose values are ``values`` (member names made identifiers: ``dpm++`` -> ``dpmpp``)."""
    return Enum(name, [(v.replace("+", "p").replace("-", "_"), v) for v in values], type=str)


Dtype = _choices("Dtype", DTYPE_CHOICES)
SchedulerName = _choices("SchedulerName", SCHEDULER_CHOICES)
ProgressMode = _choices("ProgressMode", MODES)


def _out_path(text: str) -> Path:
    """``--out``'s value: an empty one (an unset shell variable, ``--out "$OUT"``) is refused, never ".".

    (Typer would turn "" into the current directory.)
    """
    if not text.strip():
        raise typer.BadParameter(
            "is empty; name the directory or file to write (is a variable in your script unset?)"
        )
    return Path(text)


def _out_text(text: str) -> str:
    return str(_out_path(text))


def _set_debug(value: bool) -> bool:
    if value:
        ui.debug = True
    return value


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="PIE_MODEL",
        help="Model: a diffusers directory, a single-file .safetensors/.ckpt checkpoint, an alias (`pie models list`) "
        "or a Hugging Face repo id in the local cache.",
    ),
]
ModelConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--model-config",
        metavar="DIR|ALIAS",
        show_default=False,
        help="For a single-file --model: the diffusers-layout folder or alias whose configs and tokenizer "
        "describe it (default: pie's built-in SD 1.x configs). Never downloads.",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", envvar="PIE_SEED", help="Seed of the one random generator.")]
TrainingSeedOpt = Annotated[
    int,
    typer.Option("--seed", envvar="PIE_SEED", help="Seed of data order, augmentation, noise and LoRA init."),
]
PhantomSeedOpt = Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same phantoms.")]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", envvar="PIE_DEVICE", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps, cpu."
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Output directory (default: runs/<image>-<time>).",
        show_default=False,
        parser=_out_path,
        metavar="PATH",
    ),
]
OutDirOpt = Annotated[
    str | None,
    typer.Option(
        "--out", "-o", help="Output directory.", show_default=False, parser=_out_text, metavar="PATH"
    ),
]


def out_option(help: str) -> Any:
    """A required ``--out/-o PATH`` with a command's own help (a folder or a file it writes)."""
    return Annotated[
        Path, typer.Option("--out", "-o", help=help, show_default=False, parser=_out_path, metavar="PATH")
    ]


OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace pie's files in a non-empty --out (other files are kept).")
]
ResolutionOpt = Annotated[
    int,
    typer.Option(
        "--resolution", "-r", help="Working size R: frames are R x R (--fit crop), or R on the short side."
    ),
]
FIT_HELP = (
    "How the image becomes the model's canvas: 'crop' (the original method's: short side to R, centre "
    "crop; may cut the film's margins), 'pad' (the whole image letterboxed on R x R; the padding is never "
    "edited and never written), 'native' (the whole image at its aspect, short side R, long side a multiple of 8)."
)
FitOpt = Annotated[str, typer.Option("--fit", metavar="crop|pad|native", help=FIT_HELP)]


def check_fit(fit: str) -> str:
    """``--fit`` as given, or a ``UserError`` listing the choices."""
    from pie_cli.imaging.geometry import FIT_CHOICES

    if fit not in FIT_CHOICES:
        raise UserError(f"--fit must be one of {', '.join(FIT_CHOICES)}, got {fit!r}.")
    return fit


TrainingResolutionOpt = Annotated[int, typer.Option("--resolution", "-r", help="Training resolution.")]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Also load .bin/.ckpt pickle weights (they can run code: trusted files only).",
    ),
]
WatermarkOpt = Annotated[
    bool, typer.Option("--watermark", help='Burn a small "SYNTHETIC" label into the corner of every frame.')
]
# --debug is accepted before or after the command; it only sets ui.debug, which the error boundary reads.
DebugOpt = Annotated[
    bool,
    typer.Option(
        "--debug", help="Show full tracebacks and library logs.", callback=_set_debug, expose_value=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def check_resolution(resolution: int, option: str = "--resolution") -> None:
    """A working resolution: a multiple of 8 in [8, MAX_RESOLUTION], or a ``UserError`` naming the option."""
    problem = resolution_problem(resolution)
    if problem is not None:
        raise UserError(f"{option} {problem}.")
