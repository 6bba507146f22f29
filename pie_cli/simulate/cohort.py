"""Cohorts for `pie simulate --cohort cases.csv`: one row per case, split across processes.

Columns: ``image`` (required), ``mask``, ``prompt``, ``seed``, ``out`` and any simulate option
(``steps``, ``strength``, ``guidance_scale`` or ``guidance-scale``, ...). Paths are relative to
the CSV's folder. A case's seed is its ``seed`` column, else ``--seed`` + its row index, so its
output does not depend on how many processes share the cohort.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_cli.errors import UserError

# option -> converter; every other column is refused
_COLUMNS = {
    "image": Path,
    "mask": Path,
    "prompt": str,
    "seed": int,
    "out": str,
    "negative_prompt": str,
    "steps": int,
    "strength": float,
    "guidance_scale": float,
    "beta1": float,
    "beta2": float,
    "inference_steps": int,
    "resolution": int,
    "scheduler": str,
    "trajectories": int,
    "prompt_schedule": Path,
    "strength_schedule": str,
    "guidance_schedule": str,
}
PATH_COLUMNS = ("image", "mask", "prompt_schedule")


@dataclass(frozen=True)
class Case:
    index: int  # position in the file (0-based), fixes the default seed
    row: int  # line number, for messages
    name: str  # run directory under --out
    values: dict[str, Any]


def read_cohort(path: Path) -> list[Case]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--cohort {path} does not exist.")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().replace("-", "_") for c in (reader.fieldnames or [])]
        unknown = [c for c in columns if c not in _COLUMNS]
        if unknown:
            raise UserError(f"--cohort {path}: unknown column {unknown[0]!r}; known: {', '.join(_COLUMNS)}.")
        if "image" not in columns:
            raise UserError(f"--cohort {path} has no image column.")
        cases, names = [], {}
        for index, raw in enumerate(reader):
            row = index + 2
            values: dict[str, Any] = {}
            for key, text in raw.items():
                key = key.strip().replace("-", "_")
                text = (text or "").strip()
                if not text:
                    continue
                try:
                    value = _COLUMNS[key](text)
                except ValueError:
                    raise UserError(
                        f"--cohort {path} row {row}: {key} {text!r} is not a valid value."
                    ) from None
                if key in PATH_COLUMNS:
                    value = value if value.is_absolute() else path.parent / value
                values[key] = value
            if "image" not in values:
                raise UserError(f"--cohort {path} row {row} has no image.")
            name = values.pop("out", None) or values["image"].stem
            if name in names:
                raise UserError(
                    f"--cohort {path} rows {names[name]} and {row} both write to {name!r}; add an out column."
                )
            names[name] = row
            cases.append(Case(index, row, name, values))
    if not cases:
        raise UserError(f"--cohort {path} has no cases.")
    return cases


def split(cases: list[Case], rank: int, world: int) -> list[Case]:
    """This process's share: every ``world``-th case starting at ``rank`` (balanced, order kept)."""
    return cases[rank::world]


def process_rank() -> tuple[int, int]:
    """(rank, world size) under `accelerate launch`/torchrun, else (0, 1); no torch import."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    return (rank, world) if world > 1 else (0, 1)
