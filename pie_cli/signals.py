"""What Ctrl-C and SIGTERM do while pie works: both interrupt policies live here.

Cluster schedulers (SLURM, Kubernetes) stop jobs with SIGTERM before SIGKILL, so pie treats
it like Ctrl-C, and whatever was finished is kept:

- **simulate** (:func:`terminate_as_interrupt`): SIGTERM raises ``KeyboardInterrupt`` in the
  main thread, like SIGINT. The runner then marks the run ``interrupted`` (its whole frames
  stay, ``--resume`` continues after the last one) and the CLI exits 130.
- **finetune** (:class:`StopSignals`): inside the step loop the first SIGINT/SIGTERM is only
  recorded; the loop finishes its optimizer step, saves a checkpoint of it and raises
  :class:`TrainingInterrupted`. A second signal, or one outside the loop (loading, caching
  latents, the final save), interrupts at once.

A SIGINT the process inherited as ignored (a background job of a non-interactive shell) stays
ignored under both policies: Python then installs no Ctrl-C handler, and StopSignals leaves any
ignored signal alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` (in the main thread) for the duration."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training at an optimizer step, with a checkpoint of that step."""

    def __init__(self, step: int, checkpoint: Path, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM while training, installed for the ``with`` block and restored after.

    Set ``deferring`` while the step loop runs: the first signal is then only recorded in
    ``received`` (and, unless ``quiet``, one line on stderr says so); the loop checks it after
    each optimizer step. Any other signal raises ``KeyboardInterrupt`` at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.received: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous is None or previous == signal.SIG_IGN:
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.deferring = False

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data worker, before it ignores SIGINT: the main decides
            return
        if self.deferring and self.received is None:
            self.received = signum
            if not self.quiet:  # a raw write: safe inside a signal handler
                again = "press Ctrl-C again" if signum == signal.SIGINT else "send it again"
                name = signal.Signals(signum).name
                note = (
                    f"\n{name}: stopping after this step and saving a checkpoint ({again} to stop at once).\n"
                )
                with contextlib.suppress(OSError):
                    os.write(2, note.encode())
            return
        self.received = self.received or signum
        raise KeyboardInterrupt
