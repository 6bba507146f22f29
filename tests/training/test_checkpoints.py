"""`pie finetune` checkpoints and resume: it survives SIGKILL, SIGTERM, Ctrl-C and NaNs.

Real child processes (``python -m pie_cli finetune``) are killed or signalled mid-training;
``--resume latest`` (or a checkpoint's path) then has to give bit-identical weights and the
same loss log as one uninterrupted run with the same seed and settings.
"""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import colour_folder, finetune_argv, losses

MAX_STEPS = 6  # 4 images, batches of 2: an epoch every 2 steps, so resumes cross epochs
COMMON = (  # with finetune_argv's 32 px, batches of 2, no data workers
    "--max-steps",
    str(MAX_STEPS),
    "--checkpoint-every",
    "2",
    "--lr",
    "1e-2",
    "--lr-scheduler",
    "cosine",
    "--rank",
    "4",
    "--seed",
    "3",
)
WEIGHTS = "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------- helpers
def rows(out: Path) -> list[tuple[int, str, str]]:
    """(step, loss, lr) of metrics.csv: everything but the wall-clock seconds."""
    path = out / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        found = list(csv.reader(fh))[1:]
    return [(int(r[0]), r[1], r[2]) for r in found if len(r) == 5 and r[0].isdigit()]


def last_step(out: Path) -> int:
    found = rows(out)
    return found[-1][0] if found else 0


def checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def leftovers(out: Path) -> list[Path]:
    """Half-written things: temporary files/folders, checkpoint folders without their marker."""
    from pie_cli.training.checkpoints import incomplete_checkpoints

    temporary = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".lora-")]
    return temporary + incomplete_checkpoints(out)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert wa and wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:2]}"


@pytest.fixture(scope="module")
def _cache() -> dict:
    return {}


@pytest.fixture
def straight(cli, tiny_model, tmp_path_factory, _cache) -> dict:
    """One uninterrupted run (made once): its data folder and run directory."""
    if not _cache:
        root = tmp_path_factory.mktemp("straight")
        data = colour_folder(root / "data", n=4)
        out = root / "run"
        result = cli(*finetune_argv(data, tiny_model, out, *COMMON))
        assert result.exit_code == 0, result.output
        assert len(rows(out)) == MAX_STEPS
        _cache.update(data=data, out=out)
    return _cache


def resume_and_compare(cli, out: Path, straight: dict, *extra: str):
    from pie_cli.training.checkpoints import checkpoint_step, latest_checkpoint

    start = checkpoint_step(latest_checkpoint(out))
    result = cli("finetune", "--out", out, "--resume", "latest", *extra)
    assert result.exit_code == 0, result.output
    assert f"resumed from {out / 'checkpoints' / f'step_{start:06d}'} at step {start}" in result.stderr
    assert_same_weights(straight["out"], out)
    expected = rows(straight["out"])
    assert [r for r in rows(out) if r[0] > start] == [r for r in expected if r[0] > start]
    assert rows(out) == expected
    assert not leftovers(out)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["status"] == "complete" and summary["step"] == MAX_STEPS
    return result


# ---------------------------------------------------------------------------- SIGKILL
def test_sigkill_then_resume_latest_is_bit_identical(cli, child, straight, tiny_model, tmp_path):
    from pie_cli.training.checkpoints import COMPLETE, checkpoint_step, is_complete, latest_checkpoint

    out = tmp_path / "run"
    # parked while computing step 4: step 2 is checkpointed and step 3 done after it
    run = child(finetune_argv(straight["data"], tiny_model, out, *COMMON), park="step:3")
    run.wait_parked()
    run.send_signal(signal.SIGKILL)  # no handler, no cleanup
    assert run.wait() == -signal.SIGKILL
    good = latest_checkpoint(out)
    assert good is not None and is_complete(good)
    step = checkpoint_step(good)
    assert step == 2 and last_step(out) == 3 and not (out / WEIGHTS).exists()

    # What a kill *while saving* leaves: by an older pie, step_N itself with a truncated file and
    # no marker; by this one, a temporary folder; and a temporary file of an atomic write.
    broken = out / "checkpoints" / f"step_{step + 2:06d}"
    broken.mkdir(exist_ok=True)
    for f in good.iterdir():
        if f.name != COMPLETE:
            (broken / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (broken / COMPLETE).unlink(missing_ok=True)
    half = out / "checkpoints" / f".step_{step + 4:06d}.tmp"
    half.mkdir(exist_ok=True)
    (half / "optimizer.bin").write_bytes(b"\0" * 10)
    (out / ".training_summary.json.99999.tmp").write_text("{")
    assert latest_checkpoint(out) == good  # the broken, newer step_N is not "latest"

    result = resume_and_compare(cli, out, straight)
    assert f"skipping {broken}: an incomplete checkpoint" in result.stderr
    assert (broken / COMPLETE).is_file()  # replaced by the resumed run's complete save of that step
    assert checkpoints(out) == [f"step_{s:06d}" for s in (2, 4, 6)]


def test_resume_from_an_incomplete_checkpoint_path_is_refused(cli, straight, tmp_path):
    import shutil

    from pie_cli.training.checkpoints import COMPLETE

    out = tmp_path / "copy"
    shutil.copytree(straight["out"], out)
    target = out / "checkpoints" / "step_000006"
    (target / COMPLETE).unlink()
    result = cli("finetune", "--resume", target)
    assert result.exit_code == 2
    assert "is not a complete checkpoint" in result.stderr and "Traceback" not in result.output


# ---------------------------------------------------------------------------- SIGTERM / Ctrl-C
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_resume_is_bit_identical(
    cli, child, straight, tiny_model, tmp_path, how
):
    from pie_cli.training.checkpoints import checkpoint_step, is_complete, latest_checkpoint

    out = tmp_path / "run"
    args = finetune_argv(straight["data"], tiny_model, out, *COMMON)
    # parked while computing step 4 (step 2 checkpointed, step 3 done): the signal lands there
    if how == "SIGTERM":  # e.g. `kill PID`, a scheduler's preemption
        run = child(args, park="step:3")
        name = "SIGTERM"
    else:  # a terminal's Ctrl-C: SIGINT to the whole process group, data worker included
        run = child([*args, "--num-workers", "1"], park="step:3", start_new_session=True)
        name = "SIGINT"
    run.wait_parked()
    if how == "SIGTERM":
        run.send_signal(signal.SIGTERM)
    else:
        os.killpg(run.pid, signal.SIGINT)
    run.release()
    assert run.wait() == 130, run.stderr
    stderr = run.stderr
    assert "Traceback" not in stderr, stderr
    # the loop finished its step and saved it: nothing to redo on resume
    step = last_step(out)
    assert step == 4
    good = latest_checkpoint(out)
    assert good is not None and is_complete(good) and checkpoint_step(good) == step < MAX_STEPS
    assert f"stopped by {name} at step {step} of {MAX_STEPS}; saved checkpoint {good}." in stderr
    assert f"Continue with: pie finetune --out {out} --resume latest" in stderr
    assert stderr.count("Error: ") == 1 and "Error: interrupted." not in stderr
    assert stderr.count(f"{name}: stopping after this step") == 1  # not repeated by the data worker
    summary = json.loads((out / "training_summary.json").read_text())
    assert (summary["status"], summary["step"], summary["signal"]) == ("interrupted", step, name)
    assert not (out / WEIGHTS).exists() and not leftovers(out)

    resume_and_compare(cli, out, straight, *(["--num-workers", "0"] if how == "Ctrl-C" else []))


def test_signals_in_process_stop_exactly_where_sent_and_resume_is_bit_identical(
    cli, terminal_signals, straight, tiny_model, tmp_path, monkeypatch
):
    """Deterministic: one SIGTERM while step 3 is computed stops after step 3 with its own
    checkpoint (resume mid-epoch); two SIGINTs while step 5 is computed interrupt at once, and
    the resume redoes step 5 from checkpoint 4 (an epoch boundary). ``terminal_signals`` makes
    SIGINT raise even when pytest runs with it ignored (StopSignals leaves an ignored signal be)."""
    from pie_cli.training import loop

    real_loss = loop.Trainer.loss
    send = {}  # state.step (steps done) -> signals to send while computing the next step

    def loss_and_signals(self, batch):
        for sig in send.pop(self.state.step, ()):
            os.kill(os.getpid(), sig)
        return real_loss(self, batch)

    monkeypatch.setattr(loop.Trainer, "loss", loss_and_signals)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "run"
    checkpoint = out / "checkpoints"

    send[2] = [signal.SIGTERM]
    result = cli(*finetune_argv(straight["data"], tiny_model, out, *COMMON))
    assert result.exit_code == 130
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    assert f"stopped by SIGTERM at step 3 of {MAX_STEPS}; saved checkpoint {checkpoint / 'step_000003'}." in (
        result.stderr
    )
    assert last_step(out) == 3 and checkpoints(out) == ["step_000002", "step_000003"]

    send[4] = [signal.SIGINT, signal.SIGINT]
    result = cli("finetune", "--out", out, "--resume", "latest")
    assert result.exit_code == 130
    assert {s: signal.getsignal(s) for s in before} == before
    assert (
        f"interrupted by SIGINT at step 4 of {MAX_STEPS}; the last complete checkpoint is "
        f"{checkpoint / 'step_000004'} (the steps after it will be trained again)." in result.stderr
    )
    assert f"Continue with: pie finetune --out {out} --resume latest" in result.stderr
    assert checkpoints(out) == ["step_000002", "step_000003", "step_000004"] and not leftovers(out)

    resume_and_compare(cli, out, straight)


# ---------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("what", ["loss", "weights"])
def test_nan_stops_with_exit_1_and_keeps_the_last_good_checkpoint(
    cli, straight, tiny_model, tmp_path, monkeypatch, what
):
    from pie_cli.training import loop

    real_loss = loop.Trainer.loss

    def poisoned(self, batch):
        loss = real_loss(self, batch)
        if self.state.step == 2:  # computing step 3, after the checkpoint of step 2
            if what == "loss":
                return loss * float("nan")
            with torch.no_grad():
                self.params[0].view(-1)[0] = float("inf")  # a finite loss, broken weights
        return loss

    monkeypatch.setattr(loop.Trainer, "loss", poisoned)
    out = tmp_path / "run"
    result = cli(*finetune_argv(straight["data"], tiny_model, out, *COMMON, "--checkpoint-every", "1"))
    assert result.exit_code == 1, result.output
    good = out / "checkpoints" / "step_000002"
    message = {
        "loss": "the training loss became nan at step 3",
        "weights": "the trained weights became NaN/inf at step 3",
    }[what]
    assert message in result.stderr and f"Last good checkpoint: {good}." in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.output
    assert checkpoints(out) == ["step_000001", "step_000002"] and not leftovers(out)
    state = load_file(good / "unet_lora.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())
    assert not (out / WEIGHTS).exists()  # no final weights claiming a finished run
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["status"] == "failed" and message in summary["error"]
    assert rows(out) == rows(straight["out"])[: 2 if what == "loss" else 3]


# ---------------------------------------------------------------------------- resume in-process
def test_resume_after_an_interrupt_equals_an_uninterrupted_run(cli, data, tiny_model, tmp_path, monkeypatch):
    common = [
        "--max-steps",
        "4",
        "--checkpoint-every",
        "2",
        "--lr-scheduler",
        "cosine",
        "--lr",
        "1e-2",
        "--lora-dropout",
        "0.1",
        "--rank",
        "4",
        "--train-text-encoder",
    ]
    assert cli(*finetune_argv(data, tiny_model, tmp_path / "straight", *common)).exit_code == 0

    from pie_cli.training import loop

    real_checkpoint = loop.Trainer.checkpoint

    def checkpoint_then_interrupt(self, step):
        path = real_checkpoint(self, step)
        if step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop.Trainer, "checkpoint", checkpoint_then_interrupt)
    result = cli(*finetune_argv(data, tiny_model, tmp_path / "resumed", *common))
    assert result.exit_code == 130
    summary = json.loads((tmp_path / "resumed" / "training_summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == 2
    monkeypatch.setattr(loop.Trainer, "checkpoint", real_checkpoint)

    result = cli(
        "finetune", "--out", tmp_path / "resumed", "--resume", "latest"
    )  # everything else from the run
    assert result.exit_code == 0, result.output
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")

    from diffusers import StableDiffusionPipeline  # the text-encoder adapter reaches a plain pipeline too

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    ids = pipe.tokenizer(["a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(tmp_path / "straight")
        pipe.text_encoder.eval()
        assert (pipe.text_encoder(ids)[0] - before).abs().max() > 1e-4


def test_keep_checkpoints_and_resume_from_a_path(cli, data, tiny_model, tmp_path):
    out = tmp_path / "run"
    argv = finetune_argv(
        data, tiny_model, out, "--checkpoint-every", "1", "--keep-checkpoints", "2", max_steps=3
    )
    assert cli(*argv).exit_code == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    result = cli(
        "finetune",
        "--resume",
        out / "checkpoints" / "step_000002",
        "--max-steps",
        "5",
        "--allow-schedule-change",
    )
    assert result.exit_code == 0, result.output  # the run directory is the checkpoint's grandparent
    assert [int(row) for row in np.loadtxt(out / "metrics.csv", delimiter=",", skiprows=1, usecols=0)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert json.loads((out / "training_summary.json").read_text())["resumed_from"].endswith("step_000002")
