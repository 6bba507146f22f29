"""Run folders as frames arrive: every file atomic, the manifest updated after each frame.

An interrupted or failed run leaves only whole files and a manifest whose ``status``
says where it stopped (``running`` -> ``complete`` | ``failed`` | ``interrupted``).
After every frame the manifest records the last whole step and the random generators'
states, so a run stopped in any way (Ctrl-C, SIGTERM, even SIGKILL) can be resumed from
there (``pie simulate --resume``). While a run writes, ``.pie.lock`` names its process.

Every image carries pie's provenance (synthetic, pie version, the run id); with a
watermark the frames on disk also show a burnt-in "SYNTHETIC" label, and the clean frame
the progression continues from is kept in ``.resume/`` until the run completes.

:class:`RunWriter` writes one folder; :class:`CaseRun` is one case of ``pie simulate``: that
folder alone (one trajectory), or a top folder whose ``traj_KK/`` folders each hold one
trajectory, with the top manifest tracking their common progress.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from pie_cli.errors import UserError
from pie_cli.imaging.files import save_png, write_text
from pie_cli.imaging.ownership import Ledger, plan_overwrite, remove_planned, written_by_pie
from pie_cli.runs.locks import LOCK_NAME, DirLock
from pie_cli.runs.manifest import (
    GIF,
    MANIFEST,
    MASK,
    MEAN_FINAL,
    RESUME_DIR,
    UNCERTAINTY,
    any_run_file,
    encode_state,
    file_sha256,
    frame_name,
    now,
    run_id,
    trajectory_dir,
)

# The clean original of a watermarked --full-res run, in .resume/ until the run completes.
ORIGINAL = "original.png"
# progression.gif of a --full-res run is a preview: at most this many pixels on its long side.
GIF_SIDE = 1024


class RunWriter:
    """Writes one run directory as frames arrive.

    ``lock=True`` (the top directory of a run) holds ``.pie.lock`` from :meth:`open` to
    :meth:`finish`. ``watermark`` is a function burning a label into saved frames.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        *,
        lock: bool = True,
        watermark: Callable[[Image.Image], Image.Image] | None = None,
        warn: Callable[[str], None] | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.created_dir = False
        self.watermark = watermark
        self.lock = DirLock(self.path, warn=warn) if lock else None
        self.ledger = ledger if ledger is not None else Ledger(self.path)  # the top folder's, shared
        self.run_id = manifest.setdefault("run_id", run_id(manifest))
        self._unrecorded: Path | None = None  # a frame saved whose manifest entry is not written yet
        # The progression's own frames are kept in .resume/ until the run completes when the frames on
        # disk differ from them (a watermark, --full-res): a resume goes on from those.
        self.keep_clean = watermark is not None

    def open(self, overwrite: bool = False, will_write: Callable[[str], bool] | None = None) -> None:
        """Create (or claim) the folder and start the manifest.

        The top folder (``lock=True``) is checked again once its lock is held: a run that finished
        there after this one's early checks must not be written into. With ``overwrite`` the files
        pie can prove it wrote are deleted first (``imaging.ownership.plan_overwrite``); nothing else.
        """
        if self.lock is None and self.path.is_symlink():
            raise UserError(
                f"--out: {self.path} is a symbolic link; pie writes only into folders of the run itself."
            )
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created_dir = True
        if self.lock is not None:
            self.lock.acquire()
        try:
            if self.lock is not None:
                self._claim(overwrite, will_write or (lambda rel: False))
            self._start()
        except (OSError, UserError):  # a full disk, or a run that got here first: leave nothing behind
            if self.lock is not None:
                self.lock.release()
            if self.created_dir:
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _claim(self, overwrite: bool, will_write: Callable[[str], bool]) -> None:
        held = {LOCK_NAME}
        if not overwrite:
            if any(entry.name not in held for entry in self.path.iterdir()):
                raise UserError(
                    f"--out {self.path} is not empty (another run wrote there meanwhile); "
                    "pass --overwrite to replace pie's files there, or choose another directory."
                )
            return
        remove = plan_overwrite(self.path, will_write, reserved=tuple(held), legacy_outputs=any_run_file)
        remove_planned(self.path, remove)
        self.ledger.files = Ledger(self.path).files

    def _wrote(self, *paths: Path) -> None:
        """Record files just written in the folder's ledger (what proves later that they are pie's)."""
        self.ledger.record(*paths)

    def _start(self) -> None:
        self.manifest.setdefault("frames", [])
        self.manifest["status"] = "running"
        self.manifest["started"] = now()
        self.write_manifest()

    def reopen(self, step: int) -> None:
        """Continue an interrupted run after its whole step ``step``: later frames are dropped."""
        if self.lock is not None:
            self.lock.acquire()
        self.manifest["frames"] = [f for f in self.manifest.get("frames", []) if f["index"] <= step]
        for entry in self.path.glob("frame_*.png"):
            index = entry.stem.split("_")[-1]
            if not (index.isdigit() and int(index) > step):
                continue
            if not written_by_pie(entry, self.ledger):
                raise UserError(
                    f"--resume: {entry} was not written by this run (or was changed since); "
                    "pie never replaces it: move it away and resume again."
                )
            entry.unlink()  # a frame after the last whole step: written, never counted
            self.ledger.forget(self._rel(entry), save=False)
        self.manifest["status"] = "running"
        self.manifest.setdefault("resumed", []).append({"after_step": step, "at": now()})
        self.manifest.pop("finished", None)
        self.manifest.pop("error", None)
        self.write_manifest()

    def _rel(self, path: Path) -> str:
        return Path(os.path.abspath(path)).relative_to(self.ledger.folder).as_posix()

    def write_mask(self, mask: Image.Image) -> None:
        save_png(mask, self.path / MASK, self.run_id)
        self._wrote(self.path / MASK)
        self.manifest["outputs"]["mask"] = MASK

    def write_frame(
        self,
        n: int,
        image: Image.Image,
        seconds: float,
        rng_states: list[Any] | None = None,
        pace: dict[str, Any] | None = None,
        shown: Image.Image | None = None,
    ) -> None:
        """Frame ``n`` (atomically), then the manifest that makes it count, with the RNG states after it.

        ``image`` is the progression's frame; ``shown`` what the folder shows instead (``--full-res``'s
        frame at the original's size), watermarked if the run burns one in.
        """
        name = frame_name(n)
        if shown is not None and self.watermark is not None and n == 0:
            # --full-res with a watermark: frame 0 on disk is the labelled original; a resume needs it clean.
            (self.path / RESUME_DIR).mkdir(exist_ok=True)
            save_png(shown, self.path / RESUME_DIR / ORIGINAL, self.run_id)
            self.ledger.record(self.path / RESUME_DIR / ORIGINAL, save=False)
        shown = image if shown is None else shown
        if self.watermark is not None:
            shown = self.watermark(shown)
        if self.keep_clean:
            clean = self.path / RESUME_DIR
            clean.mkdir(exist_ok=True)
            save_png(image, clean / name, self.run_id)
            self.ledger.record(clean / name, save=False)
        self._unrecorded = self.path / name
        save_png(shown, self.path / name, self.run_id)
        self.ledger.record(self.path / name, save=False)
        entry = {
            "index": n,
            "file": name,
            "seconds": round(seconds, 4),
            "sha256": file_sha256(self.path / name),
        }
        if pace is not None:  # a paced run: the blend weight chosen for this frame, its score, the target
            entry["pace"] = pace
        self.manifest["frames"] = [f for f in self.manifest["frames"] if f["index"] != n] + [entry]
        self.manifest["last_complete_frame"] = n
        if rng_states is not None:
            self.manifest["rng_states"] = [encode_state(s) for s in rng_states]
        self.write_manifest()
        self._unrecorded = None
        if self.keep_clean and n > 2:
            # Keep frame 0 and the last two: with trajectories, step n-1 may be the last whole one.
            stale = self.path / RESUME_DIR / frame_name(n - 2)
            if stale.exists():
                stale.unlink()
                self.ledger.forget(self._rel(stale))

    def written_frames(self, steps: int) -> list[Image.Image]:
        """Frames 0..steps as this folder shows them, in 8-bit RGB for the GIF and spread maps."""
        from pie_cli.imaging.media import open_image, to_rgb8

        return [to_rgb8(open_image(self.path / frame_name(n), "frame")) for n in range(steps + 1)]

    def write_gif(self, frames: list[Image.Image]) -> None:
        """progression.gif of the frames as shown (at most GIF_SIDE px on the long side)."""
        from pie_cli.imaging.animation import ExportOptions, write

        longest = max(frames[0].size)
        if longest > GIF_SIDE:
            size = tuple(max(1, round(side * GIF_SIDE / longest)) for side in frames[0].size)
            frames = [f.resize(size, Image.Resampling.LANCZOS) for f in frames]
        write(frames, self.path / GIF, ExportOptions(), run_id=self.run_id)
        self._wrote(self.path / GIF)
        self.manifest["outputs"]["gif"] = GIF

    def finish(self, status: str, **extra: Any) -> None:
        """Record ``status`` and release the lock; an unfinished run keeps only its counted frames."""
        self.manifest["status"] = status
        self.manifest["finished"] = now()
        self.manifest.update(extra)
        try:
            if status == "complete":
                self.manifest.pop("rng_states", None)
                clean = self.path / RESUME_DIR
                if clean.is_dir():
                    shutil.rmtree(clean)
                    prefix = self._rel(clean) + "/"
                    self.ledger.forget(
                        *[rel for rel in self.ledger.files if rel.startswith(prefix)], save=False
                    )
            elif self._unrecorded is not None:
                # Stopped between a frame and its manifest entry: that frame is not part of the run.
                self._unrecorded.unlink(missing_ok=True)
                self.ledger.forget(self._rel(self._unrecorded), save=False)
                self._unrecorded = None
            self.write_manifest()
        finally:  # even when the disk is full: never leave a live-looking lock behind
            if self.lock is not None:
                self.lock.release()

    def write_manifest(self) -> None:
        """The manifest, then the ledger (with whatever was recorded since its last save)."""
        write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2, default=str) + "\n")
        self._wrote(self.path / MANIFEST)


class CaseRun:
    """The folders one ``pie simulate`` case writes: one run folder per trajectory.

    With one trajectory the case is its folder. With K > 1 the top folder holds the lock,
    the mask, ``uncertainty.png``/``mean_final.png`` and a manifest of the common progress,
    and ``traj_KK/`` holds trajectory k (seed + k) with its own manifest and frames.
    """

    def __init__(self, top: RunWriter, trajectories: list[RunWriter]) -> None:
        self.top = top
        self.trajectories = trajectories
        self.everyone = [top, *trajectories] if trajectories[0] is not top else [top]

    @classmethod
    def new(
        cls,
        out: Path,
        manifest: dict[str, Any],
        seeds: list[int],
        *,
        watermark: Callable[[Image.Image], Image.Image] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> CaseRun:
        """A case about to start: ``manifest`` is the top one; trajectory manifests derive from it."""
        k = len(seeds)
        top = RunWriter(out, manifest, watermark=watermark if k == 1 else None, warn=warn)
        if k == 1:
            return cls(top, [top])
        writers = []
        for j, seed in enumerate(seeds):
            sub = {
                **manifest,
                "parameters": {**manifest["parameters"], "seed": seed},
                "trajectory": j,
                "run_id": f"{top.run_id}-{j:02d}",
            }
            writers.append(
                RunWriter(
                    Path(out) / trajectory_dir(j), sub, lock=False, watermark=watermark, ledger=top.ledger
                )
            )
        top.manifest["trajectories"] = [trajectory_dir(j) for j in range(k)]
        return cls(top, writers)

    @classmethod
    def continued(
        cls,
        out: Path,
        manifests: list[dict[str, Any]],
        *,
        watermark: Callable[[Image.Image], Image.Image] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> CaseRun:
        """An interrupted case: ``manifests`` are [top] or [top, traj_00, ...] as read back."""
        k = max(1, len(manifests) - 1)
        top = RunWriter(out, manifests[0], watermark=watermark if k == 1 else None, warn=warn)
        if k == 1:
            return cls(top, [top])
        writers = [
            RunWriter(
                Path(out) / trajectory_dir(j),
                manifests[j + 1],
                lock=False,
                watermark=watermark,
                ledger=top.ledger,
            )
            for j in range(k)
        ]
        top.manifest["trajectories"] = [trajectory_dir(j) for j in range(k)]
        return cls(top, writers)

    def open(self, overwrite: bool, mask: Image.Image | None, will_write: Callable[[str], bool]) -> None:
        """Claim the top folder (under its lock), then start every trajectory's folder."""
        for writer in self.everyone:
            writer.open(overwrite, will_write)
        if mask is not None:
            for writer in self.everyone:
                writer.write_mask(mask)

    def reopen(self, step: int) -> None:
        """Continue after whole step ``step``."""
        for writer in self.everyone:
            writer.reopen(step)

    def keep_clean(self) -> None:
        """Keep the progression's frames in .resume/ (the frames on disk are not them)."""
        for writer in self.trajectories:
            writer.keep_clean = True

    def written_frames(self, steps: int) -> list[list[Image.Image]]:
        """Every trajectory's frames 0..steps as on disk (8-bit RGB)."""
        return [w.written_frames(steps) for w in self.trajectories]

    def write_step(
        self,
        index: int,
        images: list[Image.Image],
        seconds: float,
        states: list[Any],
        paces: list[dict[str, Any] | None] | None = None,
        shown: list[Image.Image] | None = None,
    ) -> None:
        """Frame ``index`` of every trajectory, then the top manifest's progress."""
        paces = paces or [None] * len(images)
        shown_frames = shown or [None] * len(images)
        for writer, image, state, pace, seen in zip(
            self.trajectories, images, states, paces, shown_frames, strict=True
        ):
            writer.write_frame(index, image, seconds, [state], pace, shown=seen)
        if len(self.trajectories) > 1:
            self.top.manifest["last_complete_frame"] = index
            self.top.manifest["rng_states"] = [encode_state(s) for s in states]
            self.top.write_manifest()

    def write_gifs(self, history: list[list[Image.Image]]) -> None:
        for writer, frames in zip(self.trajectories, history, strict=True):
            writer.write_gif(frames)

    def write_spread(self, history: list[list[Image.Image]]) -> None:
        """K > 1: ``uncertainty.png`` (where the last frames disagree, over frame 0) and ``mean_final.png``."""
        from pie_cli.imaging.annotate import mean_image, spread_map

        last = [frames[-1] for frames in history]
        save_png(mean_image(last), self.top.path / MEAN_FINAL, self.top.run_id)
        save_png(spread_map(last, history[0][0]), self.top.path / UNCERTAINTY, self.top.run_id)
        self.top.ledger.record(self.top.path / MEAN_FINAL, self.top.path / UNCERTAINTY)
        self.top.manifest["outputs"].update({"uncertainty": UNCERTAINTY, "mean_final": MEAN_FINAL})

    def finish(self, status: str, **extra: Any) -> None:
        """Mark every folder ``status``; when unfinished, a second failure (a full disk) must not hide the first."""
        for writer in self.everyone:
            if status == "complete":
                writer.finish(status, **extra)
                continue
            try:
                writer.finish(status, **extra)
            except OSError:
                if writer.lock is not None:
                    writer.lock.release()
