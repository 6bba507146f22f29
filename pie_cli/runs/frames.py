"""Reading a run's frames back: ``frame_NNN.png`` in numeric order, and its ``mask.png``.

Used by ``pie export-gif`` and ``pie evaluate``; explicit frame files are accepted beside
run folders. PIL/numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.animation import SourceFrame
from pie_cli.imaging.masks import mask_to_grey
from pie_cli.imaging.media import open_image, to_rgb8
from pie_cli.runs.manifest import COHORT_SUMMARY, MANIFEST, MASK

FRAME_FILE = re.compile(r"^frame_(\d+)\.png$")


def collect(inputs: Sequence[Path]) -> tuple[list[SourceFrame], Path | None]:
    """Frames from run directories (``frame_NNN.png`` in numeric order) and/or explicit files.

    Returns the frames and the ``mask.png`` of the first run directory, if it has one.
    """
    frames: list[SourceFrame] = []
    mask = None
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            try:
                found = sorted(
                    (int(m.group(1)), p)
                    for p in item.iterdir()
                    if (m := FRAME_FILE.match(p.name)) and p.is_file()
                )
            except PermissionError:
                raise UserError(f"{item} is not readable (check its permissions).") from None
            if not found:
                raise UserError(f"{item} has no frame_NNN.png files (is it a `pie simulate` run directory?).")
            frames.extend(SourceFrame(i, p) for i, p in found)
            if mask is None and (item / MASK).is_file():
                mask = item / MASK
        elif item.exists():
            m = FRAME_FILE.match(item.name)
            frames.append(SourceFrame(int(m.group(1)) if m else len(frames), item))
        else:
            raise UserError(f"{item} does not exist.")
    if not frames:
        raise UserError("no frames given; pass a run directory or frame files.")
    return frames, mask


def load(frames: Sequence[SourceFrame]) -> list[Image.Image]:
    """The frames as 8-bit RGB images, all of one size (or a ``UserError`` naming the odd one)."""
    images = load_as_read(frames, "frames of one animation")
    return [to_rgb8(img) for img in images]  # 16-bit scaled, never clipped


def load_as_read(frames: Sequence[SourceFrame], what: str = "the frames of a run") -> list[Image.Image]:
    """The frames as they are (8-bit RGB or grey, 16-bit grey as "I;16"), all of one size (else a
    ``UserError`` naming the odd one and saying ``what`` must share a size)."""
    images = [open_image(f.path, "frame") for f in frames]
    first = images[0].size
    for f, img in zip(frames, images, strict=True):
        if img.size != first:
            raise UserError(
                f"frame {f.path} is {img.width}x{img.height} but {frames[0].path} is {first[0]}x{first[1]}; "
                f"{what} must have one size."
            )
    return images


def load_mask(path: Path, frames: Sequence[Image.Image]) -> np.ndarray:
    """A run's mask as 8-bit grey values, refused unless it has the frames' size."""
    mask = np.asarray(mask_to_grey(open_image(path, "mask"), path))
    if mask.shape[::-1] != frames[0].size:
        raise UserError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but the frames are "
            f"{frames[0].width}x{frames[0].height}."
        )
    return mask


def has_frames(folder: Path) -> bool:
    return any(p.is_file() for p in Path(folder).glob("frame_[0-9]*.png"))


def trajectory_folders(folder: Path) -> list[Path]:
    """A ``--trajectories`` run's ``traj_KK/`` folders that hold frames, in order."""
    return sorted(p for p in Path(folder).glob("traj_[0-9][0-9]") if p.is_dir() and has_frames(p))


def folder_kind(folder: Path) -> str:
    """ "run", "trajectories" or "cohort": what a folder of pie's given to a command is."""
    folder = Path(folder)
    if not folder.is_dir() or has_frames(folder):
        return "run"
    if trajectory_folders(folder):
        return "trajectories"
    try:
        subs = [p for p in folder.iterdir() if p.is_dir()]
    except PermissionError:
        return "run"  # the single-run path names the problem
    if (folder / COHORT_SUMMARY).is_file() or any(has_frames(p) or trajectory_folders(p) for p in subs):
        return "cohort"
    return "run"


def case_folders(folder: Path) -> list[Path]:
    """A cohort's case folders: in cohort_summary.csv's order where it lists them, then by name."""
    import csv

    folder = Path(folder)
    names: list[str] = []
    summary = folder / COHORT_SUMMARY
    if summary.is_file():
        try:
            with summary.open(newline="", encoding="utf-8") as handle:
                names = [row["case"] for row in csv.DictReader(handle) if row.get("case")]
        except (OSError, ValueError, KeyError, csv.Error):
            names = []
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    order = [n for n in dict.fromkeys(names) if n in found] + [n for n in found if n not in names]
    return [
        folder / n
        for n in order
        if has_frames(folder / n) or trajectory_folders(folder / n) or (folder / n / MANIFEST).is_file()
    ]


def frame_groups(folder: Path) -> list[tuple[str, Path]] | None:
    """The labelled run folders a trajectory run or a cohort shows side by side; None for a plain run.

    A cohort case with trajectories shows its first; a case that did not finish is left out.
    """
    from pie_cli.runs.manifest import status_of

    kind = folder_kind(folder)
    if kind == "trajectories":
        return [(p.name.replace("_", " "), p) for p in trajectory_folders(folder)]
    if kind == "cohort":
        groups = []
        for case in case_folders(folder):
            if (case / MANIFEST).is_file() and status_of(case) != "complete":
                continue
            subs = trajectory_folders(case)
            if subs or has_frames(case):
                groups.append((case.name, subs[0] if subs else case))
        if not groups:
            raise UserError(f"{folder} holds no finished cohort case to show.")
        return groups
    return None
