"""The one progress display every long pie command uses: the CLI's :class:`~pie_cli.reporting.Reporter`.

Services report to it; it draws. Modes, chosen once so callers never branch:
- ``on``: rich bars on stderr (an outer bar for progression steps, a transient inner
  bar for the denoising steps of the current one), with rate and ETA;
- ``plain``: one line per finished item, for CI logs;
- ``off``: nothing (the command prints its own one-line summary).
``auto`` is ``on`` when both stdout and stderr are terminals, else ``off``. Notes and warnings
go to stderr (above the bars) unless ``pie --quiet``. Nothing is drawn until there is something
to show, so a command that fails its checks leaves the terminal as it was.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

from pie_cli.cli.console import err, info, ui, warn
from pie_cli.reporting import Reporter

MODES = ("auto", "on", "plain", "off")


def resolve_mode(mode: str) -> str:
    if ui.quiet:
        return "off"
    if mode != "auto":
        return mode
    return "on" if (sys.stdout.isatty() and err().is_terminal) else "off"


class ProgressDisplay(Reporter):
    def __init__(self, mode: str | None = None) -> None:
        self.mode = resolve_mode(ui.progress if mode is None else mode)
        self.quiet = ui.quiet
        self.verbose = ui.debug
        self._entered = False
        self._progress: Any = None
        self._outer: Any = None
        self._inner: Any = None
        self._label = "step"
        self._total = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> ProgressDisplay:
        self._entered = True
        return self

    def _ensure_started(self) -> None:
        """Start the bars at the first thing to draw (inside ``with``)."""
        if self.mode == "on" and self._entered and self._progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description:<14}"),
                BarColumn(),
                MofNCompleteColumn(),
                _rate_column(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=err(),
                transient=False,
            )
            self._progress.start()

    def __exit__(self, *exc: object) -> None:
        self._entered = False
        if self._progress is not None:
            if self._inner is not None:
                self._progress.remove_task(self._inner)
                self._inner = None
            self._progress.stop()
            self._progress = None

    # ------------------------------------------------------------------ API
    def note(self, message: str) -> None:
        info(message)

    def warn(self, message: str) -> None:
        warn(message)

    @contextmanager
    def status(self, description: str):
        """An indeterminate task (e.g. loading a model) that disappears when done."""
        self._ensure_started()
        if self._progress is None:
            if self.mode == "plain":
                err().print(f"{description} ...", markup=False)
            yield
            return
        task = self._progress.add_task(description, total=None, info="")
        try:
            yield
        finally:
            self._progress.remove_task(task)

    def start(self, total: int, label: str = "progression", completed: int = 0) -> None:
        self._label = label
        self._total = total
        self._ensure_started()
        if self._progress is not None:
            self._outer = self._progress.add_task(label, total=total, completed=completed, info="")

    def inner(self, outer_index: int, done: int, total: int) -> None:
        """Denoising step ``done`` of ``total`` inside progression step ``outer_index``."""
        if self._progress is None:
            return
        if self._inner is None:
            self._inner = self._progress.add_task("  denoise", total=total, info="")
        if done == 1:
            self._progress.reset(self._inner, total=total, description=f"  denoise {outer_index}")
        self._progress.update(self._inner, completed=done)

    def advance(self, index: int, seconds: float, info: str = "", every: int = 1) -> None:
        """Outer item ``index`` (1-based) is finished; ``info`` (e.g. loss, lr) is shown beside the bar.

        In plain mode a line is printed every ``every`` items and for the last one.
        """
        if self._progress is not None and self._outer is not None:
            self._progress.update(self._outer, completed=index, info=info)
        elif self.mode == "plain" and (index % max(1, every) == 0 or index == self._total):
            extra = f"  {info}" if info else ""
            err().print(f"{self._label} {index}/{self._total} done in {seconds:.2f} s{extra}", markup=False)


def _rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Items per second (or seconds per item when slower than one a second)."""

        def render(self, task):  # type: ignore[override]
            speed = task.finished_speed or task.speed
            if not speed:
                return Text("  ?  it/s", style="progress.data.speed")
            if speed >= 1:
                return Text(f"{speed:5.2f} it/s", style="progress.data.speed")
            return Text(f"{1 / speed:5.2f} s/it", style="progress.data.speed")

    return RateColumn()
