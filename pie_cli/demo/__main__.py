"""`python -m pie_cli.demo DIR`: write the offline demo's model and inputs into DIR (idempotent).

DIR/tiny-sd/       a tiny randomly initialised SD-1.x-shaped model (diffusers layout)
DIR/chest.png      a synthetic chest-X-ray-like phantom
DIR/left-lung.png  the mask of the lung the demo edits (patient's left = image right)
"""

from __future__ import annotations

import sys
from pathlib import Path


def prepare(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "tiny-sd"
    if not (model / "model_index.json").exists():
        from pie_cli.demo.tiny import build_tiny_model

        build_tiny_model(model, seed=0)
    if not (directory / "chest.png").exists() or not (directory / "left-lung.png").exists():
        from pie_cli.demo.phantom import chest_phantom

        image, _right, left = chest_phantom(256, seed=0)
        image.save(directory / "chest.png")
        left.save(directory / "left-lung.png")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pie_cli.demo DIR")
    prepare(Path(sys.argv[1]))
