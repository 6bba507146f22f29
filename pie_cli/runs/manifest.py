"""``manifest.json``: the one owner of a run folder's schema.

A simulate manifest says what made the run and how far it got::

    pie_version, command ("simulate"), synthetic (true),
    parameters   every PIE parameter as given (and the schedules' parsed values),
    model        the resolved model: path, origin, repo and revision, UNet, LoRA adapters, the
                 weight files it loaded (``weights``: part, file, bytes, format, variant, sha256),
    run          how the model and device were asked for (what --resume needs to rebuild it),
    scheduler    class, timesteps of step 1, UNet calls per step,
    inputs       image and mask identified by SHA-256 and pixel geometry (never by path),
    geometry     how the image became the canvas (imaging.geometry: fit, source, resized, offset,
                 canvas, content) and, with --full-res, its window, region, scale and feather,
    placement    device, dtype, vae_dtype,
    speed        intra-op threads and, for the UNet and the VAE, memory_format (channels_last |
                 contiguous), weights (packed for oneDNN on the CPU | plain) and compiled,
    environment, outputs,
    run_id, status (running | complete | failed | interrupted), frames (index, file, seconds,
    sha256), last_complete_frame, rng_states (while unfinished), started, finished, resumed.

This module builds and reads it, derives the run id, encodes generator states, and names
every file pie writes in a run folder (the only files ``--overwrite`` replaces).
"""

from __future__ import annotations

import base64
import hashlib
import json
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError

MANIFEST = "manifest.json"
MASK = "mask.png"
GIF = "progression.gif"
UNCERTAINTY = "uncertainty.png"
MEAN_FINAL = "mean_final.png"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
REPORT = "report.png"
REPORT_HTML = "report.html"  # the self-contained report (evaluation.html)
COHORT_SUMMARY = "cohort_summary.csv"
RESUME_DIR = ".resume"  # the progression's own frames a run continues from (watermark, --full-res)

# The files and folders of a run folder: what `pie simulate` writes, and what `pie evaluate` adds.
RUN_OUTPUTS = (MASK, GIF, MANIFEST, UNCERTAINTY, MEAN_FINAL)
EVALUATION_OUTPUTS = (METRICS_JSON, METRICS_CSV, REPORT, REPORT_HTML)
_FRAME = re.compile(r"^frame_(\d{3,})\.png$")
_TRAJECTORY = re.compile(r"^traj_(\d{2,})$")


def run_files(
    steps: int, trajectories: int = 1, mask: bool = False, gif: bool = True
) -> Callable[[str], bool]:
    """Whether a path (relative to the run folder, with ``/``) is one a `pie simulate` case writes.

    Frames 0..steps, the manifest, ``mask.png`` with a mask, ``progression.gif`` unless --no-gif,
    the clean frames of ``.resume/``; with K > 1 trajectories, each ``traj_KK/`` holds one
    trajectory's such files and the top folder the mask, the manifest and the spread images.
    """

    def single(parts: list[str]) -> bool:
        if len(parts) == 2 and parts[0] == RESUME_DIR:
            parts = parts[1:]
        if len(parts) != 1:
            return False
        name = parts[0]
        frame = _FRAME.match(name)
        return (
            (frame is not None and int(frame.group(1)) <= steps)
            or name == MANIFEST
            or (name == MASK and mask)
            or (name == GIF and gif)
        )

    def writes(rel: str) -> bool:
        parts = rel.split("/")
        if trajectories == 1:
            return single(parts)
        if len(parts) == 1:
            return parts[0] in (MANIFEST, UNCERTAINTY, MEAN_FINAL) or (parts[0] == MASK and mask)
        trajectory = _TRAJECTORY.match(parts[0])
        return trajectory is not None and int(trajectory.group(1)) < trajectories and single(parts[1:])

    return writes


# Packages whose versions a manifest records.
RECORDED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pillow")


def frame_name(n: int) -> str:
    return f"frame_{n:03d}.png"


def trajectory_dir(k: int) -> str:
    return f"traj_{k:02d}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------- building


def build(
    *,
    parameters: dict[str, Any],
    model: dict[str, Any],
    run: dict[str, Any],
    scheduler: dict[str, Any],
    inputs: dict[str, Any],
    placement: dict[str, Any],
    environment: dict[str, Any],
    steps: int,
    geometry: dict[str, Any] | None = None,
    speed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A new simulate manifest, before its first frame (the writer adds status, frames and run id)."""
    from pie_cli import __version__

    return {
        "pie_version": __version__,
        "command": "simulate",
        "synthetic": True,
        "parameters": parameters,
        "model": model,
        "run": run,
        "scheduler": scheduler,
        "inputs": inputs,
        "geometry": geometry,
        "placement": placement,
        "speed": speed,
        "environment": environment,
        "outputs": {"frames": [frame_name(0), frame_name(steps)]},
    }


def input_record(image_path: Path, image: Any, mask_path: Path | None, mask: Any = None) -> dict[str, Any]:
    """How a manifest identifies its inputs: content hash and pixel geometry only, and how they were read.

    No paths and no command line: file and folder names often carry patient names or IDs.
    ``image_orientation`` is the EXIF orientation applied when reading (None: the file had none);
    ``mask_interpretation`` says how the mask's values were understood (grey, label map, alpha).
    """
    from pie_cli.imaging.masks import interpretation_of
    from pie_cli.imaging.media import orientation_of

    return {
        "image_sha256": file_sha256(image_path),
        "image_size": list(image.size),
        "image_mode": image.mode,
        "image_orientation": orientation_of(image),
        "mask": mask_path is not None,
        "mask_sha256": file_sha256(mask_path) if mask_path else None,
        "mask_interpretation": interpretation_of(mask) if mask is not None else None,
    }


def environment(device_type: str, device: Any = None) -> dict[str, Any]:
    """Python, platform, the recorded packages' versions, and the GPU or CPU threads used."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in RECORDED_PACKAGES:
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    if device_type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


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


# --------------------------------------------------------------------------- reading


def read(directory: Path, what: str) -> dict[str, Any] | None:
    """The manifest of the run in ``directory`` (None when there is none).

    ``what`` names the file's role in messages (``--resume``, ``RUN_DIR``); a file that is not a
    JSON object is a ``UserError``.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what}: {path} is not readable JSON ({detail}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{what}: {path} is not a pie manifest (not a JSON object).")
    return data


def status_of(directory: Path) -> str | None:
    """The recorded status of the run in ``directory``, or None (no manifest, or an unreadable one)."""
    try:
        manifest = read(directory, "run")
    except UserError:
        return None
    status = manifest.get("status") if manifest else None
    return status if isinstance(status, str) else None


def prompt_of(directory: Path, what: str) -> str | None:
    """The run's prompt (``parameters.prompt``), None without a manifest; a ``UserError`` if it is not pie's."""
    manifest = read(directory, what)
    if manifest is None:
        return None
    parameters = manifest.get("parameters", {})
    prompt = parameters.get("prompt") if isinstance(parameters, dict) else None
    if not isinstance(parameters, dict) or not (prompt is None or isinstance(prompt, str)):
        raise UserError(f"{Path(directory) / MANIFEST} is not a pie manifest (no parameters.prompt text).")
    return prompt


def run_id_of(directories: list[Path]) -> str | None:
    """The run id of the first of ``directories`` that holds a readable manifest (for an export's provenance)."""
    for directory in directories:
        if (Path(directory) / MANIFEST).is_file():
            try:
                manifest = read(directory, "run")
            except UserError:
                return None
            value = manifest.get("run_id") if manifest else None
            return value if isinstance(value, str) else None
    return None


def any_run_file(rel: str) -> bool:
    """Whether a path is one some `pie simulate` or `pie evaluate` run writes in a run folder."""
    return rel in EVALUATION_OUTPUTS or run_files(10**6, 10**4, mask=True, gif=True)(rel)
