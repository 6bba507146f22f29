"""How a service tells its caller what it is doing, without knowing where that goes.

Services (``simulate``, ``training``, ``evaluation``, ``doctor``) never print: they take a
:class:`Reporter` and call it. The command line passes its progress display
(``pie_cli/cli/display.py``: rich bars or plain log lines on stderr); Python callers get
:data:`SILENT`, which drops everything. A reporter answers five calls:

- ``note(text)`` / ``warn(text)``: one line for a person;
- ``status(text)``: a context manager around work of unknown length (loading a model);
- ``start(total, label)`` then ``advance(index, seconds, info)``: an outer count (progression
  steps, training steps, phantoms); log lines come at least every ``every`` items, and a first
  ``advance`` of 0 seconds reports items done before (a resumed run's), so rates count from it;
- ``inner(n, done, total)``: the denoising steps inside progression step ``n``.

``quiet`` says notes are unwanted (a signal handler then stays silent too) and ``verbose``
lets the libraries' own logs through (``pie --debug``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Reporter:
    """The silent reporter; subclasses override what they show."""

    quiet = True
    verbose = False

    def note(self, message: str) -> None:
        """An informational line."""

    def warn(self, message: str) -> None:
        """Something the user should know (a fallback taken, a value ignored)."""

    @contextmanager
    def status(self, description: str) -> Iterator[None]:
        yield

    def start(self, total: int, label: str = "progression", completed: int = 0) -> None:
        """An outer count of ``total`` items begins (``completed`` of them already done)."""

    def advance(self, index: int, seconds: float, info: str = "", every: int = 1) -> None:
        """Outer item ``index`` (1-based) is done after ``seconds``; ``info`` is shown beside it."""

    def inner(self, outer_index: int, done: int, total: int) -> None:
        """Denoising step ``done`` of ``total`` inside progression step ``outer_index``."""


SILENT = Reporter()
