"""The two consoles (stdout = results, stderr = everything else) and the UI settings.

Created lazily and once, so every command and the progress display share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

PROGRESS_INTERVAL = 30.0  # seconds: at most this long between log lines (--progress-interval's default)


@dataclass
class UiSettings:
    debug: bool = False
    quiet: bool = False
    progress: str = "auto"  # auto | on | plain | off
    progress_interval: float = PROGRESS_INTERVAL


ui = UiSettings()


@cache
def out():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


@cache
def err():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    err().print(f"Error: {message}", style="red", markup=False, emoji=False)


def warn(message: str) -> None:
    if not ui.quiet:
        err().print(f"warning: {message}", style="yellow", markup=False, emoji=False)


def info(message: str) -> None:
    if not ui.quiet:
        err().print(message, markup=False, emoji=False)


def result(text: str) -> None:
    """A result for scripts (a path, JSON): stdout, unstyled."""
    out().print(text, markup=False, highlight=False, emoji=False)


def human_bytes(n: int | float | None) -> str:
    """A byte count in decimal units, as disks and the HF cache report them: ``"85.9 GB"``, ``"512 B"``."""
    if n is None:
        return "?"
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
