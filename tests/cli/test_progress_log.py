"""Progress that reaches log files: `auto` off a terminal prints bounded, flushed log lines.

The display's clock is injected (``ProgressDisplay(clock=...)``): these tests move time by hand,
never sleep, and assert exactly which lines appear. conftest sets ``PIE_PROGRESS=off`` for every
other test; the CLI tests here ask for ``--progress auto`` explicitly.
"""

from __future__ import annotations

import io
import re
import sys

import pytest

from pie_cli.cli.console import ui
from pie_cli.cli.display import ProgressDisplay, clock_text, rate_text, resolve_mode
from tests.helpers import colour_folder, finetune_argv, simulate_argv


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def train(display: ProgressDisplay, clock: Clock, total: int, seconds: float, every: int) -> None:
    """What the training loop reports: one advance per step, ``seconds`` apart."""
    display.start(total, "finetune")
    for step in range(1, total + 1):
        clock.now += seconds
        display.advance(step, seconds, "loss 0.1234  lr 1.00e-04", every=every)


# --------------------------------------------------------------------------- which lines


def test_off_a_terminal_auto_prints_the_first_every_and_last_and_one_per_interval(capsys):
    clock = Clock()
    with ProgressDisplay("auto", interval=30, clock=clock) as display:  # capsys: stderr is no terminal
        assert display.mode == "log"
        train(display, clock, total=100, seconds=2.0, every=50)
    out = lines(capsys)
    # step 1 (first); 16, 31, 46 (30 s after the line before); 50 (every); 65, 80, 95; 100 (last)
    assert [line.split("  ")[1] for line in out] == [f"{n}/100" for n in (1, 16, 31, 46, 50, 65, 80, 95, 100)]
    assert out[0] == "finetune  1/100  loss 0.1234  lr 1.00e-04  2.00 s/it  elapsed 0:02  eta 3:18"
    assert out[1] == "finetune  16/100  loss 0.1234  lr 1.00e-04  2.00 s/it  elapsed 0:32  eta 2:48"
    assert out[-1] == "finetune  100/100  loss 0.1234  lr 1.00e-04  2.00 s/it  elapsed 3:20  eta 0:00"


def test_a_fast_run_prints_only_the_first_every_and_last(capsys):
    """Ten steps a second for 1000 steps: 100 s, the `every` lines (each 5 s) leave no gap of 30 s."""
    clock = Clock()
    with ProgressDisplay("auto", interval=30, clock=clock) as display:
        train(display, clock, total=1000, seconds=0.1, every=50)
    out = lines(capsys)
    assert [int(line.split("  ")[1].split("/")[0]) for line in out] == [1, *range(50, 1001, 50)]
    assert out[1] == "finetune  50/1000  loss 0.1234  lr 1.00e-04  10.00 it/s  elapsed 0:05  eta 1:35"


@pytest.mark.parametrize(("interval", "expected"), [(0, list(range(1, 11))), (float("inf"), [1, 5, 10])])
def test_the_interval_is_a_setting(capsys, interval, expected):
    clock = Clock()
    with ProgressDisplay("auto", interval=interval, clock=clock) as display:
        train(display, clock, total=10, seconds=100.0, every=5)
    assert [int(line.split("  ")[1].split("/")[0]) for line in lines(capsys)] == expected


def test_the_default_interval_is_pie_progress_interval(capsys):
    ui.progress_interval = 250.0
    clock = Clock()
    with ProgressDisplay("auto", clock=clock) as display:
        assert display.interval == 250.0
        train(display, clock, total=10, seconds=100.0, every=100)
    # 1 (first), 4 (300 s after it), 7, 10 (last)
    assert [line.split("  ")[1] for line in lines(capsys)] == ["1/10", "4/10", "7/10", "10/10"]


def test_plain_keeps_its_lines_and_gains_rate_elapsed_and_eta(capsys):
    """plain: every `every` items and the last, however much time passes; no first-item line."""
    clock = Clock()
    with ProgressDisplay("plain", interval=1, clock=clock) as display:
        train(display, clock, total=7, seconds=1.5, every=3)
    assert lines(capsys) == [
        "finetune  3/7  loss 0.1234  lr 1.00e-04  1.50 s/it  elapsed 0:04  eta 0:06",
        "finetune  6/7  loss 0.1234  lr 1.00e-04  1.50 s/it  elapsed 0:09  eta 0:01",
        "finetune  7/7  loss 0.1234  lr 1.00e-04  1.50 s/it  elapsed 0:10  eta 0:00",
    ]


def test_off_and_quiet_print_nothing(capsys):
    for mode in ("off", "plain"):
        ui.quiet = mode == "plain"  # --quiet silences even --progress plain
        clock = Clock()
        with ProgressDisplay(mode, interval=0, clock=clock) as display:
            train(display, clock, total=5, seconds=1.0, every=1)
            with display.status("loading"):
                pass
    assert capsys.readouterr().err == ""


def test_status_is_a_line_in_log_mode(capsys):
    with ProgressDisplay("auto", clock=Clock()) as display, display.status("loading sd-v1-5"):
        pass
    assert lines(capsys) == ["loading sd-v1-5 ..."]


# --------------------------------------------------------------------------- resumed runs


def test_a_resumed_simulate_counts_its_rate_from_the_resume(capsys):
    """simulate reports a resume's finished steps as one advance that took 0 s: not work done now."""
    clock = Clock()
    with ProgressDisplay("auto", interval=30, clock=clock) as display:
        display.start(10, "progression")
        display.advance(4, 0.0)  # steps 1..4 were done by the run that was interrupted
        clock.now += 60
        display.advance(5, 60.0)
    assert lines(capsys) == [
        "progression  4/10  elapsed 0:00",  # no item timed yet: no rate, no eta
        "progression  5/10  60.00 s/it  elapsed 1:00  eta 5:00",  # not 12 s/it (5 steps in 60 s)
    ]


def test_a_resumed_finetune_counts_from_its_completed_steps(capsys):
    clock = Clock()
    with ProgressDisplay("auto", interval=30, clock=clock) as display:
        display.start(100, "finetune", completed=40)
        clock.now += 2
        display.advance(41, 2.0, "loss 0.5000  lr 1.00e-04", every=5)
    assert lines(capsys) == ["finetune  41/100  loss 0.5000  lr 1.00e-04  2.00 s/it  elapsed 0:02  eta 1:58"]


# --------------------------------------------------------------------------- denoising inside a step


@pytest.mark.parametrize("mode", ["auto", "plain"])
def test_a_long_step_prints_a_denoise_line_only_after_a_silent_interval(capsys, mode):
    clock = Clock()
    with ProgressDisplay(mode, interval=30, clock=clock) as display:
        display.start(2, "progression")
        for step in (1, 2):
            for done in range(1, 27):  # 26 denoising steps, 2 s each
                clock.now += 2
                display.inner(step, done, 26)
            display.advance(step, 52.0)
    assert lines(capsys) == [
        "progression  0/2  step 1 denoise 15/26  elapsed 0:30",
        "progression  1/2  52.00 s/it  elapsed 0:52  eta 0:52",
        "progression  1/2  step 2 denoise 15/26  82.00 s/it  elapsed 1:22  eta 1:22",
        "progression  2/2  52.00 s/it  elapsed 1:44  eta 0:00",
    ]


def test_inner_steps_print_nothing_before_start_or_when_the_step_ends(capsys):
    clock = Clock()
    with ProgressDisplay("auto", interval=0, clock=clock) as display:
        display.inner(1, 1, 3)  # no start() yet: no label, no total
        display.start(1, "progression")
        clock.now += 5
        display.inner(1, 3, 3)  # the last denoising step: the step's own line follows
    assert lines(capsys) == []


# --------------------------------------------------------------------------- how lines are written


class Recorder(io.StringIO):
    """A stderr that notes what had been written at each flush (a file a `tail -f` reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_every_line_is_flushed_as_it_is_written(monkeypatch):
    stream = Recorder()
    monkeypatch.setattr(sys, "stderr", stream)
    clock = Clock()
    with ProgressDisplay("auto", interval=30, clock=clock) as display:
        display.start(3, "progression")
        for step in (1, 2, 3):
            clock.now += 1
            display.advance(step, 1.0)
            assert stream.flushed and stream.flushed[-1] == stream.getvalue()
            assert stream.getvalue().endswith(
                f"progression  {step}/3  1.00 it/s  elapsed 0:0{step}  eta 0:0{3 - step}\n"
            )


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stdout_tty", "stderr_tty", "expected"),
    [(True, True, "on"), (False, True, "log"), (True, False, "log"), (False, False, "log")],
)
def test_auto_draws_bars_only_when_stdout_and_stderr_are_terminals(
    monkeypatch, stdout_tty, stderr_tty, expected
):
    monkeypatch.setattr(sys, "stdout", TTY() if stdout_tty else io.StringIO())
    monkeypatch.setattr(sys, "stderr", TTY() if stderr_tty else io.StringIO())
    for var in ("TTY_COMPATIBLE", "FORCE_COLOR"):  # rich's own overrides of the terminal test
        monkeypatch.delenv(var, raising=False)
    assert resolve_mode("auto") == expected
    assert [resolve_mode(m) for m in ("on", "plain", "off")] == ["on", "plain", "off"]
    ui.quiet = True
    assert [resolve_mode(m) for m in ("auto", "on", "plain")] == ["off"] * 3


@pytest.mark.parametrize(
    ("rate", "text"),
    [(1.519, "1.52 it/s"), (1.0, "1.00 it/s"), (0.5, "2.00 s/it"), (1 / 310.4, "310.40 s/it")],
)
def test_rate_text(rate, text):
    assert rate_text(rate) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00"), (59.9, "0:59"), (79.4, "1:19"), (3600, "1:00:00"), (3723, "1:02:03"), (90061, "25:01:01")],
)
def test_clock_text(seconds, text):
    assert clock_text(seconds) == text
    assert clock_text(float("inf")) == "?"


# --------------------------------------------------------------------------- through the command line

LINE = r"  \d+\.\d\d (it/s|s/it)  elapsed \d+:\d\d  eta \d+:\d\d"


def test_simulate_in_a_log_prints_a_line_per_step(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "run"
    argv = simulate_argv(inputs["image"], out, model=tiny_model, steps=3, inference_steps=10)
    result = cli(*argv, "--progress", "auto")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"  # results stay alone on stdout
    err = result.stderr.splitlines()
    assert f"loading {tiny_model} ..." in err  # the status line
    steps = [line for line in err if line.startswith("progression  ") and "denoise" not in line]
    assert [line.split("  ")[1] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(re.fullmatch(r"progression  \d/3" + LINE, line) for line in steps), steps
    assert err[-1].startswith("pie: 3 progression steps in ")


def test_pie_progress_interval_0_shows_every_denoising_step(cli, inputs, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PIE_PROGRESS", "auto")
    monkeypatch.setenv("PIE_PROGRESS_INTERVAL", "0")
    argv = simulate_argv(inputs["image"], tmp_path / "run", model=tiny_model, steps=2, inference_steps=10)
    result = cli(*argv)
    assert result.exit_code == 0, result.output
    found = [re.search(r"  step (\d) denoise (\d+)/(\d+)", line) for line in result.stderr.splitlines()]
    seen = [tuple(map(int, m.groups())) for m in found if m]
    total = seen[0][2]  # 6 with PNDM at strength 0.5 of 10 steps: k + 1
    assert seen == [(step, done, total) for step in (1, 2) for done in range(1, total)]


def test_finetune_in_a_log_prints_loss_lr_rate_and_eta(cli, tiny_model, tmp_path):
    data = colour_folder(tmp_path / "data")
    argv = finetune_argv(data, tiny_model, tmp_path / "ft", "--checkpoint-every", "1000", max_steps=3)
    result = cli(*argv, "--progress", "auto")
    assert result.exit_code == 0, result.output
    steps = [line for line in result.stderr.splitlines() if line.startswith("finetune  ")]
    assert [line.split("  ")[1] for line in steps] == ["1/3", "2/3", "3/3"]
    pattern = r"finetune  \d/3  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d" + LINE
    assert all(re.fullmatch(pattern, line) for line in steps), steps
    assert steps[-1].endswith("eta 0:00")


def test_quiet_keeps_a_log_empty(cli, inputs, tiny_model, tmp_path):
    out = tmp_path / "run"
    result = cli(
        *simulate_argv(inputs["image"], out, model=tiny_model, device=None), "--progress", "auto", "-q"
    )
    assert result.exit_code == 0, result.output
    assert (result.stdout, result.stderr) == (f"{out}\n", "")


def test_bars_take_the_same_calls(capsys):
    """`on` (rich): a resume's catch-up restarts the bar's clock instead of counting as work done now."""
    with ProgressDisplay("on") as display:
        display.start(3, "progression")
        display.advance(1, 0.0)
        task = display._progress.tasks[0]
        samples = list(task._progress)  # rich's speed samples: none for the jump
        assert (task.completed, task.total, samples) == (1, 3, [])
        for step in (2, 3):
            display.inner(step, 1, 2)
            display.advance(step, 1.0)
        assert task.completed == 3
    assert "progression" in capsys.readouterr().err  # the bar's last frame, left on stderr
