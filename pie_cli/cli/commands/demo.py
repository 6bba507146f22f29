"""`pie demo data|case`: synthetic chest-X-ray phantoms for trying, testing and fine-tuning offline."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pie_cli.cli.boundary import guarded
from pie_cli.cli.console import info, result
from pie_cli.cli.options import DebugOpt, OverwriteOpt, PhantomSeedOpt, out_option
from pie_cli.core.parameters import MAX_SEED
from pie_cli.errors import UserError
from pie_cli.imaging.files import check_out_dir, writing

demo_app = typer.Typer(
    help="Synthetic chest-X-ray phantoms with known findings (for the offline demo, tests and fine-tuning).",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

DataOut = out_option("Folder to write (images, masks/, metadata.jsonl).")
CaseOut = out_option("Folder for chest.png, left-lung.png, right-lung.png, truth.json.")
SizeOpt = Annotated[int, typer.Option("--size", help="Image size in pixels (the demo model works at 64).")]


def _parse_kinds(text: str) -> tuple[str, ...]:
    from pie_cli.demo.data import KINDS

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UserError(f"--findings {text!r}: use a comma list of {', '.join(KINDS)}.")
    return kinds


MAX_SIZE = 1024  # phantoms are drawn 4x supersampled: 1024 px already takes a few hundred MB


# A demo folder is written into when asked (the phantoms' names are fixed).
_NOT_EMPTY = "pass --overwrite to write into it anyway"


def _check_numbers(size: int, seed: int) -> None:
    if size < 16 or size % 8 or size > MAX_SIZE:
        raise UserError(f"--size must be a multiple of 8 from 16 to {MAX_SIZE}, got {size}.")
    if not 0 <= seed < MAX_SEED:
        raise UserError(f"--seed must be in [0, 2^63), got {seed}.")


def _claim(out: Path, overwrite: bool, writes) -> None:
    """``--out`` usable; with --overwrite, pie's earlier demo files there go, a user's file in the way is refused."""
    from pie_cli.imaging.ownership import plan_overwrite, remove_planned

    check_out_dir(out, overwrite, not_empty=_NOT_EMPTY)
    if overwrite and out.is_dir():
        remove_planned(out, plan_overwrite(out, writes, legacy_outputs=writes))


@contextmanager
def _restore_on_failure(out: Path) -> Iterator[None]:
    """On failure, leave ``out`` as it was found: removed if this command made it, emptied if it was empty."""
    created = not out.exists()
    was_empty = out.is_dir() and not any(out.iterdir())
    try:
        yield
    except BaseException:
        if created and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        elif was_empty and out.is_dir():
            for entry in out.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise


@demo_app.command("data", no_args_is_help=True)
@guarded
def data(
    out: DataOut,
    n: Annotated[int, typer.Option("-n", "--count", help="Number of phantoms.")] = 2000,
    findings: Annotated[
        str,
        typer.Option(
            "--findings",
            help="Findings to draw: effusion, cardiomegaly (comma list); 40 % of phantoms are healthy.",
        ),
    ] = "effusion",
    size: SizeOpt = 64,
    seed: PhantomSeedOpt = 0,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write N phantoms as an image folder with metadata.jsonl that `pie finetune --data` reads directly."""
    from pie_cli.cli.display import ProgressDisplay
    from pie_cli.demo.data import write_dataset

    kinds = _parse_kinds(findings)
    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}.")
    _check_numbers(size, seed)
    from pie_cli.demo.data import dataset_file

    _claim(out, overwrite, dataset_file)
    with _restore_on_failure(out), writing(out), ProgressDisplay() as display:
        display.start(n, "phantoms")
        write_dataset(
            out,
            n,
            size,
            seed,
            kinds,
            progress=lambda k, total: display.advance(k, 0.0, every=max(1, n // 10)),
        )
    info(f"demo data: {n} phantoms ({', '.join(kinds)}) -> {out}/metadata.jsonl")
    result(str(out))


@demo_app.command("case", no_args_is_help=True)
@guarded
def case(
    out: CaseOut,
    size: SizeOpt = 64,
    seed: PhantomSeedOpt = 7,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write one healthy phantom with its lung masks: the input of the offline demo."""
    from pie_cli.demo.data import write_case

    _check_numbers(size, seed)
    from pie_cli.demo.data import case_file

    _claim(out, overwrite, case_file)
    with _restore_on_failure(out), writing(out):
        paths = write_case(out, seed, size)
    info(
        f"demo case: healthy phantom {paths['image']}, lung masks {paths['left'].name} (patient's left = image "
        f"right) and {paths['right'].name}"
    )
    result(str(out))
