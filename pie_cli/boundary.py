"""The one error boundary every command runs inside.

User errors: one sentence on stderr, exit 2. Numerical failures and other pie errors:
their message, exit 1. Anything else: "internal error" with a pointer to ``--debug``,
exit 1; with ``--debug`` the exception propagates with its traceback. Ctrl-C: exit 130.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from pie_cli.console import error, ui
from pie_cli.errors import PieError, UserError


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("debug"):
            ui.debug = True
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UserError as exc:
            error(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error("interrupted.")
            raise typer.Exit(130) from None
        except PieError as exc:
            if ui.debug:
                raise
            error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            if ui.debug:
                raise
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            error(
                f"internal error: {type(exc).__name__}{': ' + detail if detail else ''} (rerun with --debug for the traceback)."
            )
            raise typer.Exit(1) from None

    return wrapper
