"""Writing phantom datasets (`pie demo data`) and single demo cases (`pie demo case`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pie_cli.demo.phantom import Findings, metadata, render, sample_findings
from pie_cli.imaging.files import save_png, write_text
from pie_cli.imaging.ownership import Ledger

KINDS = ("effusion", "cardiomegaly")
_DATASET_FILE = re.compile(r"^(phantom_\d{5,}\.png|masks/phantom_\d{5,}_(left|right)\.png|metadata\.jsonl)$")
CASE_FILES = ("chest.png", "left-lung.png", "right-lung.png", "truth.json")


def dataset_file(rel: str) -> bool:
    """Whether a path (relative to the folder) is one `pie demo data` writes."""
    return _DATASET_FILE.match(rel) is not None


def case_file(rel: str) -> bool:
    """Whether a path (relative to the folder) is one `pie demo case` writes."""
    return rel in CASE_FILES


def write_dataset(
    out: Path, n: int, size: int = 64, seed: int = 0, kinds: tuple[str, ...] = ("effusion",), progress=None
) -> Path:
    """``n`` phantoms as an image folder with ``metadata.jsonl`` (file_name, text, severities) and lung masks."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    written = []
    for i in range(n):
        ph = render(sample_findings(rng, kinds), seed=seed * 1_000_003 + i, size=size)
        name = f"phantom_{i:05d}.png"
        save_png(ph.image, out / name)
        save_png(ph.left_lung, out / "masks" / f"phantom_{i:05d}_left.png")
        save_png(ph.right_lung, out / "masks" / f"phantom_{i:05d}_right.png")
        written += [
            out / name,
            out / "masks" / f"phantom_{i:05d}_left.png",
            out / "masks" / f"phantom_{i:05d}_right.png",
        ]
        rows.append(
            {
                **metadata(ph, name),
                "mask_left": f"masks/phantom_{i:05d}_left.png",
                "mask_right": f"masks/phantom_{i:05d}_right.png",
            }
        )
        if progress is not None:
            progress(i + 1, n)
    write_text(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    Ledger(out).record(*written, out / "metadata.jsonl")  # what --overwrite may replace later
    return out


def write_case(out: Path, seed: int = 7, size: int = 64, findings: Findings | None = None) -> dict[str, Path]:
    """One phantom (healthy by default) with both lung masks, its report and its ground truth."""
    out.mkdir(parents=True, exist_ok=True)
    ph = render(findings or Findings(), seed=seed, size=size)
    paths = {
        "image": out / "chest.png",
        "left": out / "left-lung.png",
        "right": out / "right-lung.png",
        "truth": out / "truth.json",
    }
    save_png(ph.image, paths["image"])
    save_png(ph.left_lung, paths["left"])
    save_png(ph.right_lung, paths["right"])
    write_text(
        paths["truth"], json.dumps({"report": ph.report, **metadata(ph, "chest.png")}, indent=2) + "\n"
    )
    Ledger(out).record(*paths.values())
    return paths
