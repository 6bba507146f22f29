"""Run directories: frames, mask, GIF and ``manifest.json``, every file written atomically.

An interrupted or failed run leaves only whole files and a manifest whose ``status``
says where it stopped (``running`` -> ``complete`` | ``failed`` | ``interrupted``).
After every frame the manifest records the last whole step and the random generators'
states, so a run stopped in any way (Ctrl-C, SIGTERM, even SIGKILL) can be resumed from
there (``pie simulate --resume``). While a run writes, ``.pie.lock`` names its process.

Every image carries pie's provenance (synthetic, pie version, the run id); with a
watermark the frames on disk also show a burnt-in "SYNTHETIC" label, and the clean frame
the progression continues from is kept in ``.resume/`` until the run completes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from PIL import Image

from pie_cli.errors import UserError
from pie_cli.runs.locks import DirLock, in_use, live_owner
from pie_cli.imaging.media import save_png, write_text

MANIFEST = "manifest.json"
MASK = "mask.png"
GIF = "progression.gif"
# Files pie itself writes in a run directory; --overwrite removes these and nothing else.
_PIE_FILE = re.compile(
    r"^(frame_\d{3,}\.png|mask\.png|progression\.gif|manifest\.json|uncertainty\.png|mean_final\.png"
    r"|metrics\.json|metrics\.csv|report\.png|\..+\.\d+\.tmp)$"
)
_PIE_DIR = re.compile(r"^(traj_\d{2,}|\.resume)$")
RESUME_DIR = ".resume"


def frame_name(n: int) -> str:
    return f"frame_{n:03d}.png"


def check_out_dir(path: Path, overwrite: bool) -> None:
    """Refuse an unusable ``--out`` before any work is done (nothing is created here)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a directory.")
    check_not_locked(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(
            f"--out {path} is not empty; pass --overwrite to replace pie's files there, or choose another directory."
        )
    check_creatable(path)


def check_creatable(path: Path, option: str = "--out") -> None:
    """Refuse a directory that cannot be written or created (its nearest existing ancestor is read-only)."""
    ancestor = Path(path)
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK):
        what = (
            "is not writable" if ancestor == Path(path) else f"cannot be created: {ancestor} is not writable"
        )
        raise UserError(f"{option} {path} {what}.")


def check_not_locked(path: Path) -> None:
    """Refuse early (before loading a model) a directory a live pie process is writing."""
    owner = live_owner(path)
    if owner is not None:
        raise in_use("--out", path, owner)


def default_out_dir(image: Path) -> Path:
    return Path("runs") / f"{Path(image).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_id(manifest: dict[str, Any]) -> str:
    """A short hash of what defines a run (parameters, model, inputs): the same run, the same id."""
    core = {k: manifest.get(k) for k in ("parameters", "model", "inputs")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_state(state: Any) -> str:
    """A torch CPU generator state (uint8 tensor) as base64 text for the manifest."""
    return base64.b64encode(bytes(state.numpy().tobytes())).decode("ascii")


def decode_state(text: str) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        watermark: Any = None,
        warn: Any = None,
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.created_dir = False
        self.watermark = watermark
        self.lock = DirLock(self.path, warn=warn) if lock else None
        self.run_id = manifest.setdefault("run_id", run_id(manifest))

    def open(self, overwrite: bool) -> None:
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created_dir = True
        if self.lock is not None:
            self.lock.acquire()
        try:
            self._start(overwrite)
        except OSError:  # e.g. a full disk before anything useful exists: leave nothing behind
            if self.lock is not None:
                self.lock.release()
            if self.created_dir:
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _start(self, overwrite: bool) -> None:
        if overwrite:
            for entry in self.path.iterdir():
                if entry.is_file() and _PIE_FILE.match(entry.name):
                    entry.unlink()
                elif entry.is_dir() and _PIE_DIR.match(entry.name):
                    shutil.rmtree(entry)
        self.manifest.setdefault("frames", [])
        self.manifest["status"] = "running"
        self.manifest["started"] = _now()
        self._write_manifest()

    def reopen(self, step: int) -> None:
        """Continue an interrupted run after its whole step ``step``: later frames are dropped."""
        if self.lock is not None:
            self.lock.acquire()
        self.manifest["frames"] = [f for f in self.manifest.get("frames", []) if f["index"] <= step]
        for entry in self.path.glob("frame_*.png"):
            index = entry.stem.split("_")[-1]
            if index.isdigit() and int(index) > step:
                entry.unlink()
        self.manifest["status"] = "running"
        self.manifest.setdefault("resumed", []).append({"after_step": step, "at": _now()})
        self.manifest.pop("finished", None)
        self.manifest.pop("error", None)
        self._write_manifest()

    def write_mask(self, mask: Image.Image) -> None:
        save_png(mask, self.path / MASK, self.run_id)
        self.manifest["outputs"]["mask"] = MASK

    def write_frame(
        self, n: int, image: Image.Image, seconds: float, rng_states: list[Any] | None = None
    ) -> None:
        """Frame ``n`` (atomically), then the manifest that makes it count, with the RNG states after it."""
        name = frame_name(n)
        shown = image
        if self.watermark is not None:
            shown = self.watermark(image)
            clean = self.path / RESUME_DIR
            clean.mkdir(exist_ok=True)
            save_png(image, clean / name, self.run_id)
        save_png(shown, self.path / name, self.run_id)
        entry = {
            "index": n,
            "file": name,
            "seconds": round(seconds, 4),
            "sha256": file_sha256(self.path / name),
        }
        self.manifest["frames"] = [f for f in self.manifest["frames"] if f["index"] != n] + [entry]
        self.manifest["last_complete_frame"] = n
        if rng_states is not None:
            self.manifest["rng_states"] = [encode_state(s) for s in rng_states]
        self._write_manifest()
        if self.watermark is not None and n > 2:
            # Keep frame 0 and the last two: with trajectories, step n-1 may be the last whole one.
            stale = self.path / RESUME_DIR / frame_name(n - 2)
            if stale.exists():
                stale.unlink()

    def clean_frame(self, n: int) -> Path:
        """The file holding frame ``n`` as the progression produced it (without a watermark)."""
        clean = self.path / RESUME_DIR / frame_name(n)
        return clean if clean.exists() else self.path / frame_name(n)

    def write_gif(self, frames: list[Image.Image]) -> None:
        from pie_cli.imaging.animation import ExportOptions, write

        if self.watermark is not None:
            frames = [self.watermark(f) for f in frames]
        write(frames, self.path / GIF, ExportOptions(), run_id=self.run_id)
        self.manifest["outputs"]["gif"] = GIF

    def finish(self, status: str, **extra: Any) -> None:
        self.manifest["status"] = status
        self.manifest["finished"] = _now()
        self.manifest.update(extra)
        try:
            if status == "complete":
                self.manifest.pop("rng_states", None)
                if (self.path / RESUME_DIR).is_dir():
                    shutil.rmtree(self.path / RESUME_DIR)
            self._write_manifest()
        finally:  # even when the disk is full: never leave a live-looking lock behind
            if self.lock is not None:
                self.lock.release()

    def _write_manifest(self) -> None:
        write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2, default=str) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
