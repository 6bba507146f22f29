"""`pie evaluate` on pie's folders of several runs: a ``--trajectories`` run and a ``--cohort`` folder.

- A trajectory run (``traj_00/ .. traj_KK/``): each trajectory is evaluated in its own folder
  (its metrics.json, metrics.csv, report.png); the run's top folder gets the per-trajectory rows,
  mean and standard deviation per step of every measure, the summaries' mean and sd, and a report
  with the K x N grid of frames, a row of per-step uncertainty maps (per-pixel sd across the
  trajectories, on a labelled colour scale) and the mean +- sd curves.
- A cohort folder (one folder per case, ``cohort_summary.csv``): each finished case is evaluated
  (a trajectory case as above); the folder gets one row per case, the mean and sd over cases,
  and a report of every case's curve.

Nothing here guesses: a measure some member lacks is left out of the aggregate, and cases that
did not finish are listed with their status, not evaluated.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pie_cli.errors import UserError
from pie_cli.runs.frames import case_folders, folder_kind, trajectory_folders
from pie_cli.runs.manifest import EVALUATION_OUTPUTS

MEASURES = (
    "change_in_mask",
    "psnr_outside",
    "ssim_outside",
    "drift_outside",
    "max_abs_outside",
    "step_change",
    "confidence",
    "severity",
    "clip_i",
)
# Per case of a cohort: its headline numbers (what cohort_metrics rows hold).
CASE_COLUMNS = (
    "final_change_in_mask",
    "min_psnr_outside",
    "min_ssim_outside",
    "max_drift_outside",
    "final_severity",
    "final_confidence",
    "first_step_share",
    "steps_to_90",
    "spearman",
    "largest_backward_step",
)


@dataclass(frozen=True)
class GroupEvaluation:
    """What evaluating a trajectory run or a cohort folder measured and wrote."""

    kind: str  # "trajectories" or "cohort"
    data: dict[str, Any]
    written: tuple[Path, ...]
    members: tuple[tuple[str, Any], ...]  # (name, Evaluation | GroupEvaluation)

    @property
    def summary(self) -> dict[str, Any]:
        return self.data["summary"]


def evaluate_path(
    folder: Path,
    classifier: str | None = None,
    clip: Path | None = None,
    target_label: str | None = None,
    allow_pickle: bool = False,
    mask: Path | None = None,
    fit: str | None = None,
) -> Any:
    """Evaluate a run, a trajectory run or a cohort folder (an ``Evaluation`` or a ``GroupEvaluation``).

    ``mask`` replaces the runs' own mask.png (see :func:`~pie_cli.evaluation.evaluate.evaluate_run`).
    """
    from pie_cli.evaluation.evaluate import evaluate_run

    kind = folder_kind(folder)
    if kind == "cohort" and mask is not None:
        raise UserError(
            f"--mask is one image's mask; {folder} is a cohort of several images: evaluate a case."
        )
    if kind == "trajectories":
        return evaluate_trajectories(Path(folder), classifier, clip, target_label, allow_pickle, mask, fit)
    if kind == "cohort":
        return evaluate_cohort(Path(folder), classifier, clip, target_label, allow_pickle)
    return evaluate_run(folder, classifier, clip, target_label, allow_pickle=allow_pickle, mask=mask, fit=fit)


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    if not values or any(v is None for v in values):
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    return round(float(arr.mean()), 6), round(float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, 6)


def _flat(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of a run's summary, pace measures included (``pace.spearman`` as ``spearman``)."""
    out = {}
    for key, value in summary.items():
        if key == "pace" and isinstance(value, dict):
            out.update(
                {k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            )
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def _aggregate(summaries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    flats = [_flat(s) for s in summaries]
    keys = [k for k in flats[0] if all(k in f for f in flats)] if flats else []
    out = {}
    for key in keys:
        mean, sd = _stats([f[key] for f in flats])
        if mean is not None:
            out[key] = {"mean": mean, "sd": sd}
    return out


def _write(ledger, outputs: tuple[Path, ...], data: dict, table: list[dict], report, page: str) -> None:
    """metrics.json, metrics.csv, report.png and report.html, all or none, recorded as pie's."""
    from pie_cli.imaging.files import png_writer, write_together

    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for row in table for k in row))
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(table)
    text, spreadsheet = json.dumps(data, indent=2) + "\n", buffer.getvalue()
    write_together(
        [
            (outputs[0], lambda tmp: tmp.write_text(text, encoding="utf-8")),
            (outputs[1], lambda tmp: tmp.write_text(spreadsheet, encoding="utf-8")),
            (outputs[2], png_writer(report)),
            (outputs[3], lambda tmp: tmp.write_text(page, encoding="utf-8")),
        ]
    )
    ledger.record(*outputs)


def _claim(folder: Path) -> tuple[Any, tuple[Path, ...]]:
    """(the folder's ledger, its evaluation outputs), refused before anything is evaluated or written
    when the folder is not writable, is still being written, or holds an output pie did not write."""
    import os

    from pie_cli.evaluation.evaluate import _check_replaceable
    from pie_cli.imaging.ownership import Ledger
    from pie_cli.runs.locks import check_not_locked

    if not os.access(folder, os.W_OK):
        raise UserError(f"RUN_DIR {folder} is not writable; evaluate writes its metrics and report there.")
    check_not_locked(folder, "RUN_DIR")
    ledger = Ledger(folder)  # a trajectory run's ledger holds its trajectories' files too
    outputs = tuple(folder / name for name in EVALUATION_OUTPUTS)
    for path in outputs:
        _check_replaceable(path, ledger)
    return ledger, outputs


def evaluate_trajectories(
    folder: Path,
    classifier: str | None,
    clip: Path | None,
    target_label: str | None,
    allow_pickle: bool = False,
    mask: Path | None = None,
    fit: str | None = None,
) -> GroupEvaluation:
    """Each ``traj_KK/`` evaluated, then the run's aggregate in its top folder."""
    from pie_cli.evaluation.evaluate import evaluate_run, load_frames
    from pie_cli.evaluation.pace import describe, pace
    from pie_cli.evaluation.report import render_trajectories
    from pie_cli.runs import frames as run_frames
    from pie_cli.runs.manifest import prompt_of

    ledger, outputs = _claim(folder)  # before any trajectory's files are written
    subs = trajectory_folders(folder)
    members = [
        (
            p.name,
            evaluate_run(
                p,
                classifier,
                clip,
                target_label,
                ledger=ledger,
                allow_pickle=allow_pickle,
                mask=mask,
                fit=fit,
            ),
        )
        for p in subs
    ]
    lengths = {len(e.metrics) for _, e in members}
    if len(lengths) != 1:
        raise UserError(
            f"RUN_DIR {folder}: its trajectories have different numbers of frames ({sorted(lengths)})."
        )
    steps = lengths.pop()
    per_step: dict[str, dict[str, list]] = {}
    for measure in MEASURES:
        columns = [[getattr(e.metrics[i], measure) for _, e in members] for i in range(steps)]
        if all(v is None for col in columns for v in col):
            continue
        stats = [_stats(col) for col in columns]
        per_step[measure] = {"mean": [s[0] for s in stats], "sd": [s[1] for s in stats]}
    table = []
    for name, evaluation in members:
        table += [{"trajectory": name, **row} for row in evaluation.data["frames"]]
    for which in ("mean", "sd"):
        for i in range(steps):
            table.append(
                {
                    "trajectory": which,
                    "index": i,
                    **{m: per_step[m][which][i] if m in per_step else None for m in MEASURES},
                }
            )
    summary: dict[str, Any] = {
        "trajectories": len(members),
        "frames": steps,
        "aggregate": _aggregate([e.summary for _, e in members]),
    }
    curve_name = next((m for m in ("severity", "confidence", "change_in_mask") if m in per_step), None)
    if curve_name is not None and all(v is not None for v in per_step[curve_name]["mean"]):
        measures = pace(per_step[curve_name]["mean"])
        summary["pace_of_mean"] = {
            "of": curve_name,
            **measures,
            "sentence": describe(measures, f"the mean {curve_name.replace('_', ' ')}"),
        }
    notes = {e.summary.get("note") for _, e in members if e.summary.get("note")}
    if notes:
        summary["note"] = notes.pop()
    data = {
        "run": str(folder),
        "kind": "trajectories",
        "prompt": prompt_of(folder, "RUN_DIR"),
        "classifier": classifier,
        "target_label": members[0][1].label,
        "outside": members[0][1].data.get("outside"),
        "summary": summary,
        "per_trajectory": {name: e.summary for name, e in members},
        "per_step": per_step,
        "frames": table,
    }
    grid = [load_frames(run_frames.collect([p])[0]) for p in subs]  # at their own depth
    title = f"{folder.name}: {data['prompt'] or ''} ({len(members)} trajectories)"
    report = render_trajectories(grid, per_step, title, members[0][1].label)
    from pie_cli.evaluation.html import trajectories_report

    page = trajectories_report(folder, report, data, subs[0] / "progression.gif")
    _write(ledger, outputs, data, table, report, page)
    return GroupEvaluation("trajectories", data, outputs, tuple(members))


def _case_row(name: str, evaluation: Any) -> dict[str, Any]:
    summary = evaluation.summary
    if getattr(evaluation, "kind", "run") == "trajectories":
        agg = summary["aggregate"]
        values = {k: agg[k]["mean"] for k in agg}
        per_step = evaluation.data["per_step"]
        for measure, column in (("severity", "final_severity"), ("confidence", "final_confidence")):
            if measure in per_step:
                values[column] = per_step[measure]["mean"][-1]
        trajectories = summary["trajectories"]
    else:
        values = _flat(summary)
        last = evaluation.metrics[-1]
        values["final_severity"] = last.severity
        values["final_confidence"] = last.confidence
        trajectories = 1
    return {
        "case": name,
        "status": "evaluated",
        "trajectories": trajectories,
        **{c: values.get(c) for c in CASE_COLUMNS},
    }


def evaluate_cohort(
    folder: Path,
    classifier: str | None,
    clip: Path | None,
    target_label: str | None,
    allow_pickle: bool = False,
) -> GroupEvaluation:
    """Every finished case evaluated; one row per case and the mean and sd over cases at the top."""
    from pie_cli.evaluation.evaluate import evaluate_run
    from pie_cli.evaluation.report import render_cohort
    from pie_cli.runs.manifest import status_of

    ledger, outputs = _claim(folder)
    members, table, curves = [], [], {}
    for case in case_folders(folder):
        status = status_of(case) if (case / "manifest.json").is_file() else "complete"
        if status != "complete":
            table.append({"case": case.name, "status": f"not evaluated ({status})"})
            continue
        if folder_kind(case) == "trajectories":
            evaluation: Any = evaluate_trajectories(case, classifier, clip, target_label, allow_pickle)
            curve = next(
                (
                    evaluation.data["per_step"][m]["mean"]
                    for m in ("severity", "confidence", "change_in_mask")
                    if m in evaluation.data["per_step"]
                ),
                None,
            )
        else:
            evaluation = evaluate_run(case, classifier, clip, target_label, allow_pickle=allow_pickle)
            from pie_cli.evaluation.metrics import progression_curve

            found = progression_curve(evaluation.metrics)
            curve = found[1] if found else None
        members.append((case.name, evaluation))
        table.append(_case_row(case.name, evaluation))
        if curve is not None:
            curves[case.name] = curve
    if not members:
        raise UserError(
            f"RUN_DIR {folder}: no finished case to evaluate (is it a `pie simulate --cohort` folder?)."
        )
    evaluated = [r for r in table if r["status"] == "evaluated"]
    aggregate = {}
    for column in CASE_COLUMNS:
        mean, sd = _stats([r.get(column) for r in evaluated])
        if mean is not None:
            aggregate[column] = {"mean": mean, "sd": sd}
    for which in ("mean", "sd"):
        table.append(
            {
                "case": which,
                "status": f"over {len(evaluated)} cases",
                **{c: aggregate[c][which] if c in aggregate else None for c in CASE_COLUMNS},
            }
        )
    summary = {
        "cases": len(evaluated),
        "not_evaluated": len(table) - 2 - len(evaluated),
        "aggregate": aggregate,
    }
    notes = {e.summary.get("note") for _, e in members if e.summary.get("note")}
    if notes:
        summary["note"] = notes.pop()
    data = {
        "run": str(folder),
        "kind": "cohort",
        "classifier": classifier,
        "summary": summary,
        "cases": table,
    }
    curve_of = next(
        (m for m in ("severity", "confidence") if evaluated and evaluated[0].get(f"final_{m}") is not None),
        "change_in_mask",
    )
    report = render_cohort(curves, f"{folder.name}: {len(evaluated)} cases", curve_of)
    from pie_cli.evaluation.html import cohort_report

    _write(ledger, outputs, data, table, report, cohort_report(folder, report, data))
    return GroupEvaluation("cohort", data, outputs, tuple(members))
