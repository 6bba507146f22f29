"""Cohorts: `pie simulate --cohort cases.csv --out DIR`, one run folder per case, the model loaded once.

Columns: ``image`` (required), ``mask``, ``prompt``, ``seed``, ``out`` and any per-case option
(every PIE parameter such as ``steps``, ``strength``, ``guidance_scale`` or ``guidance-scale``,
plus ``scheduler``, ``trajectories`` and the schedules); see ``spec.COLUMNS``. Paths are
relative to the CSV's folder. A case's seed is its ``seed`` column, else ``--seed`` + its row
index, so its output does not depend on how many processes share the cohort. Under
``torchrun``/``accelerate launch`` each process takes every world-th case; the summary is
merged in the CSV's order. Rerunning skips complete cases and resumes interrupted ones.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie_cli.errors import Interrupted, UserError
from pie_cli.reporting import SILENT, Reporter
from pie_cli.runs.manifest import COHORT_SUMMARY
from pie_cli.simulate.spec import COLUMNS, SimulateSpec

PATH_COLUMNS = tuple(name for name, kind in COLUMNS.items() if kind is Path)
SUMMARY_HEADER = ["case", "status", "seconds", "output"]


@dataclass(frozen=True)
class Case:
    """One row of a cohort CSV."""

    index: int  # position in the file (0-based), fixes the default seed
    row: int  # line number, for messages
    name: str  # run directory under --out
    values: dict[str, Any]


def read_cohort(path: Path) -> list[Case]:
    """The cases of a cohort CSV, each value converted to its option's type, or a ``UserError`` naming the row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--cohort {path} does not exist.")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().replace("-", "_") for c in (reader.fieldnames or [])]
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise UserError(f"--cohort {path}: unknown column {unknown[0]!r}; known: {', '.join(COLUMNS)}.")
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
                    value = COLUMNS[key](text)
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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    return (rank, world) if world > 1 else (0, 1)


@dataclass
class CohortResult:
    """What a cohort run did: one summary row per case, in the CSV's order."""

    out: Path
    rows: list[list[Any]] = field(default_factory=list)
    failures: int = 0

    @property
    def summary(self) -> Path:
        return self.out / COHORT_SUMMARY

    def count(self, status: str) -> int:
        return sum(str(r[1]).startswith(status) for r in self.rows)


@dataclass
class _Plan:
    case: Case
    spec: SimulateSpec
    inputs: Any  # run.Inputs, or None for a case skipped as complete
    status: str  # "pending" | "resumed" | "skipped (complete)"
    resume: Any = None  # run.Resume


def run_cohort(
    cohort: Path, base: SimulateSpec, reporter: Reporter = SILENT, *, stop_on_error: bool = False
) -> CohortResult:
    """Every case of ``cohort`` under ``base.out``; ``stop_on_error`` re-raises a case's failure."""
    from pie_cli.signals import terminate_as_interrupt
    from pie_cli.simulate.run import check_against_model, load_model, run_case

    if base.image is not None:
        raise UserError("give an IMAGE or --cohort, not both.")
    cases = read_cohort(cohort)
    rank, world = process_rank()
    plans = [_plan(case, base, cohort, reporter) for case in split(cases, rank, world)]
    result = CohortResult(base.out)
    order = [c.name for c in cases]
    with terminate_as_interrupt():
        components = placement = None
        for index, plan in enumerate(plans):
            spec = plan.spec
            if plan.inputs is None:
                result.rows.append([plan.case.name, plan.status, 0.0, str(spec.out)])
                continue
            if components is None:
                components, placement = load_model(spec, plan.inputs, reporter)
            try:
                check_against_model(spec, plan.inputs, components, reporter)
                seconds = run_case(spec, plan.inputs, components, placement, reporter, resume=plan.resume)
                result.rows.append([plan.case.name, "complete", round(seconds, 3), str(spec.out)])
            except Interrupted:
                result.rows.append([plan.case.name, "interrupted", 0.0, str(spec.out)])
                result.rows += [
                    [p.case.name, "not started", 0.0, str(p.spec.out)] for p in plans[index + 1 :]
                ]
                if world == 1:  # other processes may still be running: no rendezvous now
                    write_summary(base.out, result.rows, rank, world, order)
                raise Interrupted(
                    f"interrupted during cohort case {plan.case.name}; its whole frames are kept. Rerun the same "
                    "command to go on: complete cases are skipped, interrupted ones resumed."
                ) from None
            except UserError as exc:
                result.failures += 1
                result.rows.append([plan.case.name, f"failed: {exc}", 0.0, str(spec.out)])
            except (RuntimeError, ValueError, OSError) as exc:
                if stop_on_error:
                    raise
                result.failures += 1
                result.rows.append(
                    [plan.case.name, f"failed: {type(exc).__name__}: {exc}", 0.0, str(spec.out)]
                )
    write_summary(base.out, result.rows, rank, world, order)
    return result


def _plan(case: Case, base: SimulateSpec, cohort: Path, reporter: Reporter) -> _Plan:
    """What to do with one case: skip it (complete), resume it (interrupted or killed), or run it."""
    from pie_cli.runs.manifest import status_of
    from pie_cli.simulate.resume import plan_resume
    from pie_cli.simulate.run import prepare_inputs

    values = dict(case.values)
    values.setdefault("seed", base.seed + case.index)
    out = base.out / case.name
    status = status_of(out)  # None without a (readable) manifest: then --out's own checks apply
    spec = base.with_values(out=out, overwrite=base.overwrite or status is not None, **values)
    if status == "complete" and not base.overwrite:
        return _Plan(case, spec, None, "skipped (complete)")
    if status in ("interrupted", "running") and not base.overwrite:
        # A case stopped by Ctrl-C, SIGTERM or a kill goes on from its last whole frame.
        try:
            resumed = plan_resume(out, base.with_values(out=out, overwrite=False, **values))
        except UserError as exc:
            reporter.warn(f"cohort case {case.name} cannot be resumed ({exc}); running it again.")
            resumed = None
        if resumed is not None:
            return _Plan(case, resumed[0], resumed[1], "resumed", resumed[2])
    try:
        return _Plan(case, spec, prepare_inputs(spec), "pending")
    except UserError as exc:
        raise UserError(f"--cohort {cohort} row {case.row}: {exc}") from None


def write_summary(
    out: Path, rows: list[list[Any]], rank: int, world: int, order: list[str] | None = None
) -> None:
    """``cohort_summary.csv`` (one row per case); several processes write parts the main one merges."""
    from pie_cli.imaging.files import write_text

    out.mkdir(parents=True, exist_ok=True)
    name = COHORT_SUMMARY if world == 1 else f"cohort_summary.rank{rank}.csv"
    write_text(out / name, _csv([SUMMARY_HEADER, *rows]))
    if world > 1:
        from pie_cli.core.distributed import process_state

        state = process_state()
        state.wait_for_everyone()
        if state.is_main_process:
            merged = []
            for r in range(world):
                part = out / f"cohort_summary.rank{r}.csv"
                with part.open(newline="") as fh:
                    merged += list(csv.reader(fh))[1:]
            position = {name: k for k, name in enumerate(order or [])}
            merged.sort(
                key=lambda row: position.get(row[0], len(position))
            )  # the CSV's order, not the ranks'
            write_text(out / COHORT_SUMMARY, _csv([SUMMARY_HEADER, *merged]))
            for r in range(world):
                (out / f"cohort_summary.rank{r}.csv").unlink(missing_ok=True)


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()
