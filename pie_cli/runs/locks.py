"""Ownership of an output directory by one pie process at a time.

``DIR/.pie.lock`` holds the owner's pid, host and start time. It is created with
``O_EXCL``, so of two processes starting on the same directory exactly one wins; the
other is refused with a sentence naming the owner. A lock left by a process that no
longer runs (SIGKILL, a crashed node) is taken over with a warning, so a killed run can
be resumed without manual cleanup. A lock from another host cannot be checked and is
respected; the message says how to remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pie_cli.errors import UserError

LOCK_NAME = ".pie.lock"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def read_owner(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def in_use(option: str, directory: Path, owner: dict) -> UserError:
    return UserError(
        f"{option} {directory} is in use by another pie process (pid {owner['pid']}, "
        f"since {owner.get('started', '?')}); wait for it or choose another directory."
    )


def live_owner(directory: Path) -> dict | None:
    """The owner of ``directory``'s lock when it is another process running on this host, else None."""
    owner = read_owner(Path(directory) / LOCK_NAME)
    if owner is None or owner.get("host") not in (None, socket.gethostname()):
        return None  # unreadable or another host's: DirLock decides when the run starts
    return owner if owner["pid"] != os.getpid() and pid_alive(owner["pid"]) else None


def check_not_locked(directory: Path, option: str = "--out") -> None:
    """Refuse early (before loading a model) a directory a live pie process is writing."""
    owner = live_owner(directory)
    if owner is not None:
        raise in_use(option, directory, owner)


class DirLock:
    """``with DirLock(dir, warn=...)``: hold ``dir/.pie.lock`` for the duration."""

    def __init__(self, directory: Path, *, option: str = "--out", warn: Callable[[str], None] | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.option = option
        self.warn = warn or (lambda _msg: None)
        self.held = False

    def acquire(self) -> DirLock:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise UserError(
            f"{self.option} {self.directory} is being locked and unlocked by other processes; retry."
        )

    def _handle_existing(self) -> None:
        owner = read_owner(self.path)
        if owner is None:
            # Empty or garbled: a writer died between create and write, or someone else's file.
            age = time.time() - _mtime(self.path)
            if age < 5:
                time.sleep(0.2)
                if read_owner(self.path) is not None:
                    return
            self.warn(f"taking over an unreadable lock file {self.path}.")
            _unlink(self.path)
            return
        pid, host = owner["pid"], owner.get("host")
        if host not in (None, socket.gethostname()):
            raise UserError(
                f"{self.option} {self.directory} is locked by pie process {pid} on host {host}; "
                f"if that run is gone, delete {self.path}."
            )
        if pid != os.getpid() and pid_alive(pid):
            raise in_use(self.option, self.directory, owner)
        self.warn(
            f"taking over a stale lock in {self.directory} left by pid {pid}, which is no longer running."
        )
        _unlink(self.path)

    def release(self) -> None:
        if self.held:
            owner = read_owner(self.path)
            if owner is not None and owner.get("pid") == os.getpid():
                _unlink(self.path)
            self.held = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
