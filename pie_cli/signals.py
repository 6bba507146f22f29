"""SIGTERM handled like Ctrl-C while long work runs, so a batch scheduler's kill keeps whole files.

Cluster schedulers (SLURM, Kubernetes) stop jobs with SIGTERM before SIGKILL. Inside
:func:`terminate_as_interrupt`, SIGTERM raises ``KeyboardInterrupt`` in the main thread,
which pie's runners already turn into an ``interrupted`` manifest and exit status 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
