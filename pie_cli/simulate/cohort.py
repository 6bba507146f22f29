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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie_cli.core.parameters import SCHEDULES
from pie_cli.errors import Interrupted, UserError
from pie_cli.reporting import SILENT, Reporter
from pie_cli.runs.manifest import COHORT_SUMMARY
from pie_cli.simulate.spec import COLUMNS, SCHEDULE_RECORDS, SimulateSpec, build_config

PATH_COLUMNS = tuple(name for name, kind in COLUMNS.items() if kind is Path)
# What each case was asked for and how it came out: its seed and prompt(s), and the headline measures
# of its frames (pie_cli.evaluation.evaluate.headline: the mean over trajectories).
HEADLINE = (
    "final_change_in_mask",
    "min_psnr_outside",
    "max_drift_outside",
    "first_step_share",
    "steps_to_90",
    "spearman",
)
SUMMARY_HEADER = ["case", "status", "seconds", "output", "seed", "prompts", *HEADLINE]
LEGACY_HEADERS = (["case", "status", "seconds", "output"],)  # what earlier pie versions wrote
Headline = Callable[[Path], dict]  # run folder -> HEADLINE values (given by the caller, e.g. the CLI)


@dataclass(frozen=True)
class Case:
    """One row of a cohort CSV."""

    index: int  # position in the file (0-based), fixes the default seed
    row: int  # line number, for messages
    name: str  # run directory under --out
    values: dict[str, Any]


def read_cohort(path: Path) -> list[Case]:
    """The cases of a cohort CSV, each value converted to its option's type, or a ``UserError`` naming the row.

    A case writes to ``--out/<out column>``, or ``--out/<image stem>`` (``stem-2``, ``stem-3`` ... for
    later rows whose images share a stem); an ``out`` must stay inside ``--out``.
    """
    from pie_cli.imaging.files import read_csv

    path = Path(path)
    columns, table = read_csv(path, "--cohort")
    keys = [c.replace("-", "_") for c in columns]
    for key in keys:
        if keys.count(key) > 1:
            same = [c for c, k in zip(columns, keys, strict=True) if k == key]
            raise UserError(f"--cohort {path}: columns {' and '.join(map(repr, same))} are the same option.")
    unknown = [k for k in keys if k not in COLUMNS]
    if unknown:
        raise UserError(f"--cohort {path}: unknown column {unknown[0]!r}; known: {', '.join(COLUMNS)}.")
    if "image" not in keys:
        raise UserError(f"--cohort {path} has no image column.")
    parsed = []
    for index, (row, raw) in enumerate(table):
        values: dict[str, Any] = {}
        for column, key in zip(columns, keys, strict=True):
            text = raw[column].strip()
            if not text:
                continue
            try:
                value = _parse(COLUMNS[key], text)
            except ValueError:
                raise UserError(f"--cohort {path} row {row}: {key} {text!r} is not a valid value.") from None
            if key in PATH_COLUMNS:
                value = value if value.is_absolute() else path.parent / value
            values[key] = value
        if "image" not in values:
            raise UserError(f"--cohort {path} row {row} has no image.")
        if "out" in values:
            values["out"] = _inside_out(values["out"], path, row)
        parsed.append((index, row, values))
    if not parsed:
        raise UserError(f"--cohort {path} has no cases.")
    return _named(parsed, path)


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _parse(kind: type, text: str) -> Any:
    """A cell as its column's type; a yes/no column takes true/false, yes/no, 1/0 or on/off (never bool("false"))."""
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(text)
    return kind(text)


def _inside_out(out: str, cohort: Path, row: int) -> str:
    """An ``out`` column value as a relative folder inside ``--out``, or a ``UserError``."""
    parts = Path(out).parts
    if Path(out).is_absolute() or not parts or any(p in ("..", ".") for p in parts):
        raise UserError(
            f"--cohort {cohort} row {row}: out {out!r} must be a folder inside --out "
            "(a relative name without '..')."
        )
    return Path(*parts).as_posix()


def _named(parsed: list[tuple[int, int, dict[str, Any]]], cohort: Path) -> list[Case]:
    """Cases with distinct folder names: explicit ``out`` values, then image stems made unique."""
    names: dict[str, int] = {}
    for _index, row, values in parsed:
        name = values.get("out")
        if name is None:
            continue
        if name in names:
            raise UserError(f"--cohort {cohort} rows {names[name]} and {row} both write to {name!r}.")
        names[name] = row
    cases = []
    for index, row, values in parsed:
        name = values.pop("out", None)
        if name is None:
            stem, name, k = values["image"].stem, values["image"].stem, 1
            while name in names:
                k += 1
                name = f"{stem}-{k}"
            names[name] = row
        cases.append(Case(index, row, name, values))
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

    def add(self, plan: _Plan, status: str, seconds: float = 0.0, headline: Headline | None = None) -> None:
        """One summary row: the case, its status and settings, and (when complete) its measures."""
        spec = plan.spec
        measures: dict = {}
        if headline is not None and status in ("complete", "skipped (complete)"):
            try:
                measures = headline(spec.out)
            except (UserError, OSError, ValueError):
                measures = {}  # frames that cannot be measured leave the cells empty, never a stand-in
        try:
            prompts = " | ".join(build_config(spec).prompts())
        except UserError:
            prompts = spec.prompt or ""
        self.rows.append(
            [
                plan.case.name,
                status,
                round(seconds, 3),
                str(spec.out),
                spec.seed,
                prompts,
                *("" if measures.get(k) is None else measures[k] for k in HEADLINE),
            ]
        )

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
    cohort: Path,
    base: SimulateSpec,
    reporter: Reporter = SILENT,
    *,
    stop_on_error: bool = False,
    headline: Headline | None = None,
    score_loader: Any = None,
) -> CohortResult:
    """Every case of ``cohort`` under ``base.out``; ``stop_on_error`` re-raises a case's failure.

    ``headline`` measures a finished case's folder for ``cohort_summary.csv`` (its ``HEADLINE``
    columns stay empty without it). ``score_loader`` builds the scorer of paced cases (``--pace``).
    """
    from pie_cli.core.devices import intra_op_threads
    from pie_cli.signals import terminate_as_interrupt
    from pie_cli.simulate.run import check_against_model, load_model, make_pace, run_case

    if base.image is not None:
        raise UserError("give an IMAGE or --cohort, not both.")
    cases = read_cohort(cohort)
    _check_summary(cohort, base.out, {c.name.split("/")[0] for c in cases})
    rank, world = process_rank()
    plans = [_plan(case, base, cohort, reporter) for case in split(cases, rank, world)]
    result = CohortResult(base.out)
    order = [c.name for c in cases]
    with terminate_as_interrupt(), intra_op_threads(base.threads):
        components = placement = None
        for index, plan in enumerate(plans):
            spec = plan.spec
            if plan.inputs is None:
                result.add(plan, plan.status, headline=headline)
                continue
            if components is None:
                components, placement = load_model(spec, plan.inputs, reporter)
            try:
                check_against_model(spec, plan.inputs, components, reporter)
                pace = make_pace(spec, score_loader)
                seconds = run_case(
                    spec, plan.inputs, components, placement, reporter, resume=plan.resume, pace=pace
                )
                result.add(plan, "complete", seconds, headline)
            except Interrupted:
                result.add(plan, "interrupted")
                for later in plans[index + 1 :]:
                    result.add(later, "not started")
                if world == 1:  # other processes may still be running: no rendezvous now
                    write_summary(base.out, result.rows, rank, world, order)
                raise Interrupted(
                    f"interrupted during cohort case {plan.case.name}; its whole frames are kept. Rerun the same "
                    "command to go on: complete cases are skipped, interrupted ones resumed."
                ) from None
            except UserError as exc:
                result.failures += 1
                result.add(plan, f"failed: {exc}")
            except (RuntimeError, ValueError, OSError) as exc:
                if stop_on_error:
                    raise
                result.failures += 1
                result.add(plan, f"failed: {type(exc).__name__}: {exc}")
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
        changed = _changed(out, spec)
        if changed is None:
            return _Plan(case, spec, None, "skipped (complete)")
        raise UserError(
            f"--cohort {cohort} row {case.row}: case {case.name} is complete in {out} with other settings "
            f"({changed}); pass --overwrite to run it again with these, or use another --out."
        )
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


def _check_summary(cohort: Path, out: Path, cases: set[str]) -> None:
    """The cohort CSV is not among the outputs, and ``cohort_summary.csv`` is pie's to (re)write."""
    from pie_cli.imaging.ownership import Ledger, refuse_overlap, written_by_pie

    refuse_overlap(
        "--out", out, [("--cohort", cohort)], lambda rel: rel == COHORT_SUMMARY or rel.split("/")[0] in cases
    )
    summary = out / COHORT_SUMMARY
    if summary.exists() and not written_by_pie(summary, Ledger(out)) and not _legacy_summary(summary):
        raise UserError(
            f"--out {out} holds {COHORT_SUMMARY}, which pie did not write (or which changed since); "
            "pie never replaces it: move it away or choose another directory."
        )


def _legacy_summary(path: Path) -> bool:
    """A cohort summary written by pie before it kept a ledger (no ledger beside it, pie's header)."""
    from pie_cli.imaging.ownership import LEDGER

    if (path.parent / LEDGER).is_file():
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().strip()
        return any(first == ",".join(header) for header in (SUMMARY_HEADER, *LEGACY_HEADERS))
    except (OSError, UnicodeDecodeError):
        return False


def _changed(out: Path, spec: SimulateSpec) -> str | None:
    """How a complete case's recorded settings differ from ``spec`` (None when they are the same)."""
    from pie_cli.runs.manifest import file_sha256, read

    manifest = read(out, "--cohort") or {}
    recorded = manifest.get("parameters") if isinstance(manifest.get("parameters"), dict) else {}
    for name, value in spec.parameters().items():
        if name in SCHEDULES or recorded.get(name) == value:
            continue
        return f"{name} {recorded.get(name)!r} -> {value!r}"
    # Schedules by their values, not their spelling or file name ("0.3:0.5" is "0.3,0.4,0.5").
    config = build_config(spec)
    for option, key in SCHEDULE_RECORDS.items():
        now = list(getattr(config, option))
        before = recorded.get(key) or []
        if now != before:
            return f"--{option.replace('_', '-')} {before!r} -> {now!r}"
    run = manifest.get("run") if isinstance(manifest.get("run"), dict) else {}
    if run.get("model") != spec.model:
        return f"model {run.get('model')!r} -> {spec.model!r}"
    config = str(spec.model_config) if spec.model_config is not None else None
    if run.get("model_config") != config:
        return f"model config {run.get('model_config')!r} -> {config!r}"
    inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
    if (
        spec.image is not None
        and spec.image.is_file()
        and inputs.get("image_sha256") != file_sha256(spec.image)
    ):
        return "another image"
    mask = file_sha256(spec.mask) if spec.mask is not None and spec.mask.is_file() else None
    if inputs.get("mask_sha256") != mask:
        return "another mask"
    return None


def write_summary(
    out: Path, rows: list[list[Any]], rank: int, world: int, order: list[str] | None = None
) -> None:
    """``cohort_summary.csv`` (one row per case); several processes write parts the main one merges."""
    from pie_cli.imaging.files import write_text
    from pie_cli.imaging.ownership import Ledger

    out.mkdir(parents=True, exist_ok=True)
    name = COHORT_SUMMARY if world == 1 else f"cohort_summary.rank{rank}.csv"
    write_text(out / name, _csv([SUMMARY_HEADER, *rows]))
    if world == 1:
        Ledger(out).record(out / name)
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
            Ledger(out).record(out / COHORT_SUMMARY)
            for r in range(world):
                (out / f"cohort_summary.rank{r}.csv").unlink(missing_ok=True)


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()
