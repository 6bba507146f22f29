"""Nothing lost, nothing leaked, no silent failure: interrupts, kills, resume, locks, provenance,
pickle refusal and numerical failures of `pie simulate`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import finetune_argv, frames_of, manifest, pixels, simulate_argv

STEPS = 6
FAST = {"inference_steps": 20, "seed": 7}  # at 64 px on the CPU (simulate_argv)


def args(tiny_model, inputs, out, *extra):
    return simulate_argv(
        inputs["image"], out, *extra, model=tiny_model, mask=inputs["mask"], steps=STEPS, **FAST
    )


def child(*argv) -> subprocess.Popen:
    """`pie` in a child process (same hermetic environment as the test)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pie_cli", "--progress", "off", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def wait_for_frame(run: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> None:
    """Until the manifest says frame ``n`` is whole (the child is then somewhere in step n+1)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
        try:
            if manifest(run).get("last_complete_frame", -1) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"frame {n} never appeared")


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
    )
    assert proc.returncode == 0, proc.stderr
    return paths, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_run_keeps_whole_frames_and_resume_is_bit_identical(
    cli, tiny_model, reference, tmp_path, sig
):
    paths, ref = reference
    out = tmp_path / "run"
    proc = child(*args(tiny_model, paths, out))
    wait_for_frame(out, proc, 2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"Continue with: pie simulate --resume --out {out}" in stderr
    m = manifest(out)
    assert m["status"] == "interrupted"
    done = m["last_complete_frame"]
    assert 2 <= done < STEPS
    names = sorted(p.name for p in out.glob("frame_*.png"))
    assert names == [f"frame_{n:03d}.png" for n in range(done + 1)]  # whole frames only, no more
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
    cli, tiny_model, reference, tmp_path
):
    paths, ref = reference
    out = tmp_path / "run"
    proc = child(*args(tiny_model, paths, out))
    wait_for_frame(out, proc, 1)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    m = manifest(out)
    assert m["status"] == "running"  # nobody could say otherwise
    assert json.loads((out / ".pie.lock").read_text())["pid"] == proc.pid

    # A new run into the same directory is refused (not empty) ...
    again = cli(*args(tiny_model, paths, out))
    assert again.exit_code == 2 and "is not empty" in again.stderr
    # ... and --resume takes the dead process's lock over, with a warning.
    result = cli("simulate", "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"stale lock in {out} left by pid {proc.pid}" in result.stderr
    for n, (a, b) in enumerate(zip(frames_of(out), frames_of(ref), strict=True)):
        assert np.array_equal(a, b), f"frame {n} differs from the uninterrupted run"
    assert not (out / ".pie.lock").exists()


def interrupt_after(monkeypatch, frame: int) -> None:
    """Ctrl-C right after frame ``frame`` is written (in-process)."""
    from pie_cli.runs.writer import RunWriter

    original = RunWriter.write_frame

    def write_frame(self, n, *a, **k):
        original(self, n, *a, **k)
        if n == frame and self.path.name != "traj_01":
            raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "write_frame", write_frame)


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
    # Resume with an image or --overwrite is ambiguous.
    result = cli("simulate", inputs["image"], "--resume", "--out", out)
    assert result.exit_code == 2 and "drop IMAGE, --cohort and --overwrite" in result.stderr


def test_resuming_a_complete_run_does_nothing(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    assert cli(*args(tiny_model, inputs, out, "--steps", "1")).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = cli("simulate", "--resume", "--out", out)
    assert result.exit_code == 0 and "already complete" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# --------------------------------------------------------------------------- locks


def test_a_directory_in_use_by_a_live_process_is_refused(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock = {"pid": owner.pid, "host": socket.gethostname(), "started": "2026-11-25T10:00:00+0000"}
        (out / ".pie.lock").write_text(json.dumps(lock))
        for extra in ((), ("--overwrite",)):
            result = cli(*args(tiny_model, inputs, out, *extra))
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
    result = cli(*args(tiny_model, inputs, out, "--overwrite", "--steps", "1"))
    assert result.exit_code == 0, result.output
    assert f"taking over a stale lock in {out} left by pid {owner.pid}" in result.stderr
    assert not (out / ".pie.lock").exists()


def test_the_lock_is_exclusive_and_released(tmp_path):
    from pie_cli.errors import UserError
    from pie_cli.runs.locks import DirLock

    with DirLock(tmp_path) as held:
        assert held.held and json.loads((tmp_path / ".pie.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".pie.lock").exists()
    (tmp_path / ".pie.lock").write_text(json.dumps({"pid": 1, "started": "x"}))  # pid 1 always runs
    with pytest.raises(UserError, match=r"in use by another pie process \(pid 1, since x\)"):
        DirLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".pie.lock").read_text())["pid"] == 1


# --------------------------------------------------------------------------- provenance and privacy


def test_outputs_say_they_are_synthetic_and_name_no_input_path(cli, tiny_model, inputs, tmp_path):
    out = tmp_path / "run"
    result = cli(*args(tiny_model, inputs, out, "--steps", "2"))
    assert result.exit_code == 0, result.output
    m = manifest(out)
    for png in [*out.glob("frame_*.png"), out / "mask.png"]:
        text = Image.open(png).text
        assert text["synthetic"] == "true" and text["Software"].startswith("pie ")
        assert text["pie_run"] == m["run_id"]
    with Image.open(out / "progression.gif") as gif:
        comment = gif.info["comment"].decode()
    assert "Synthetic image generated by pie" in comment and m["run_id"] in comment
    raw = (out / "manifest.json").read_text()
    assert str(inputs["image"]) not in raw and "chest.png" not in raw and "argv" not in m
    assert m["inputs"]["image_sha256"] and m["inputs"]["image_size"] == [64, 64]
    assert m["synthetic"] is True


def test_watermark_changes_only_its_corner(cli, tiny_model, inputs, tmp_path):
    from pie_cli.imaging.annotate import watermark_box

    plain, marked = tmp_path / "plain", tmp_path / "marked"
    assert cli(*args(tiny_model, inputs, plain, "--steps", "2")).exit_code == 0
    assert cli(*args(tiny_model, inputs, marked, "--steps", "2", "--watermark")).exit_code == 0
    x0, y0, x1, y1 = watermark_box(Image.new("RGB", (64, 64)))
    for a, b in zip(frames_of(plain), frames_of(marked), strict=True):
        outside = np.ones(a.shape[:2], dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(a[outside], b[outside])
        assert not np.array_equal(a[~outside], b[~outside])
        assert (b[~outside] > 200).any() and (b[~outside] == 0).any()  # white text on black
    assert not (marked / ".resume").exists()


# --------------------------------------------------------------------------- pickle weights


def test_pickle_weights_need_allow_pickle(cli, tiny_model, inputs, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    refused = tmp_path / "refused"
    result = cli(*args(model, inputs, refused, "--steps", "1"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: model {model}: unet ({model / 'unet'}) has only pickle weights")
    assert result.stderr.endswith("or pass --allow-pickle if you trust the file.\n")
    assert not refused.exists()

    loaded, safe = tmp_path / "loaded", tmp_path / "safe"
    result = cli(*args(model, inputs, loaded, "--steps", "1", "--allow-pickle"))
    assert result.exit_code == 0, result.output
    assert "loading pickle weights" in result.stderr and "load only files you trust" in result.stderr
    assert cli(*args(tiny_model, inputs, safe, "--steps", "1")).exit_code == 0
    for a, b in zip(frames_of(loaded), frames_of(safe), strict=True):
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------- numerical safety


def test_nan_in_decoded_frames_stops_the_run_without_writing_black(
    cli, tiny_model, inputs, tmp_path, monkeypatch
):
    import torch
    from diffusers import AutoencoderKL

    decode = AutoencoderKL.decode
    calls = {"n": 0}

    def broken(self, z, *a, **k):
        calls["n"] += 1
        out = decode(self, z, *a, **k)
        if calls["n"] == 2:  # the second progression step overflows
            out.sample.fill_(float("nan"))
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", broken)
    out = tmp_path / "run"
    result = cli(*args(tiny_model, inputs, out, "--steps", "3"))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: progression step 2: the VAE decoded NaN or infinite pixels")
    assert "Rerun with --dtype fp32." in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in out.glob("frame_*.png")) == ["frame_000.png", "frame_001.png"]
    m = manifest(out)
    assert m["status"] == "failed" and m["last_complete_frame"] == 1
    assert torch.isfinite(torch.tensor(frames_of(out)[1], dtype=torch.float32)).all()


# --------------------------------------------------------------------------- registry


def test_concurrent_models_add_keeps_every_alias(tiny_model):
    from pie_cli.core.registry import load_user_models, user_models_file

    procs = [child("models", "add", f"cxr{i}", tiny_model) for i in range(6)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert sorted(load_user_models()) == [f"cxr{i}" for i in range(6)]
    assert json.loads(user_models_file().read_text())["version"] == 1
    leftovers = [p.name for p in user_models_file().parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_finetune_refuses_a_pickle_base_model_before_writing_anything(cli, tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert cli("demo", "data", "--out", tmp_path / "data", "-n", "4").exit_code == 0
    data = tmp_path / "data"

    def train(out, *extra):
        return finetune_argv(data, model, out, *extra, resolution=64, max_steps=1)

    result = cli(*train(tmp_path / "refused"))
    assert result.exit_code == 2 and "or pass --allow-pickle if you trust the file." in result.stderr
    assert not (tmp_path / "refused").exists()
    result = cli(*train(tmp_path / "trained", "--allow-pickle"))
    assert result.exit_code == 0, result.output
    assert "loading pickle weights" in result.stderr
    assert (tmp_path / "trained" / "pytorch_lora_weights.safetensors").is_file()


def test_an_interrupted_cohort_goes_on_where_it_stopped(cli, tiny_model, inputs, tmp_path, monkeypatch):
    import csv

    from pie_cli.runs.writer import RunWriter

    cohort = tmp_path / "cases.csv"
    with open(cohort, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "mask", "prompt", "out"])
        writer.writerow([inputs["image"], inputs["mask"], "small effusion", "a"])
        writer.writerow([inputs["image"], inputs["mask"], "large effusion", "b"])

    def run(out):
        return simulate_argv(None, out, "--cohort", cohort, model=tiny_model, prompt=None, steps=3, **FAST)

    assert cli(*run(tmp_path / "whole")).exit_code == 0

    original = RunWriter.write_frame

    def write_frame(self, n, *a, **k):
        original(self, n, *a, **k)
        if self.path.name == "b" and n == 1:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(RunWriter, "write_frame", write_frame)
        result = cli(*run(out))
    assert result.exit_code == 130
    assert "interrupted during cohort case b" in result.stderr and "Rerun the same command" in result.stderr
    with open(out / "cohort_summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["complete", "interrupted"]
    result = cli(*run(out))
    assert result.exit_code == 0, result.output
    with open(out / "cohort_summary.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["skipped (complete)", "complete"]
    assert manifest(out / "b")["resumed"][0]["after_step"] == 1
    for case in ("a", "b"):
        got, want = frames_of(out / case), frames_of(tmp_path / "whole" / case)
        assert len(got) == 4 and all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))
