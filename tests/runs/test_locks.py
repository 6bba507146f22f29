"""`.pie.lock`: one process writes a run folder; a live owner is refused, a dead one's lock taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import reset_signals, simulate_argv


def test_a_directory_in_use_by_a_live_process_is_refused(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()

    def args(*extra):
        return simulate_argv(
            inputs["image"],
            out,
            *extra,
            model=tiny_model,
            mask=inputs["mask"],
            steps=6,
            inference_steps=20,
            seed=7,
        )

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=reset_signals)
    try:
        import socket

        lock = {"pid": owner.pid, "host": socket.gethostname(), "started": "2026-11-25T10:00:00+0000"}
        (out / ".pie.lock").write_text(json.dumps(lock))
        for extra in ((), ("--overwrite",)):
            result = cli(*args(*extra))
            assert result.exit_code == 2
            assert result.stderr == (
                f"Error: --out {out} is in use by another pie process (pid {owner.pid}, since "
                "2026-11-25T10:00:00+0000); wait for it or choose another directory.\n"
            )
        assert sorted(p.name for p in out.iterdir()) == [".pie.lock"]
    finally:
        owner.kill()
        owner.wait()
    # Its owner is gone now: the lock is stale and --overwrite takes it over.
    result = cli(*args("--overwrite", "--steps", "1"))
    assert result.exit_code == 0, result.output
    assert f"taking over a stale lock in {out} left by pid {owner.pid}" in result.stderr
    assert not (out / ".pie.lock").exists()


def test_the_lock_is_exclusive_and_released(tmp_path):
    from pie_cli.errors import UserError
    from pie_cli.runs.locks import DirLock, read_owner

    with DirLock(tmp_path) as held:
        assert held.held and read_owner(tmp_path / ".pie.lock")["pid"] == os.getpid()
        with pytest.raises(UserError, match="in use by another pie process"):  # the process itself, once
            DirLock(tmp_path).acquire()
    assert not (tmp_path / ".pie.lock").exists()
    (tmp_path / ".pie.lock").write_text(json.dumps({"pid": 1, "started": "x"}))  # pid 1 always runs
    with pytest.raises(UserError, match=r"in use by another pie process \(pid 1, since x\)"):
        DirLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".pie.lock").read_text())["pid"] == 1
