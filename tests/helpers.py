"""Plain helpers shared by the test modules: images, tiny command lines, data, child processes.

Fixtures live in ``conftest.py``; everything here is an ordinary function or class, imported
as ``from tests.helpers import ...``.
"""

from __future__ import annotations

import csv
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROMPT = "large left pleural effusion"
HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit of every faked HF cache snapshot


# --------------------------------------------------------------------------- images and run folders


def half_mask(size: int, side: str = "left") -> Image.Image:
    arr = np.zeros((size, size), dtype=np.uint8)
    if side == "left":
        arr[:, : size // 2] = 255
    else:
        arr[:, size // 2 :] = 255
    return Image.fromarray(arr, mode="L")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def zeros_randn(monkeypatch) -> None:
    """Replace every torch.randn draw by zeros (the noise-free mode of DESIGN.md section 2)."""
    import torch

    def zeros(*size, generator=None, **kwargs):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        kwargs.pop("layout", None)
        return torch.zeros(*size, **kwargs)

    monkeypatch.setattr(torch, "randn", zeros)


def frames_of(run: Path) -> list[np.ndarray]:
    """The frames of a run folder, in order, as int16 RGB arrays."""
    return [pixels(Image.open(p)) for p in sorted(run.glob("frame_*.png"))]


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


# --------------------------------------------------------------------------- tiny command lines


def simulate_argv(
    image: Path | None,
    out: Path,
    *extra,
    model,
    mask: Path | None = None,
    prompt: str | None = PROMPT,
    steps: int | None = 1,
    inference_steps: int | None = 4,
    resolution: int | None = 64,
    device: str | None = "cpu",
    seed: int | None = None,
) -> list:
    """``pie simulate`` on the tiny model, small and fast; ``extra`` comes last, so it wins.

    ``None`` leaves an option out (pie's default then applies); ``image=None`` is for
    ``--cohort`` and ``--resume`` runs.
    """
    argv: list = ["simulate"]
    if image is not None:
        argv.append(image)
    options = {
        "--prompt": prompt,
        "--mask": mask,
        "--model": model,
        "--steps": steps,
        "--inference-steps": inference_steps,
        "--resolution": resolution,
        "--device": device,
        "--seed": seed,
        "--out": out,
    }
    for name, value in options.items():
        if value is not None:
            argv += [name, value]
    return [*argv, *extra]


def phantom_run(base: Path, model, phantom, *extra, steps: int = 2, name: str = "run") -> Path:
    """A finished `pie simulate` run (in-process) of the phantom chest with its left-lung mask:
    ``base/chest.png``, ``base/left-lung.png`` and the run in ``base/name``; ``extra`` options last."""
    from typer.testing import CliRunner

    from pie_cli.cli.app import app

    image, _, left = phantom
    image.save(base / "chest.png")
    left.save(base / "left-lung.png")
    out = base / name
    argv = simulate_argv(
        base / "chest.png", out, *extra, model=model, mask=base / "left-lung.png", steps=steps
    )
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    return out


def finetune_argv(
    data: Path | None,
    model,
    out: Path,
    *extra,
    resolution: int | None = 32,
    batch_size: int | None = 2,
    num_workers: int | None = 0,
    max_steps: int | None = None,
) -> list:
    """``pie finetune`` on the tiny model at 32 px, in-process data loading; ``extra`` comes last."""
    options = {
        "--data": data,
        "--model": model,
        "--out": out,
        "--resolution": resolution,
        "--batch-size": batch_size,
        "--num-workers": num_workers,
        "--max-steps": max_steps,
    }
    argv: list = ["finetune"]
    for name, value in options.items():
        if value is not None:
            argv += [name, value]
    return [*argv, *extra]


# --------------------------------------------------------------------------- training data

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (240, 240, 240)}


def colour_folder(root: Path, n: int = 8, size: int = 32, fmt: str = "jsonl") -> Path:
    """An image folder: solid colours, one prompt per colour (a task a model can learn)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", (size, size), COLOURS[name]).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {name} square"})
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(root / "metadata.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def losses(out: Path) -> list[float]:
    """The loss column of a `pie finetune` run's metrics.csv."""
    with open(out / "metrics.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


# --------------------------------------------------------------------------- child processes


def reset_signals() -> None:
    """``preexec_fn`` of every child: SIGINT and SIGTERM at their defaults, as from a terminal.

    A child inherits an *ignored* signal (pytest started as a background job of a
    non-interactive shell ignores SIGINT); Python would then install no Ctrl-C handler.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# `python -c PARK pie-args...`: pie with one park point added. At the point named by
# PIE_TEST_PARK the child writes one byte to the "ready" pipe and then (except at "registry")
# blocks reading the "release" pipe until the test closes it. A test sends its signal while
# the child is parked there and only then releases it, so the signal lands at exactly that
# point: a signal that arrives just before the blocking read is handled right after it.
#
#   frame:N     after RunWriter.write_frame(N) returns: frame N is on disk and counted
#   step:N      in Trainer.loss when state.step == N: N optimizer steps done, step N+1 begun
#   registry    on entering edit_user_models, before its lock (no wait: the test holds the lock)
PARK = r"""
import os
where, _, at = os.environ.pop("PIE_TEST_PARK").partition(":")
ready, release = (int(fd) for fd in os.environ.pop("PIE_TEST_PARK_FDS").split(","))
state = {"parked": False}

def park(wait=True):
    if state["parked"]:
        return
    state["parked"] = True
    os.write(ready, b"P")
    os.close(ready)
    if wait:
        os.read(release, 1)  # b"" once the test closes its end

if where == "frame":
    from pie_cli.runs.writer import RunWriter
    write_frame = RunWriter.write_frame
    def parked_write_frame(self, n, *args, **kwargs):
        write_frame(self, n, *args, **kwargs)
        if n == int(at):
            park()
    RunWriter.write_frame = parked_write_frame
elif where == "step":
    from pie_cli.training.loop import Trainer
    loss = Trainer.loss
    def parked_loss(self, batch):
        if self.state.step == int(at):
            park()
        return loss(self, batch)
    Trainer.loss = parked_loss
elif where == "registry":
    import contextlib
    from pie_cli.core import registry
    edit = registry.edit_user_models
    @contextlib.contextmanager
    def parked_edit():
        park(wait=False)
        with edit() as models:
            yield models
    registry.edit_user_models = parked_edit
else:
    raise SystemExit(f"unknown park point {where!r}")

from pie_cli.cli.app import main
main()
"""


class Child:
    """``pie ARGV`` in a child process with the test's (hermetic) environment.

    stdout and stderr go to files in ``logs``. With ``park`` ("frame:2", "step:3",
    "registry") the child runs through :data:`PARK`; :meth:`wait_parked` returns once it
    sits at that point, :meth:`release` lets it go on.
    """

    def __init__(self, argv: list, logs: Path, park: str | None = None, **popen) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout", logs / "stderr"
        env = os.environ.copy()  # PIE_HOME, HF_HOME, offline: set by conftest
        self._ready = self._release = None
        pass_fds: tuple[int, ...] = ()
        if park is None:
            command = [sys.executable, "-m", "pie_cli"]
        else:
            command = [sys.executable, "-c", PARK]
            self._ready, ready_w = os.pipe()
            release_r, self._release = os.pipe()
            env.update(PIE_TEST_PARK=park, PIE_TEST_PARK_FDS=f"{ready_w},{release_r}")
            pass_fds = (ready_w, release_r)
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            try:
                self.proc = subprocess.Popen(
                    [*command, "--progress", "off", *map(str, argv)],
                    env=env,
                    stdout=out,
                    stderr=err,
                    pass_fds=pass_fds,
                    preexec_fn=reset_signals,
                    **popen,
                )
            finally:
                for fd in pass_fds:  # the child's ends: only the child holds them now
                    os.close(fd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_parked(self, timeout: float = 240) -> None:
        """Block until the child sits at its park point (no polling: it writes to a pipe)."""
        ready, _, _ = select.select([self._ready], [], [], timeout)
        if not ready:
            self.close()
            pytest.fail(f"the child did not reach its park point within {timeout} s:\n{self.stderr}")
        if os.read(self._ready, 1) != b"P":  # end of file: it exited first
            self.proc.wait(timeout=60)
            pytest.fail(f"the child exited ({self.proc.returncode}) before its park point:\n{self.stderr}")

    def release(self) -> None:
        """Let a parked child go on (after the test has sent its signal)."""
        if self._release is not None:
            os.close(self._release)
            self._release = None

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        self.release()
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
