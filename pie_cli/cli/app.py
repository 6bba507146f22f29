"""The `pie` command: the root options, the commands it mounts, and ``main()``.

Imports nothing heavy (`pie --help` is instant): each command imports what it needs when it runs.
"""

from __future__ import annotations

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
from pie_cli.cli.console import error, ui
from pie_cli.cli.options import ProgressMode


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
    """

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
        "on Stable Diffusion 1.x. Outputs are research simulations, not diagnoses."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
            "--progress", envvar="PIE_PROGRESS", help="Progress display (auto: bars on a terminal)."
        ),
    ] = ProgressMode.auto,
) -> None:
    ui.debug = debug
    ui.quiet = quiet
    ui.progress = progress.value


app.command("simulate", no_args_is_help=True)(guarded(simulate))
app.add_typer(mask_app, name="mask")
app.command("export-gif", no_args_is_help=True)(guarded(export_gif))
app.command("finetune", no_args_is_help=True)(guarded(finetune))
app.command("evaluate", no_args_is_help=True)(guarded(evaluate))
app.add_typer(models_app, name="models")
app.add_typer(demo_app, name="demo")
app.command("doctor")(guarded(doctor))


def main() -> None:
    app(prog_name="pie")
