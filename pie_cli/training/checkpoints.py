"""The layout of a `pie finetune` run folder, and checkpoints that are complete or absent.

A checkpoint is written into a hidden ``checkpoints/.step_N.tmp`` folder, completed by a
marker file (``checkpoint_complete.json``, written last), flushed to disk and only then renamed
to ``checkpoints/step_N``. A run killed at any moment (even SIGKILL while saving) therefore
leaves every ``step_*`` folder either complete or without its marker, and
:func:`latest_checkpoint` only ever picks a complete one. Old checkpoints are pruned after a
new one is published, never before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from pie_cli.core.model_files import LORA_FILE
from pie_cli.imaging.files import fsync, fsync_tree

CHECKPOINTS = "checkpoints"
COMPLETE = "checkpoint_complete.json"  # written last: a checkpoint folder without it is incomplete
SAMPLES = "samples"
METRICS = "metrics.csv"
CONFIG_FILE = "training_config.yaml"
SUMMARY = "training_summary.json"
LOGS = "logs"  # --report-to tensorboard / wandb write here
LOSS_PLOT = "loss.png"
RUN_NAME = "pie-finetune"  # the trackers' project / run name
METRICS_COLUMNS = ("step", "loss", "lr", "seconds", "val_loss")
# What a started or finished run leaves in its folder; --overwrite removes exactly these.
TRAINING_FILES = (
    CHECKPOINTS,
    SAMPLES,
    METRICS,
    CONFIG_FILE,
    SUMMARY,
    LOGS,
    LOSS_PLOT,
    LORA_FILE,
    "unet",
    "text_encoder",
    "vae",
    "tokenizer",
    "scheduler",
    "model_index.json",
)
_STEP_DIR = re.compile(r"step_(\d+)")
# A temporary name pie writes (``.NAME.PID.tmp``; pie 0.1.0 also wrote ``.NAME.tmp``).
_TEMPORARY = re.compile(r"^\.(?P<name>.+?)(?:\.\d+)?\.tmp$")


def checkpoint_step(path: Path) -> int | None:
    """N of a ``step_N`` checkpoint folder (None for anything else)."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """A checkpoint folder whose marker (written last) is there and names its own step."""
    marker = Path(path) / COMPLETE
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    step = data.get("step") if isinstance(data, dict) else None
    return isinstance(step, int) and not isinstance(step, bool) and step == checkpoint_step(Path(path))


def step_dirs(out: Path) -> list[Path]:
    """Every ``checkpoints/step_N`` folder of the run in ``out``, oldest first (complete or not)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of the run in ``out`` (incomplete folders are skipped)."""
    complete = [p for p in step_dirs(out) if is_complete(p)]
    return complete[-1] if complete else None


def incomplete_checkpoints(out: Path) -> list[Path]:
    """``step_*`` folders without their completion marker: what a kill while saving leaves."""
    return [p for p in step_dirs(out) if not is_complete(p)]


def _is_leftover(path: Path, names: tuple[str, ...]) -> bool:
    """A temporary file or folder of one of ``names`` (``.NAME.PID.tmp``), or a LoRA export in progress."""
    match = _TEMPORARY.match(path.name)
    if match is not None and match.group("name") in names:
        return True
    return path.name.startswith(".lora-")


def remove_leftovers(out: Path) -> None:
    """Remove what a killed run left half-written: temporary files and checkpoint folders."""
    out = Path(out)
    if out.is_dir():
        for path in out.iterdir():
            if _is_leftover(path, TRAINING_FILES):
                remove(path)
    root = out / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            match = _TEMPORARY.match(path.name)
            if match is not None and checkpoint_step(Path(match.group("name"))) is not None:
                remove(path)


def remove(path: Path) -> None:
    """Delete a checkpoint folder (its marker first: a folder half-removed is never "complete") or a file."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class LoopState:
    """Step counter and the loop's random generator, saved in every checkpoint as JSON (no pickle).

    ``loop_state.json`` holds the step and the generator's state as base64; a checkpoint of
    pie 0.1.0 has accelerate's ``custom_checkpoint_0.pkl`` instead, read with torch's
    weights-only loader (a dict of an int and a tensor needs nothing more).
    """

    FILE = "loop_state.json"
    LEGACY = "custom_checkpoint_0.pkl"

    def __init__(self, seed: int) -> None:
        import torch

        self.step = 0
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def save(self, folder: Path) -> None:
        from pie_cli.runs.manifest import encode_state

        data = {"step": self.step, "generator": encode_state(self.generator.get_state())}
        (Path(folder) / self.FILE).write_text(json.dumps(data) + "\n", encoding="utf-8")

    def load(self, folder: Path) -> None:
        import torch

        from pie_cli.errors import UserError
        from pie_cli.runs.manifest import decode_state

        folder = Path(folder)
        try:
            if (folder / self.FILE).is_file():
                data = json.loads((folder / self.FILE).read_text(encoding="utf-8"))
                step, state = data["step"], decode_state(data["generator"])
            else:
                data = torch.load(folder / self.LEGACY, map_location="cpu", weights_only=True)
                step, state = data["step"], data["generator"]
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(step)
            self.generator.set_state(state)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError):
            raise UserError(
                f"--resume: checkpoint {folder} has no readable loop state ({self.FILE})."
            ) from None
        self.step = step


def save_checkpoint(
    accelerator: Any,
    out: Path,
    step: int,
    total_steps: int,
    keep: int,
    extra: Any = None,
    keep_also: int | None = None,
) -> Path:
    """``checkpoints/step_N`` of the accelerator's state, published complete or not at all; then prune.

    ``extra(folder)`` adds the loop's own files (on the main process) before the marker;
    ``keep_also`` is a step whose checkpoint pruning spares (the best by held-out loss).
    """
    path = Path(out) / CHECKPOINTS / f"step_{step:06d}"
    # One staging name for every process of the run: each saves its own RNG state into it.
    tmp = path.with_name(f".{path.name}.tmp")
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(tmp)
        marker = {"step": step, "total_steps": total_steps, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / COMPLETE).write_text(json.dumps(marker) + "\n")
        fsync_tree(tmp)
        if path.exists():  # an older save of this step (resumed from an earlier one) or a broken one
            remove(path)
        os.rename(tmp, path)
        fsync(path.parent, strict=False)  # the rename itself
        prune(out, keep, step, keep_also)
    accelerator.wait_for_everyone()
    return path


def prune(out: Path, keep: int, step: int, keep_also: int | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints (and that of step ``keep_also``); drop incomplete
    ones older than ``step``."""
    dirs = step_dirs(out)
    complete = [p for p in dirs if is_complete(p)]
    for old in complete[:-keep]:
        if keep_also is None or checkpoint_step(old) != keep_also:
            remove(old)
    for broken in (p for p in dirs if not is_complete(p)):
        if (checkpoint_step(broken) or 0) < step:
            remove(broken)
