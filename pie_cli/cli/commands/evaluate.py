"""`pie evaluate RUN_DIR`: progression metrics, optional classifier confidence and CLIP-I, a report."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from pie_cli.cli.console import info, out, result
from pie_cli.cli.options import DebugOpt, JsonOpt
from pie_cli.errors import UserError

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
REPORT = "report.png"


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
    import numpy as np

    from pie_cli.evaluation.metrics import frame_metrics, rows, summarise
    from pie_cli.imaging import animation as export
    from pie_cli.imaging.masks import mask_to_grey
    from pie_cli.imaging.media import open_image

    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {run_dir} is not a directory.")
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"RUN_DIR {run_dir} is not writable; evaluate writes its metrics and report there.")
    sources, mask_path = export.collect([run_dir])
    frames = export.load(sources)
    mask = None
    if mask_path is not None:
        mask = np.asarray(mask_to_grey(open_image(mask_path, "mask"), mask_path)) >= 128
        if mask.shape[::-1] != frames[0].size:
            raise UserError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but the frames are "
                f"{frames[0].width}x{frames[0].height}."
            )
        if not mask.any():
            raise UserError(
                f"mask {mask_path} is empty (no pixel of 128 or more); there is no inside to measure change in."
            )
    prompt = _prompt(run_dir / "manifest.json")
    if clip is not None and not clip.is_dir():
        raise UserError(f"--clip {clip} is not a folder.")

    metrics = frame_metrics(frames, mask)
    label = None
    if classifier is not None:
        from pie_cli.evaluation.scorers import load_classifier
        from pie_cli.evaluation.scorers import target_label as pick_label

        scorer = load_classifier(classifier)
        label = pick_label(scorer.labels, prompt, target_label)
        probs = scorer.predict(frames)[:, scorer.labels.index(label)]
        for m, p in zip(metrics, probs, strict=True):
            m.confidence = round(float(p), 6)
    elif target_label is not None:
        raise UserError("--target-label needs --classifier.")
    if clip is not None:
        from pie_cli.evaluation.scorers import ClipImages

        emb = ClipImages(clip).embed(frames)
        for m, e in zip(metrics, emb, strict=True):
            m.clip_i = round(float(e @ emb[0]), 6)

    summary = summarise(metrics)
    data = {
        "run": str(run_dir),
        "prompt": prompt,
        "mask": bool(mask is not None),
        "classifier": classifier,
        "target_label": label,
        "clip": str(clip) if clip else None,
        "summary": summary,
        "frames": rows(metrics),
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows(metrics)[0]))
    writer.writeheader()
    writer.writerows(rows(metrics))
    from pie_cli.evaluation.report import render

    report = render(frames, metrics, f"{run_dir.name}: {prompt or ''}", label)
    table = buffer.getvalue()
    text = json.dumps(data, indent=2) + "\n"
    # All three or none: a full disk must not leave new metrics beside an old report.
    export.write_together(
        [
            (run_dir / METRICS_JSON, lambda tmp: tmp.write_text(text, encoding="utf-8")),
            (run_dir / METRICS_CSV, lambda tmp: tmp.write_text(table, encoding="utf-8")),
            (run_dir / REPORT, export.png_writer(report)),
        ]
    )

    if as_json:
        result(json.dumps(data, indent=2))
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
    info(f"evaluate: {run_dir / METRICS_JSON}, {run_dir / METRICS_CSV}, {run_dir / REPORT}")


def _prompt(manifest_path: Path) -> str | None:
    """The run's prompt from its manifest.json (None without one), or a ``UserError`` naming the file."""
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{manifest_path} is not valid JSON.") from None
    parameters = manifest.get("parameters", {}) if isinstance(manifest, dict) else None
    prompt = parameters.get("prompt") if isinstance(parameters, dict) else None
    if not isinstance(parameters, dict) or not (prompt is None or isinstance(prompt, str)):
        raise UserError(f"{manifest_path} is not a pie manifest (no parameters.prompt text).")
    return prompt


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
            fmt(m.clip_i, ".4f"),
        )
    out().print(table)
