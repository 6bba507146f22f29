"""`pie evaluate RUN_DIR`: options -> the evaluation service -> a table (or JSON) and a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pie_cli.cli.console import info, out, result
from pie_cli.cli.options import AllowPickleOpt, DebugOpt, JsonOpt


def evaluate(
    run_dir: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_DIR",
            help="A `pie simulate` run directory, a --trajectories run or a --cohort folder.",
            show_default=False,
        ),
    ],
    classifier: Annotated[
        str | None,
        typer.Option(
            "--classifier",
            metavar="demo|xrv:NAME@WEIGHTS|PATH",
            show_default=False,
            help="Finding classifier: 'demo', a torchxrayvision model with its downloaded weights "
            "(needs --allow-pickle), a Hugging Face image-classification folder, or a TorchScript / .pt2 file.",
        ),
    ] = None,
    clip: Annotated[
        Path | None,
        typer.Option(
            "--clip",
            metavar="PATH",
            show_default=False,
            help="Local CLIP model folder, for CLIP-I vs frame 0.",
        ),
    ] = None,
    target_label: Annotated[
        str | None,
        typer.Option(
            "--target-label",
            show_default=False,
            help="Classifier label to follow (default: from the prompt).",
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            "--mask",
            metavar="MASK",
            show_default=False,
            help="Measure inside and outside this mask instead of the run's mask.png (e.g. a reader's region): "
            "the frames' size, or the original image's, brought to the frames through the run's recorded --fit.",
        ),
    ] = None,
    fit: Annotated[
        str | None,
        typer.Option(
            "--fit",
            metavar="crop|pad|native",
            show_default=False,
            help="The geometry of the frames, for runs made before pie recorded it (default crop); a run that "
            "recorded its --fit is measured in that one, and another value is refused.",
        ),
    ] = None,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per frame: change inside the mask, PSNR/SSIM and drift outside it, step change, confidence, CLIP-I.

    "Outside" leaves out the mask (any value > 0) dilated by 5 px, the SSIM window's reach, so an edit inside
    the mask never counts as a change outside it.

    Writes metrics.json, metrics.csv, report.png and report.html into RUN_DIR (replacing earlier ones). For a
    --trajectories run, each traj_KK/ is evaluated and RUN_DIR gets per-trajectory rows, mean +- sd
    per step and a K x N grid with per-step uncertainty; for a --cohort folder, each finished case
    is evaluated and RUN_DIR gets one row per case and the mean +- sd over cases.

    Examples:

    \b
      pie evaluate runs/chest --classifier demo
      pie evaluate runs/chest-k8 --classifier demo      # traj_00 .. traj_07 and their spread
      pie evaluate runs/cohort --classifier demo --json
      pie evaluate runs/chest --mask reader-roi.png       # another region, of the image's size
    """
    from pie_cli.evaluation.groups import evaluate_path
    from pie_cli.evaluation.metrics import WINDOW_RADIUS

    done = evaluate_path(run_dir, classifier, clip, target_label, allow_pickle, mask=mask, fit=fit)
    if getattr(done, "kind", None) in ("trajectories", "cohort"):
        _group(done, as_json)
        return
    summary, label, metrics = done.summary, done.label, done.metrics
    if as_json:
        result(json.dumps(done.data, indent=2))
    else:
        _table(metrics, label)
    if "confidence_rise" in summary:
        info(
            f"confidence in {label}: {summary['confidence_first']:.3f} -> {summary['confidence_last']:.3f} "
            f"({summary['confidence_rise']:+.3f}); rising in {summary['rising_steps']} of {len(metrics) - 1} steps"
            f"{', monotonic' if summary['monotonic'] else ''}"
        )
    where = f"outside the mask (+{WINDOW_RADIUS} px)"
    if "min_psnr_outside" in summary:
        identical = summary["identical_outside"]
        info(
            f"{where}: PSNR >= {summary['min_psnr_outside']:.1f} dB, SSIM >= {summary['min_ssim_outside']:.3f}, "
            f"drift <= {summary['max_drift_outside']:.3g} grey levels (final {summary['final_drift_outside']:.3g}), "
            f"largest |difference| {summary['max_abs_outside']:.3g}"
            + (f"; {identical} of {len(metrics) - 1} frames identical to frame 0" if identical else "")
        )
    elif summary.get("identical_outside"):
        info(f"{where}: every frame identical to frame 0, bit for bit")
    elif done.data.get("outside_pixels") == 0:
        info(f"{where}: no pixel is more than {WINDOW_RADIUS} px from the mask; nothing outside to measure")
    beyond = summary.get("beyond_feather")
    if beyond and beyond.get("pixels"):
        steps = len(metrics) - 1
        if beyond["identical_frames"] == steps:
            info(
                f"beyond the {beyond['feather']} px feather (--preserve-outside): all {steps} frames identical to "
                "frame 0, bit for bit (PSNR infinite)"
            )
        else:
            info(
                f"beyond the {beyond['feather']} px feather (--preserve-outside): largest |difference| "
                f"{beyond['max_abs']:.3g} ({beyond['identical_frames']} of {steps} frames identical)"
            )
    if "pace" in summary:
        info(f"pace ({summary['pace']['of'].replace('_', ' ')}): {summary['pace']['sentence']}")
    if summary.get("note"):
        info(f"note: {summary['note']}")
    info(f"evaluate: {', '.join(str(p) for p in done.written)}")


def _group(done, as_json: bool) -> None:
    """What a trajectory run's or a cohort's evaluation says: its aggregate, the pace of the mean, notes."""
    if as_json:
        result(json.dumps(done.data, indent=2))
    summary = done.summary
    if done.kind == "trajectories":
        info(f"{summary['trajectories']} trajectories of {summary['frames']} frames each")
        agg = summary["aggregate"]
        for key in (
            "final_change_in_mask",
            "min_psnr_outside",
            "max_drift_outside",
            "spearman",
            "first_step_share",
            "steps_to_90",
        ):
            if key in agg:
                info(f"  {key.replace('_', ' ')}: {agg[key]['mean']:.3f} +- {agg[key]['sd']:.3f}")
        if "pace_of_mean" in summary:
            info(
                f"pace ({summary['pace_of_mean']['of'].replace('_', ' ')}): {summary['pace_of_mean']['sentence']}"
            )
    else:
        info(f"{summary['cases']} cases evaluated, {summary['not_evaluated']} not finished")
        for row in done.data["cases"]:
            if row["case"] not in ("mean", "sd"):
                cells = ", ".join(
                    f"{k.replace('_', ' ')} {row[k]:.3g}"
                    for k in ("final_change_in_mask", "final_severity", "spearman")
                    if isinstance(row.get(k), (int, float))
                )
                info(f"  {row['case']}: {row['status']}{'; ' + cells if cells else ''}")
        for key, stats in summary["aggregate"].items():
            info(f"  mean over cases, {key.replace('_', ' ')}: {stats['mean']:.3f} +- {stats['sd']:.3f}")
    if summary.get("note"):
        info(f"note: {summary['note']}")
    info(f"evaluate: {', '.join(str(p) for p in done.written)}")


def _table(metrics, label: str | None) -> None:
    from rich.table import Table

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    table = Table(box=None, pad_edge=False)
    for col in (
        "frame",
        "change in mask",
        "PSNR out (dB)",
        "SSIM out",
        "drift out",
        "max |d| out",
        "step change",
        "P(target)" if label else "confidence",
        "severity",
        "CLIP-I",
    ):
        table.add_column(col, justify="right")
    for m in metrics:
        table.add_row(
            str(m.index),
            fmt(m.change_in_mask, ".2f"),
            fmt(m.psnr_outside, ".2f"),
            fmt(m.ssim_outside, ".4f"),
            fmt(m.drift_outside, ".3g"),
            fmt(m.max_abs_outside, ".3g"),
            fmt(m.step_change, ".2f"),
            fmt(m.confidence, ".3f"),
            fmt(m.severity, ".3f"),
            fmt(m.clip_i, ".4f"),
        )
    out().print(table)
