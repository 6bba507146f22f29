"""Run directories: frames, mask, GIF and ``manifest.json``, every file written atomically.

An interrupted or failed run leaves only whole files and a manifest whose ``status``
says where it stopped (``running`` -> ``complete`` | ``failed`` | ``interrupted``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from PIL import Image

from pie_cli.errors import UserError
from pie_cli.media import save_png, write_text

MANIFEST = "manifest.json"
MASK = "mask.png"
GIF = "progression.gif"
# Files pie itself writes in a run directory; --overwrite removes these and nothing else.
_PIE_FILE = re.compile(
    r"^(frame_\d{3,}\.png|mask\.png|progression\.gif|manifest\.json|uncertainty\.png|mean_final\.png"
    r"|metrics\.json|metrics\.csv|report\.png|\..+\.\d+\.tmp)$"
)
_PIE_DIR = re.compile(r"^traj_\d{2,}$")


def frame_name(n: int) -> str:
    return f"frame_{n:03d}.png"


def check_out_dir(path: Path, overwrite: bool) -> None:
    """Refuse an unusable ``--out`` before any work is done (nothing is created here)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a directory.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(
            f"--out {path} is not empty; pass --overwrite to replace pie's files there, or choose another directory."
        )
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK):
        raise UserError(f"--out {path} cannot be created: {ancestor} is not writable.")


def default_out_dir(image: Path) -> Path:
    return Path("runs") / f"{Path(image).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunWriter:
    """Writes one run directory as frames arrive."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.created_dir = False

    def open(self, overwrite: bool) -> None:
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created_dir = True
        elif overwrite:
            for entry in self.path.iterdir():
                if entry.is_file() and _PIE_FILE.match(entry.name):
                    entry.unlink()
                elif entry.is_dir() and _PIE_DIR.match(entry.name):
                    shutil.rmtree(entry)
        self.manifest.setdefault("frames", [])
        self.manifest["status"] = "running"
        self.manifest["started"] = _now()
        self._write_manifest()

    def write_mask(self, mask: Image.Image) -> None:
        save_png(mask, self.path / MASK)
        self.manifest["outputs"]["mask"] = MASK

    def write_frame(self, n: int, image: Image.Image, seconds: float) -> None:
        name = frame_name(n)
        save_png(image, self.path / name)
        self.manifest["frames"].append({"index": n, "file": name, "seconds": round(seconds, 4)})
        self.manifest["last_complete_frame"] = n
        self._write_manifest()

    def write_gif(self, frames: list[Image.Image]) -> None:
        from pie_cli.export import ExportOptions, write

        write(frames, self.path / GIF, ExportOptions())
        self.manifest["outputs"]["gif"] = GIF

    def finish(self, status: str, **extra: Any) -> None:
        self.manifest["status"] = status
        self.manifest["finished"] = _now()
        self.manifest.update(extra)
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2, default=str) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
