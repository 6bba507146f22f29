"""Typed errors. Every layer raises them; ``pie_cli.cli.boundary.guarded`` turns them into one line
and an exit code.

- ``UserError``: the user can fix it (bad option, missing file, model not cached).
  One sentence naming the option or file, exit status 2, never a traceback.
- anything else is an internal error: exit status 1 and a pointer to ``--debug``.
"""

from __future__ import annotations


class PieError(Exception):
    """Base class of pie's own errors."""

    exit_code = 1


class UserError(PieError):
    """A mistake in the user's input; ``message`` is one sentence naming the option or file."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class NumericalError(PieError):
    """NaN/inf in latents or frames: the run stops rather than writing a black frame."""


class Interrupted(PieError):
    """Ctrl-C or SIGTERM stopped a run; what was finished is kept and the message says how to go on."""

    exit_code = 130


def one_line(exc: BaseException | Warning) -> str:
    """The first line of an exception's message; pie's own errors (and warnings) without their class name."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (PieError, Warning)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
