"""`pie evaluate RUN_DIR`: options -> the evaluation service -> a table (or JSON) and a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pie_cli.cli.console import info, out, result
from pie_cli.cli.options import DebugOpt, JsonOpt


def evaluate(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="A `pie simulate` run directory.", show_default=False)
    ],
    classifier: Annotated[
        str | None,
        typer.Option(
            "--classifier",
            metavar="demo|PATH",
            show_default=False,
            help="Finding classifier: 'demo', a Hugging Face image-classification folder or a TorchScript file.",
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
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per frame: change inside the mask, PSNR/SSIM outside it, step change, classifier confidence, CLIP-I.

    Writes metrics.json, metrics.csv and report.png into RUN_DIR (replacing earlier ones).
    """
    from pie_cli.evaluation.evaluate import evaluate_run

    done = evaluate_run(run_dir, classifier, clip, target_label)
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
    if "min_psnr_outside" in summary:
        info(
            f"outside the mask: PSNR >= {summary['min_psnr_outside']:.1f} dB, SSIM >= {summary['min_ssim_outside']:.3f}"
        )
    elif summary.get("identical_outside"):
        info("outside the mask: every frame identical to frame 0")
    if "pace" in summary:
        info(f"pace ({summary['pace']['of'].replace('_', ' ')}): {summary['pace']['sentence']}")
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
            fmt(m.step_change, ".2f"),
            fmt(m.confidence, ".3f"),
            fmt(m.severity, ".3f"),
            fmt(m.clip_i, ".4f"),
        )
    out().print(table)
