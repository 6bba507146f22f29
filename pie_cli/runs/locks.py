"""Ownership of an output directory by one pie process at a time.

``DIR/.pie.lock`` is a ``filelock.SoftFileLock`` marker: created with ``O_EXCL`` (so of two
processes starting on the same directory exactly one wins) and holding the owner's pid and
host. A lock left by a process that no longer runs (SIGKILL, a crashed node) is taken over
with a warning, atomically: filelock swaps the stale marker for its own in one exchange, so
two processes finding the same stale lock never both hold the directory. A lock from another
host cannot be checked and is respected; the message says how to remove it. A lock in the
JSON format of pie 0.1.0 is still understood.
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
    except (OSError, OverflowError):
        return False
    return True


def read_owner(path: Path) -> dict | None:
    """{pid, host, started} of a lock file (filelock's ``pid\\nhost\\n...`` or pie 0.1.0's JSON), else None."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(path.stat().st_mtime))
    except (OSError, UnicodeDecodeError):
        return None
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("pid"), int):
            return {
                "pid": data["pid"],
                "host": data.get("host"),
                "started": data.get("started", started),
                "legacy": True,
            }
    lines = text.splitlines()
    if lines and lines[0].strip().isdigit():
        host = lines[1].strip() if len(lines) > 1 and lines[1].strip() else None
        return {"pid": int(lines[0]), "host": host, "started": started, "legacy": False}
    return None


def in_use(option: str, directory: Path, owner: dict) -> UserError:
    return UserError(
        f"{option} {directory} is in use by another pie process (pid {owner['pid']}, "
        f"since {owner.get('started', '?')}); wait for it or choose another directory."
    )


def _here(owner: dict) -> bool:
    return owner.get("host") in (None, socket.gethostname())


def live_owner(directory: Path) -> dict | None:
    """The owner of ``directory``'s lock when it is another process running on this host, else None."""
    owner = read_owner(Path(directory) / LOCK_NAME)
    if owner is None or not _here(owner):
        return None  # unreadable or another host's: DirLock decides when the run starts
    return owner if owner["pid"] != os.getpid() and pid_alive(owner["pid"]) else None


def check_not_locked(directory: Path, option: str = "--out") -> None:
    """Refuse early (before loading a model) a directory a live pie process is writing."""
    owner = live_owner(directory)
    if owner is not None:
        raise in_use(option, directory, owner)


def _guard(path: Path) -> str:
    import hashlib
    import tempfile

    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:20]
    return str(Path(tempfile.gettempdir()) / f"pie-lock-takeover-{key}.lock")


def _abandoned(path: Path, age: float = 5.0) -> bool:
    """A lock file nobody can read (empty, garbled) that has not changed for ``age`` seconds."""
    try:
        return read_owner(path) is None and time.time() - path.stat().st_mtime > age
    except OSError:
        return False


def _stale(owner: dict | None) -> bool:
    """A lock of a process of this host that no longer runs."""
    return owner is not None and _here(owner) and owner["pid"] != os.getpid() and not pid_alive(owner["pid"])


class DirLock:
    """``with DirLock(dir, warn=...)``: hold ``dir/.pie.lock`` for the duration."""

    def __init__(self, directory: Path, *, option: str = "--out", warn: Callable[[str], None] | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.option = option
        self.warn = warn or (lambda _msg: None)
        self.held = False
        self._lock = None

    def acquire(self) -> DirLock:
        from filelock import FileLock

        if not (_stale(read_owner(self.path)) or _abandoned(self.path)):
            return self._take()
        # Judged again under a guard, so two processes finding one stale lock do not both take it. The
        # guard lives in the temporary folder: the run folder holds nothing but what the run writes.
        with FileLock(_guard(self.path), timeout=30):
            owner = read_owner(self.path)
            if _stale(owner):
                self.warn(
                    f"taking over a stale lock in {self.directory} left by pid {owner['pid']}, "
                    "which is no longer running."
                )
                if owner["legacy"]:  # pie 0.1.0's JSON lock: filelock cannot judge it
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
            elif _abandoned(self.path):
                self.warn(
                    f"taking over an unreadable lock file {self.path} (empty or garbled, untouched for a while)."
                )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            return self._take()

    def _take(self) -> DirLock:
        from filelock import SoftFileLock, Timeout

        self._lock = SoftFileLock(str(self.path), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            owner = read_owner(self.path)
            if owner is None:
                raise UserError(
                    f"{self.option} {self.directory} is being locked and unlocked by other processes; retry."
                ) from None
            if not _here(owner):
                raise UserError(
                    f"{self.option} {self.directory} is locked by pie process {owner['pid']} on host {owner['host']}; "
                    f"if that run is gone, delete {self.path}."
                ) from None
            raise in_use(self.option, self.directory, owner) from None
        self.held = True
        return self

    def release(self) -> None:
        if self.held and self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.release()
            self.held = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
