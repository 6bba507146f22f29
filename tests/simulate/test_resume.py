"""`pie simulate` stopped and continued: signals, SIGKILL, Ctrl-C in-process, `--resume`.

Nothing lost, nothing leaked: an interrupted run keeps only whole, counted frames and says
how to go on; `--resume` then gives frames bit-identical to one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import frames_of, manifest, pixels, reset_signals, simulate_argv

STEPS = 6
FAST = {"inference_steps": 20, "seed": 7}  # at 64 px on the CPU (simulate_argv)


def args(tiny_model, inputs, out, *extra):
    return simulate_argv(
        inputs["image"], out, *extra, model=tiny_model, mask=inputs["mask"], steps=STEPS, **FAST
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, phantom):
    """An uninterrupted run, in a child process like the interrupted ones."""
    base = tmp_path_factory.mktemp("reference")
    image, _, left = phantom
    paths = {"image": base / "chest.png", "mask": base / "left-lung.png"}
    image.save(paths["image"])
    left.save(paths["mask"])
    out = base / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pie_cli", "--progress", "off", *map(str, args(tiny_model, paths, out))],
        capture_output=True,
        text=True,
        preexec_fn=reset_signals,  # module-scoped: may run before terminal_signals
    )
    assert proc.returncode == 0, proc.stderr
    return paths, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_keeps_whole_frames_and_resume_is_bit_identical(
    cli, child, tiny_model, reference, tmp_path, sig
):
    """The child is parked right after frame 2 is written and counted; the signal lands there."""
    paths, ref = reference
    out = tmp_path / "run"
    run = child(args(tiny_model, paths, out), park="frame:2")
    run.wait_parked()
    run.send_signal(sig)
    run.release()
    assert run.wait(timeout=120) == 130, run.stderr
    stderr = run.stderr

    assert "Traceback" not in stderr
    assert f"Continue with: pie simulate --resume --out {out}" in stderr
    m = manifest(out)
    assert m["status"] == "interrupted"
    done = m["last_complete_frame"]
    assert done == 2
    names = sorted(p.name for p in out.glob("frame_*.png"))
    assert names == [f"frame_{n:03d}.png" for n in range(done + 1)]  # whole, counted frames only
    assert not (out / "frame_003.png").exists()
    assert not list(out.rglob("*.tmp")) and not (out / ".pie.lock").exists()
    assert not (out / "progression.gif").exists()

    result = cli("simulate", "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"resuming {out} after step {done} of {STEPS}" in result.stderr
    assert manifest(out)["status"] == "complete"
    assert manifest(out)["resumed"][0]["after_step"] == done
    got, want = frames_of(out), frames_of(ref)
    assert len(got) == len(want) == STEPS + 1
    for n, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.array_equal(a, b), f"frame {n} differs from the uninterrupted run"
    assert (out / "progression.gif").is_file()
    assert "rng_states" not in manifest(out)


def test_sigkill_leaves_a_resumable_run_and_its_stale_lock_is_taken_over(
    cli, child, tiny_model, reference, tmp_path
):
    """The child is parked right after frame 1; SIGKILL then stops it there, no handler runs."""
    paths, ref = reference
    out = tmp_path / "run"
    run = child(args(tiny_model, paths, out), park="frame:1")
    run.wait_parked()
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    m = manifest(out)
    assert m["status"] == "running"  # nobody could say otherwise
    assert m["last_complete_frame"] == 1
    from pie_cli.runs.locks import read_owner

    assert read_owner(out / ".pie.lock")["pid"] == run.pid

    # A new run into the same directory is refused (not empty) ...
    again = cli(*args(tiny_model, paths, out))
    assert again.exit_code == 2 and "is not empty" in again.stderr
    # ... and --resume takes the dead process's lock over, with a warning.
    result = cli("simulate", "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"stale lock in {out} left by pid {run.pid}" in result.stderr
    for n, (a, b) in enumerate(zip(frames_of(out), frames_of(ref), strict=True)):
        assert np.array_equal(a, b), f"frame {n} differs from the uninterrupted run"
    assert not (out / ".pie.lock").exists()


def interrupt_after(monkeypatch, frame: int) -> None:
    """Ctrl-C right after frame ``frame`` is written (in-process, exactly there: no signal to deliver)."""
    from pie_cli.runs.writer import RunWriter

    original = RunWriter.write_frame

    def write_frame(self, n, *a, **k):
        original(self, n, *a, **k)
        if n == frame and self.path.name != "traj_01":
            raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "write_frame", write_frame)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_in_process_stop_exactly_after_the_frame_where_sent(
    cli, terminal_signals, tiny_model, reference, tmp_path, monkeypatch, sig
):
    """A real signal (so SIGTERM goes through terminate_as_interrupt), sent from the main thread
    right after frame 2: CPython runs the handler before os.kill returns, so the run stops there."""
    from pie_cli.runs.writer import RunWriter

    paths, ref = reference
    original = RunWriter.write_frame

    def write_frame(self, n, *a, **k):
        original(self, n, *a, **k)
        if n == 2:
            os.kill(os.getpid(), sig)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(RunWriter, "write_frame", write_frame)
        result = cli(*args(tiny_model, paths, out))
    assert result.exit_code == 130, result.output
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    assert f"Continue with: pie simulate --resume --out {out}" in result.stderr
    assert manifest(out)["status"] == "interrupted" and manifest(out)["last_complete_frame"] == 2
    assert sorted(p.name for p in out.glob("frame_*.png")) == [f"frame_{n:03d}.png" for n in range(3)]
    result = cli("simulate", "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    for n, (a, b) in enumerate(zip(frames_of(out), frames_of(ref), strict=True)):
        assert np.array_equal(a, b), f"frame {n} differs from the uninterrupted run"


def test_trajectories_and_watermark_resume_bit_identical(cli, tiny_model, inputs, tmp_path, monkeypatch):
    extra = ("--trajectories", "2", "--steps", "3", "--watermark")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli(*args(tiny_model, inputs, whole, *extra)).exit_code == 0
    with monkeypatch.context() as m:
        interrupt_after(m, 2)  # traj_00 has frame 2, traj_01 not yet: step 2 is not whole
        result = cli(*args(tiny_model, inputs, cut, *extra))
    assert result.exit_code == 130 and "interrupted after progression step 1 of 3" in result.stderr
    assert manifest(cut)["status"] == manifest(cut / "traj_01")["status"] == "interrupted"
    assert (cut / "traj_00" / "frame_002.png").is_file() and not (cut / "traj_01" / "frame_002.png").exists()
    assert (cut / "traj_00" / ".resume" / "frame_001.png").is_file()  # the clean frame to go on from
    result = cli("simulate", "--resume", "--out", cut)
    assert result.exit_code == 0, result.output
    for traj in ("traj_00", "traj_01"):
        assert not (cut / traj / ".resume").exists()
        a, b = frames_of(whole / traj), frames_of(cut / traj)
        assert len(a) == len(b) == 4
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    for name in ("uncertainty.png", "mean_final.png"):
        assert np.array_equal(pixels(Image.open(whole / name)), pixels(Image.open(cut / name)))


def test_resume_refuses_what_it_cannot_continue(cli, tiny_model, inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert cli("simulate", "--resume").exit_code == 2
    result = cli("simulate", "--resume", "--out", tmp_path / "nothing")
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"Error: --resume: {tmp_path / 'nothing'} has no manifest.json; there is no pie run to resume there.\n"
    )
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        assert cli(*args(tiny_model, inputs, out)).exit_code == 130
    # A frame edited after pie wrote it cannot be continued from exactly.
    Image.new("RGB", (64, 64)).save(out / "frame_002.png")
    result = cli("simulate", "--resume", "--out", out)
    assert result.exit_code == 2
    assert "frame_002.png was changed after pie wrote it" in result.stderr
    # Resume with --overwrite is a contradiction (IMAGE given again must only match: tests/test_untrusted_files.py).
    result = cli("simulate", "--resume", "--out", out, "--overwrite")
    assert result.exit_code == 2 and "drop --cohort and --overwrite" in result.stderr


def test_resuming_a_complete_run_does_nothing(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    assert cli(*args(tiny_model, inputs, out, "--steps", "1")).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = cli("simulate", "--resume", "--out", out)
    assert result.exit_code == 0 and "already complete" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_interrupt_marks_the_manifest(cli, inputs, tiny_model, tmp_path, monkeypatch):
    import pie_cli.core.progression as progression

    real = progression._progression_step

    def interrupt_at_two(components, prep, x_prev, n, *args):
        if n == 2:
            raise KeyboardInterrupt
        return real(components, prep, x_prev, n, *args)

    monkeypatch.setattr(progression, "_progression_step", interrupt_at_two)
    out = tmp_path / "run"
    result = cli(
        *simulate_argv(
            inputs["image"], out, model=tiny_model, mask=inputs["mask"], steps=3, inference_steps=10
        )
    )
    assert result.exit_code == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["last_complete_frame"] == 1
    assert sorted(p.name for p in out.glob("frame_*.png")) == ["frame_000.png", "frame_001.png"]
