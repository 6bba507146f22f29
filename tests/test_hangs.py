"""Defect class 3: pie hangs on an input that is not a regular file.

The rule pie must keep: **nothing hangs.** Every file pie reads (an image, a mask, a cohort
CSV, a prompt schedule, a training recipe or table, a frame to export) is checked to be a
regular file before it is opened; a FIFO (which blocks the reader until someone writes) or a
device (``/dev/zero`` never ends) is refused at once with one sentence naming it as "not a
regular file".

Each row runs pie in a child process (``python -m pie_cli --progress off ...``) with a hard
timeout: a hang kills the child and fails the row instead of blocking the suite. Each refusal:
exit 2, nothing on stdout, one ``Error:`` line saying "not a regular file" and naming the file,
and no file created, changed or removed under the test's tmp folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import colour_folder, finetune_argv, simulate_argv
from tests.refusals import check_refused, run_pie, snapshot

BOX = "0.1,0.1,0.6,0.6"


@dataclass
class World:
    tmp: Path
    image: Path
    mask: Path
    model: Path

    def fifo(self, name: str) -> Path:
        path = self.tmp / name
        os.mkfifo(path)
        return path

    def zero(self, name: str) -> Path:
        path = self.tmp / name
        path.symlink_to("/dev/zero")
        return path


@pytest.fixture
def w(tmp_path, inputs, tiny_model) -> World:
    return World(tmp_path, inputs["image"], inputs["mask"], tiny_model)


@dataclass(frozen=True)
class Row:
    special: Callable[[World], Path]  # makes the FIFO (or link to a device) the row feeds pie
    argv: Callable[[World, Path], list]


def row(id, special, argv):
    return pytest.param(Row(special, argv), id=id)


def _sim(w: World, image: Path, *extra, mask: Path | None = None) -> list:
    return simulate_argv(image, w.tmp / "out", *extra, model=w.model, mask=mask)


def _ft(w: World, data: Path, *extra) -> list:
    return finetune_argv(data, w.model, w.tmp / "ft", *extra, batch_size=1, max_steps=1)


def _data(w: World) -> Path:
    return colour_folder(w.tmp / "data", n=2)


ROWS = [
    row("simulate IMAGE", lambda w: w.fifo("image.png"), lambda w, f: _sim(w, f, mask=w.mask)),
    row("simulate --mask", lambda w: w.fifo("mask.png"), lambda w, f: _sim(w, w.image, mask=f)),
    row(
        "mask IMAGE",
        lambda w: w.fifo("image.png"),
        lambda w, f: ["mask", f, "--out", w.tmp / "m.png", "--box", BOX, "-r", "64"],
    ),
    row(
        "mask --from",
        lambda w: w.fifo("seg.png"),
        lambda w, f: ["mask", w.image, "--out", w.tmp / "m.png", "--from", f, "-r", "64"],
    ),
    row("mask info", lambda w: w.fifo("m.png"), lambda w, f: ["mask", "info", f]),
    row(
        "simulate --cohort",
        lambda w: w.fifo("cases.csv"),
        lambda w, f: simulate_argv(None, w.tmp / "out", "--cohort", f, model=w.model, prompt=None),
    ),
    row(
        "simulate --prompt-schedule",
        lambda w: w.fifo("reports.txt"),
        lambda w, f: _sim(w, w.image, "--prompt-schedule", f, mask=w.mask),
    ),
    row("finetune --config", lambda w: w.fifo("recipe.yaml"), lambda w, f: _ft(w, _data(w), "--config", f)),
    row("finetune --data table", lambda w: w.fifo("table.csv"), lambda w, f: _ft(w, f)),
    row(
        "export-gif frame file",
        lambda w: w.fifo("frame_001.png"),
        lambda w, f: ["export-gif", w.image, f, "--out", w.tmp / "a.gif"],
    ),
    row("simulate IMAGE zero.dcm -> /dev/zero", lambda w: w.zero("zero.dcm"), lambda w, f: _sim(w, f)),
    row(
        "mask IMAGE zero.dcm -> /dev/zero",
        lambda w: w.zero("zero.dcm"),
        lambda w, f: ["mask", f, "--out", w.tmp / "m.png", "--box", BOX, "-r", "64"],
    ),
]


@pytest.mark.parametrize("case", ROWS)
def test_a_special_file_is_refused_at_once(case: Row, w):
    special = case.special(w)
    argv = case.argv(w, special)
    before = snapshot(w.tmp)
    result = run_pie(argv)  # a hang fails here, after the timeout
    check_refused(result, "not a regular file", special, before=before, roots=(w.tmp,))
