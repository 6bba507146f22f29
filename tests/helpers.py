"""Plain helpers shared by the test modules: images, tiny command lines, data.

Fixtures live in ``conftest.py``; everything here is an ordinary function or class, imported
as ``from tests.helpers import ...``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
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
