"""Helpers of the issue-12 tables (test_user_data, test_misread_inputs, test_hangs,
test_untrusted_files, test_no_pickle): the refusal contract, file-tree snapshots that never
open a FIFO or follow a link, pie in a child process with a hard timeout, and children parked
inside any pie function.

The refusal contract every "refused" row checks (:func:`check_refused`): exit status 2, nothing
on stdout, exactly one line on stderr starting ``Error: `` that contains the row's key words,
and not one file created, changed or removed under the roots snapshotted before the command
(the run's own ``.pie.lock`` and ``.NAME.PID.tmp`` files included).
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import reset_signals

REPO = Path(__file__).resolve().parents[1]
# How long a child may take before it counts as hung; a hang fails the row instead of the suite.
TIMEOUT = float(os.environ.get("PIE_TEST_HANG_TIMEOUT", "60"))


# --------------------------------------------------------------------------- snapshots


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots`` without following links or opening special files.

    A regular file is (digest, inode, mtime): replacing a file by a rename or rewriting it with
    the same bytes shows too. A link is its target, a FIFO or device just its kind (reading a
    FIFO would block, reading ``/dev/zero`` never ends).
    """
    seen: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if path.name == "models.json.lock":
                continue  # the registry's lock file (filelock keeps it on purpose)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                seen[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                seen[str(path)] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
                seen[str(path)] = ("file", digest, st.st_ino, st.st_mtime_ns)
            else:
                seen[str(path)] = ("special", stat.S_IFMT(st.st_mode))
    return seen


def changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """What differs between two snapshots, readably (created / removed / changed paths)."""
    found = [f"created {p}" for p in sorted(after.keys() - before.keys())]
    found += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    found += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return found


def assert_unchanged(before: dict[str, tuple], *roots: Path) -> None:
    diff = changes(before, snapshot(*roots))
    assert not diff, "files were created, changed or removed:\n  " + "\n  ".join(diff)


# --------------------------------------------------------------------------- the refusal contract


@dataclass(frozen=True)
class Outcome:
    """What a command did, in-process (CliRunner) or in a child process alike."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


def outcome(result) -> Outcome:
    if isinstance(result, Outcome):
        return result
    if isinstance(result, subprocess.CompletedProcess):
        return Outcome(result.returncode, result.stdout, result.stderr)
    return Outcome(result.exit_code, result.stdout, result.stderr)


def error_line(result) -> str:
    """The one ``Error: ...`` line of a refused command's stderr (nothing else may be there)."""
    result = outcome(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("Error: "), result.stderr
    return lines[0]


def check_refused(result, *keywords, before: dict | None = None, roots: tuple = ()) -> str:
    """Exit 2, empty stdout, one ``Error:`` line naming every key word, and (given ``before``) no change."""
    result = outcome(result)
    assert result.exit_code == 2, f"exit {result.exit_code}, expected 2 (a refusal):\n{result.output}"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", f"stdout must stay empty on a refusal:\n{result.output}"
    line = error_line(result)
    for word in keywords:
        assert str(word) in line, f"{str(word)!r} not named in {line!r}"
    if before is not None:
        assert_unchanged(before, *roots)
    return line


def check_ok(result) -> Outcome:
    result = outcome(result)
    assert result.exit_code == 0, f"exit {result.exit_code}, expected 0:\n{result.output}"
    return result


# --------------------------------------------------------------------------- pie in a child process


def child_env(**extra: str) -> dict[str, str]:
    """The test's (hermetic) environment, importing the pie_cli this test file belongs to."""
    env = os.environ.copy()  # PIE_HOME, HF_HOME, offline: set by conftest's hermetic_env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_pie(argv: list, *, timeout: float = TIMEOUT, cwd: Path | None = None) -> Outcome:
    """``python -m pie_cli --progress off ARGV`` in a child; a child still running after ``timeout`` s
    is killed and the test fails (a hang must never block the suite)."""
    command = [sys.executable, "-m", "pie_cli", "--progress", "off", *map(str, argv)]
    proc = subprocess.Popen(
        command,
        env=child_env(),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=reset_signals,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"pie {' '.join(map(str, argv))} still ran after {timeout:g} s (a hang); killed it.\n"
            f"stderr so far:\n{stderr}"
        )
    return Outcome(proc.returncode, stdout, stderr)


# `python -c PARK_IN pie-args...`: pie with one function wrapped. PIE_TEST_PARK_IN names it as
# "module:attribute" (e.g. "pie_cli.imaging.animation:write"); on its first call the child writes
# one byte to the "ready" pipe and blocks reading the "release" pipe until the test closes it,
# then calls the real function. So a signal the test sends while the child is parked lands
# inside that function, before it has written anything.
PARK_IN = r"""
import importlib, os
module_name, _, attribute = os.environ.pop("PIE_TEST_PARK_IN").partition(":")
ready, release = (int(fd) for fd in os.environ.pop("PIE_TEST_PARK_FDS").split(","))
module = importlib.import_module(module_name)
real = getattr(module, attribute)
state = {"parked": False}

def parked(*args, **kwargs):
    if not state["parked"]:
        state["parked"] = True
        os.write(ready, b"P")
        os.close(ready)
        os.read(release, 1)  # b"" once the test closes its end
    return real(*args, **kwargs)

setattr(module, attribute, parked)
from pie_cli.cli.app import main
main()
"""


class ParkedChild:
    """``pie ARGV`` in a child that parks on entering ``where`` ("module:attribute")."""

    def __init__(self, argv: list, where: str, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout", logs / "stderr"
        self._ready, ready_w = os.pipe()
        release_r, self._release = os.pipe()
        env = child_env(PIE_TEST_PARK_IN=where, PIE_TEST_PARK_FDS=f"{ready_w},{release_r}")
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", PARK_IN, "--progress", "off", *map(str, argv)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(ready_w, release_r),
                    preexec_fn=reset_signals,
                )
            finally:
                os.close(ready_w)
                os.close(release_r)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def wait_parked(self, timeout: float = TIMEOUT * 4) -> None:
        ready, _, _ = select.select([self._ready], [], [], timeout)
        if not ready:
            self.close()
            pytest.fail(f"the child did not reach its park point within {timeout:g} s:\n{self.stderr}")
        if os.read(self._ready, 1) != b"P":
            self.proc.wait(timeout=TIMEOUT)
            pytest.fail(f"the child exited ({self.proc.returncode}) before its park point:\n{self.stderr}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def release(self) -> None:
        if self._release is not None:
            os.close(self._release)
            self._release = None

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"the child still ran {timeout:g} s after it was signalled and released")

    def close(self) -> None:
        self.release()
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
