"""The `pie` command: the root options, the commands it mounts, and ``main()``.

Imports nothing heavy (`pie --help` is instant): each command imports what it needs when it runs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Annotated

import typer
from typer.core import TyperGroup

from pie_cli import __version__
from pie_cli.cli.boundary import guarded
from pie_cli.cli.commands.demo import demo_app
from pie_cli.cli.commands.doctor import doctor
from pie_cli.cli.commands.evaluate import evaluate
from pie_cli.cli.commands.export_gif import export_gif
from pie_cli.cli.commands.finetune import finetune
from pie_cli.cli.commands.mask import mask_app
from pie_cli.cli.commands.models import models_app
from pie_cli.cli.commands.simulate import simulate
from pie_cli.cli.console import PROGRESS_INTERVAL, error, ui
from pie_cli.cli.options import DebugOpt, ProgressMode


def _usage_error(exc: Exception) -> bool:
    """A command-line parse error (bad value, unknown option, missing argument), not a help request."""
    return (
        getattr(exc, "exit_code", None) == 2
        and hasattr(exc, "format_message")
        and type(exc).__name__ != "NoArgsIsHelpError"
    )


class PieGroup(TyperGroup):
    """Parse errors are user errors like any other: one "Error: ..." line and exit 2.

    Click would print the usage, a "Try -h" hint and a blank line first; scripts and pie's
    error contract want the one sentence (``-h`` still shows the usage).

    The global options are also accepted after any command's name (``pie simulate ... -q``):
    every command and group below the root gets them as options of its own (listed in its
    ``--help``), so the command-line parser itself tells an option from an option's value
    (``--prompt -q``) and stops at ``--``. A command's own option of the same name wins.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        shared = _global_options()
        for command in _below(self):
            taken = {name for param in command.params for name in _names(param)}
            command.params.extend(p for p in shared if not taken.intersection(_names(p)))

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextmanager
def _one_line_usage_errors():
    try:
        yield
    except Exception as exc:
        if _usage_error(exc):
            error(exc.format_message())
            raise typer.Exit(2) from None
        raise


app = typer.Typer(
    cls=PieGroup,
    name="pie",
    help=(
        "Simulate disease progression on medical images with Progressive Image Editing (PIE) "
        "on Stable Diffusion 1.x. Outputs are research simulations, not diagnoses.\n\n"
        "The options below are global: they also work after a command's name (pie simulate ... -q)."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _check_interval(value: float | None) -> float | None:
    if value is not None and math.isnan(value):
        raise typer.BadParameter("must be a number of seconds, 0 or more (0: a line per item).")
    return value


def _version(value: bool) -> None:
    if value:
        print(f"pie {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Full tracebacks and library logs.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only results on stdout; no progress or notes.")
    ] = False,
    progress: Annotated[
        ProgressMode,
        typer.Option(
            "--progress",
            envvar="PIE_PROGRESS",
            help="Progress display: auto (bars on a terminal, else log lines), on (bars), plain (a line per "
            "item), off.",
        ),
    ] = ProgressMode.auto,
    progress_interval: Annotated[
        float,
        typer.Option(
            "--progress-interval",
            envvar="PIE_PROGRESS_INTERVAL",
            metavar="SECONDS",
            min=0,
            callback=_check_interval,
            help="Off a terminal (SLURM, nohup, | tee, CI), auto prints a progress line at least this often, "
            "besides the first and last item's.",
        ),
    ] = PROGRESS_INTERVAL,
) -> None:
    ui.debug = debug
    ui.quiet = quiet
    ui.progress = progress.value
    ui.progress_interval = progress_interval


app.command("simulate", no_args_is_help=True)(guarded(simulate))
app.add_typer(mask_app, name="mask")
app.command("export-gif", no_args_is_help=True)(guarded(export_gif))
app.command("finetune", no_args_is_help=True)(guarded(finetune))
app.command("evaluate", no_args_is_help=True)(guarded(evaluate))
app.add_typer(models_app, name="models")
app.add_typer(demo_app, name="demo")
app.command("doctor")(guarded(doctor))


# The global options as a command's own (no environment variables: the root reads those). Each
# sets the UI setting only when given, after the root's callback set it from the root options.
def _set_quiet(value: bool) -> None:
    if value:
        ui.quiet = True


def _set_progress(value: ProgressMode | None) -> None:
    if value is not None:
        ui.progress = value.value


def _set_interval(value: float | None) -> None:
    if _check_interval(value) is not None:
        ui.progress_interval = value


def _global_option_holder(
    debug: DebugOpt = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="As `pie --quiet`: only results on stdout.",
            callback=_set_quiet,
            expose_value=False,
        ),
    ] = False,
    progress: Annotated[
        ProgressMode | None,
        typer.Option(
            "--progress",
            help="As `pie --progress`.",
            callback=_set_progress,
            expose_value=False,
            show_default=False,
        ),
    ] = None,
    progress_interval: Annotated[
        float | None,
        typer.Option(
            "--progress-interval",
            metavar="SECONDS",
            min=0,
            help="As `pie --progress-interval`.",
            callback=_set_interval,
            expose_value=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Never called: typer reads its signature into options of the current typer's own kind."""


def _global_options() -> list:
    holder = typer.Typer(add_completion=False)
    holder.command()(_global_option_holder)
    return list(typer.main.get_command(holder).params)


def _names(param) -> set[str]:
    return {*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())}


def _below(group):
    """Every command and group under ``group``, depth first."""
    for command in getattr(group, "commands", {}).values():
        yield command
        yield from _below(command)


def main() -> None:
    app(prog_name="pie")
