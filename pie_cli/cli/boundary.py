"""The one error boundary every command runs inside.

User errors: one sentence on stderr, exit 2. Numerical failures and other pie errors:
their message, exit 1. Environment faults (disk full, permission denied while writing,
out of memory): one sentence naming the path or what to shrink, exit 1. Anything else:
"internal error" with a pointer to ``--debug``, exit 1; with ``--debug`` every exception
except a user error propagates with its traceback. Ctrl-C: exit 130.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from pie_cli.cli.console import error, human_bytes, ui
from pie_cli.errors import PieError, UserError, one_line
from pie_cli.imaging.files import published_path

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
# numpy: "Unable to allocate 71.1 PiB ..."; torch: "Tried to allocate 20.00 MiB", "you tried to allocate N bytes".
_ALLOCATION = re.compile(r"(?i)(?:tried to|unable to) allocate ([\d.]+ ?(?:[KMGTPE]i?B|bytes))")
# Options that make a run smaller, by parameter name, in the order they are suggested.
_SHRINK = {
    "resolution": "--resolution",
    "size": "--size",
    "resize": "--resize",
    "trajectories": "--trajectories",
    "batch_size": "--batch-size",
    "n": "-n",
}


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command function inside the error boundary (``--debug`` is set by its option's callback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pie_cli.signals import terminate_as_interrupt

        try:
            with terminate_as_interrupt():  # SIGTERM (SLURM, Kubernetes, `kill`) ends any command like Ctrl-C
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
            if ui.debug or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
                raise  # a closed stdout (`pie ... | head`): Typer exits quietly
            message = environment_fault(exc, kwargs)
            if message is not None:
                error(message)
                raise typer.Exit(1) from None
            error(f"internal error: {one_line(exc)} (rerun with --debug for the traceback).")
            raise typer.Exit(1) from None

    return wrapper


def environment_fault(exc: BaseException, options: dict[str, Any] | None = None) -> str | None:
    """One sentence for a fault of the machine rather than of pie or the user's input, else None.

    ``options`` are the command's parameters: the out-of-memory advice names the ones it has.
    """
    if is_out_of_memory(exc):
        found = _ALLOCATION.search(str(exc))
        detail = f" (tried to allocate {_readable(found.group(1))})" if found else ""
        return f"out of memory{detail}; {_shrink_advice(options or {})}."
    if isinstance(exc, OSError) and exc.errno is not None:
        path = shown_path(exc.filename)
        if exc.errno in _NO_SPACE:
            where = f" while writing {path}" if path else " while writing the output"
            return f"no space left on device{where}; free some space and rerun."
        if exc.errno in _NO_PERMISSION:
            reason = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
            return f"cannot write {path}: {reason}." if path else f"cannot write the output: {reason}."
        if path:
            reason = (exc.strerror or os.strerror(exc.errno)).rstrip(".")
            return f"cannot access {path}: {reason[:1].lower()}{reason[1:]}."
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError (numpy's included), torch's OutOfMemoryError, or a RuntimeError saying so (no torch import)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return "out of memory" in text.lower() or "can't allocate memory" in text
    return False


def _readable(amount: str) -> str:
    """``"1048576 bytes"`` -> ``"1.0 MB"``; an amount already in units is kept as the library wrote it."""
    number, _, unit = amount.partition(" ")
    return human_bytes(int(number)) if unit == "bytes" and number.isdigit() else amount


def _shrink_advice(options: dict[str, Any]) -> str:
    names = [flag for name, flag in _SHRINK.items() if name in options]
    advice = (
        f"try a smaller {' or '.join(names)}"
        if names
        else "close other programs or use a machine with more memory"
    )
    if "dtype" in options:
        advice += ", or --dtype fp16 on a GPU"
    elif "mixed_precision" in options:
        advice += ", or add --gradient-checkpointing"
    return advice


def shown_path(filename: Any) -> str | None:
    """The file an OSError is about, as the user knows it (an atomic write's temporary name -> the file)."""
    if filename is None or isinstance(filename, int):
        return None
    return str(published_path(Path(os.fsdecode(filename))))
