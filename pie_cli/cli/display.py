"""The one progress display every long pie command uses: the CLI's :class:`~pie_cli.reporting.Reporter`.

Services report to it; it draws. Modes, chosen once so callers never branch:
- ``on``: rich bars on stderr (an outer bar for progression steps, a transient inner
  bar for the denoising steps of the current one), with rate and ETA;
- ``plain``: one line per finished item (or per ``every`` items, and the last one), for CI logs;
- ``log``: what ``auto`` gives off a terminal (SLURM, ``nohup``, ``| tee``, CI): plain's lines,
  plus the first item's, plus one whenever ``interval`` seconds (``--progress-interval``,
  default 30) passed without a line, so a ``tail -f`` of the log shows the run moving;
- ``off``: nothing (the command prints its own one-line summary).
``auto`` is ``on`` when both stdout and stderr are terminals (someone watching, no script reading),
else ``log``.

A line reads ``finetune  120/1000  loss 0.1234  lr 1.00e-04  1.52 it/s  elapsed 1:19  eta 9:38``:
the label, items done of the total, the caller's ``info``, the mean rate since ``start`` or a
resume's catch-up (``s/it`` below one item a second), the time since ``start`` and the time left
at that rate (rate and ETA are left out until one item was timed). In ``plain`` and ``log``, the denoising
loop of a long progression step adds a line (``step 3 denoise 12/26``) only when ``interval``
seconds passed without one. Every line is flushed as written. Notes and warnings go to stderr
(above the bars) unless ``pie --quiet``. Nothing is drawn until there is something to show, so
a command that fails its checks leaves the terminal as it was.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from pie_cli.cli.console import err, info, ui, warn
from pie_cli.reporting import Reporter

MODES = ("auto", "on", "plain", "off")
LINE_MODES = ("plain", "log")


def resolve_mode(mode: str) -> str:
    """``on``, ``plain``, ``log`` or ``off``: what ``mode`` (one of :data:`MODES`) means here and now."""
    if ui.quiet:
        return "off"
    if mode != "auto":
        return mode
    return "on" if (sys.stdout.isatty() and err().is_terminal) else "log"


class ProgressDisplay(Reporter):
    """``mode`` defaults to ``pie --progress``, ``interval`` to ``--progress-interval``; ``clock``
    (seconds, monotonic) is injectable so tests drive time instead of sleeping."""

    def __init__(
        self,
        mode: str | None = None,
        *,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = resolve_mode(ui.progress if mode is None else mode)
        self.quiet = ui.quiet
        self.verbose = ui.debug
        self.interval = ui.progress_interval if interval is None else interval
        self._clock = clock
        self._entered = False
        self._progress: Any = None
        self._outer: Any = None
        self._inner: Any = None
        self._label = "step"
        self._total = 0
        self._counting = False  # start() was called
        self._fresh = True  # no item advanced since start()
        self._index = 0  # items done
        self._began = 0.0  # when start() was called
        self._base = 0  # the items done at _base_time, where the rate is measured from
        self._base_time = 0.0
        self._last_line = 0.0

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
            if self.mode in LINE_MODES:
                self._emit(f"{description} ...", self._clock())
            yield
            return
        task = self._progress.add_task(description, total=None, info="")
        try:
            yield
        finally:
            self._progress.remove_task(task)

    def start(self, total: int, label: str = "progression", completed: int = 0) -> None:
        now = self._clock()
        self._label = label
        self._total = total
        self._counting, self._fresh = True, True
        self._index = self._base = completed
        self._began = self._base_time = self._last_line = now
        self._ensure_started()
        if self._progress is not None:
            self._outer = self._progress.add_task(label, total=total, completed=completed, info="")

    def inner(self, outer_index: int, done: int, total: int) -> None:
        """Denoising step ``done`` of ``total`` inside progression step ``outer_index``."""
        if self._progress is None:
            if self.mode in LINE_MODES and self._counting and done < total:
                now = self._clock()
                if now - self._last_line >= self.interval:
                    self._emit(
                        self._line(self._index, f"step {outer_index} denoise {done}/{total}", now), now
                    )
            return
        if self._inner is None:
            self._inner = self._progress.add_task("  denoise", total=total, info="")
        if done == 1:
            self._progress.reset(self._inner, total=total, description=f"  denoise {outer_index}")
        self._progress.update(self._inner, completed=done)

    def advance(self, index: int, seconds: float, info: str = "", every: int = 1) -> None:
        """Outer item ``index`` (1-based) is finished; ``info`` (e.g. loss, lr) is shown beside the bar.

        Lines: in plain mode every ``every`` items and the last one; in log mode those, the
        first item and any item ``interval`` seconds after the last line. A first advance that
        took no time (``seconds == 0``) catches up on items done before (a resumed run's steps):
        the rate is measured from there.
        """
        now = self._clock()
        first, self._fresh = self._fresh, False
        catch_up = first and seconds == 0
        if catch_up:
            self._base, self._base_time = index, now
        self._index = index
        if self._progress is not None and self._outer is not None:
            if catch_up:  # rich's speed would count the jump as work done now
                self._progress.reset(self._outer, total=self._total, completed=index, info=info)
            else:
                self._progress.update(self._outer, completed=index, info=info)
            return
        if self.mode not in LINE_MODES:
            return
        due = index % max(1, every) == 0 or index >= self._total
        if self.mode == "log":
            due = due or first or now - self._last_line >= self.interval
        if due:
            self._emit(self._line(index, info, now), now)

    # ------------------------------------------------------------------ lines
    def _line(self, index: int, extra: str, now: float) -> str:
        parts = [self._label, f"{index}/{self._total}"]
        if extra:
            parts.append(extra)
        done, spent = index - self._base, now - self._base_time
        rate = done / spent if done > 0 and spent > 0 else None
        if rate is not None:
            parts.append(rate_text(rate))
        parts.append(f"elapsed {clock_text(now - self._began)}")
        if rate is not None:
            parts.append(f"eta {clock_text(max(0, self._total - index) / rate)}")
        return "  ".join(parts)

    def _emit(self, text: str, now: float) -> None:
        console = err()
        console.print(text, markup=False, emoji=False, highlight=False)
        console.file.flush()  # a `tail -f` of a SLURM log sees it now
        self._last_line = now


def rate_text(rate: float) -> str:
    """Items per second as a person reads it: ``"1.52 it/s"``, or ``"3.20 s/it"`` below one a second."""
    return f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it"


def clock_text(seconds: float) -> str:
    """``"1:19"``, ``"1:02:03"`` (whole seconds, rounded down); ``"?"`` for no finite time."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


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
