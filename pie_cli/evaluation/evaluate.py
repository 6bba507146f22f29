"""`pie evaluate RUN_DIR` as a service: measure a run's frames and write metrics.json, metrics.csv, report.png.

Per frame: mean change inside the mask, PSNR/SSIM and the drift (mean and largest |difference|)
outside it against frame 0, step-to-step change, and optionally a classifier's confidence in the
target finding and CLIP-I against frame 0. The outside keeps the SSIM window's reach clear of the
mask (``metrics.OUTSIDE``). Frames are measured at their own depth and size (8-bit RGB or grey,
16-bit grey; any shape); the classifiers and the pictures get them as 8-bit RGB. The files are
written together (all or none).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pie_cli.errors import UserError
from pie_cli.evaluation.metrics import FrameMetrics
from pie_cli.runs.manifest import EVALUATION_OUTPUTS


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_run`` measured and where it wrote it."""

    data: dict[str, Any]  # what metrics.json holds
    metrics: list[FrameMetrics]
    label: str | None  # the classifier label followed
    written: tuple[Path, ...]

    @property
    def summary(self) -> dict[str, Any]:
        return self.data["summary"]


def evaluate_run(
    run_dir: Path,
    classifier: str | None = None,
    clip: Path | None = None,
    target_label: str | None = None,
    ledger: Any = None,
    allow_pickle: bool = False,
    mask: Path | None = None,
    fit: str | None = None,
) -> Evaluation:
    """Measure the frames of ``run_dir`` and write the metrics and the report beside them.

    ``ledger`` is the ownership ledger to check and record the outputs in (a trajectory folder's
    is its run's, one level up); by default ``run_dir``'s own. ``mask`` (another mask, e.g. a
    reader's region: the frames' size or the original image's) replaces the run's mask.png; it is
    brought to the frames through the geometry the run recorded (``fit``: for a run that
    recorded none, made before pie had --fit, the geometry its frames are in; default crop).
    """
    from pie_cli.evaluation.metrics import OUTSIDE, frame_metrics, outside_of, rows, summarise
    from pie_cli.evaluation.report import render
    from pie_cli.imaging.files import png_writer, write_together
    from pie_cli.imaging.media import to_rgb8
    from pie_cli.imaging.ownership import Ledger, refuse_overlap
    from pie_cli.runs import frames as run_frames
    from pie_cli.runs.locks import check_not_locked
    from pie_cli.runs.manifest import prompt_of

    run_dir = Path(run_dir)
    if not str(run_dir).strip():
        raise UserError("RUN_DIR is empty; name the run directory to evaluate.")
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {run_dir} is not a directory.")
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"RUN_DIR {run_dir} is not writable; evaluate writes its metrics and report there.")
    check_not_locked(run_dir, "RUN_DIR")  # a run still writing: its frames are not all there
    outputs = tuple(run_dir / name for name in EVALUATION_OUTPUTS)  # json, csv, png, html
    ledger = ledger if ledger is not None else Ledger(run_dir)
    for path in outputs:  # earlier evaluations are replaced, a file of the user's never
        _check_replaceable(path, ledger)
    classifier_file = None
    if classifier and classifier != "demo":
        classifier_file = Path(classifier.split("@", 1)[-1] if classifier.startswith("xrv:") else classifier)
    refuse_overlap(
        "RUN_DIR",
        run_dir,
        [("--classifier", classifier_file), ("--mask", mask)],
        lambda rel: rel in [p.name for p in outputs],
    )
    sources, mask_path = run_frames.collect([run_dir])
    measured = load_frames(sources)  # at their own depth, for the metrics
    frames = [to_rgb8(f) for f in measured]  # for the classifiers, CLIP and the pictures
    edited = values = None
    given_mask, mask = mask, None
    if given_mask is not None or fit is not None:
        given_path, values = _given_mask(run_dir, given_mask, fit, measured[0].size)
        mask_path = given_path or mask_path
    if values is None and mask_path is not None:
        values = run_frames.load_mask(mask_path, measured)
    if mask_path is not None:
        mask, edited = values >= 128, values > 0
        if not mask.any():
            raise UserError(
                f"mask {mask_path} is empty (no pixel of 128 or more); there is no inside to measure change in."
            )
    prompt = prompt_of(run_dir, "RUN_DIR")
    if clip is not None and not Path(clip).is_dir():
        raise UserError(f"--clip {clip} is not a folder.")
    if target_label is not None and classifier is None:
        raise UserError("--target-label needs --classifier.")

    metrics = frame_metrics(measured, mask, edited)
    label = None
    if classifier is not None:
        from pie_cli.evaluation.scorers import cached_classifier
        from pie_cli.evaluation.scorers import target_label as pick_label

        scorer = cached_classifier(classifier, allow_pickle)
        label = pick_label(scorer.labels, prompt, target_label)
        scores = scorer.predict(frames)
        probs = scores[:, scorer.labels.index(label)]
        for m, p in zip(metrics, probs, strict=True):
            m.confidence = round(float(p), 6)
        graded = f"{label}_severity"  # a classifier that grades gives the expected grade too
        if graded in scorer.labels:
            for m, s in zip(metrics, scores[:, scorer.labels.index(graded)], strict=True):
                m.severity = round(float(s), 6)
    if clip is not None:
        from pie_cli.evaluation.scorers import ClipImages

        emb = ClipImages(Path(clip)).embed(frames)
        for m, e in zip(metrics, emb, strict=True):
            m.clip_i = round(float(e @ emb[0]), 6)

    table = rows(metrics)
    summary = summarise(metrics)
    if edited is not None and not given_mask:
        beyond = beyond_feather(run_dir, measured, edited)
        if beyond is not None:
            summary["beyond_feather"] = beyond
    steered = steered_by(run_dir)
    if classifier is not None and steered is not None and steered.get("classifier") == classifier:
        summary["note"] = (
            f"the pace of this run was steered by this same classifier ({classifier}, {steered.get('output')}), "
            "so its curve follows the target by construction; judge the progression with another classifier "
            "or by eye."
        )
    data = {
        "run": str(run_dir),
        "prompt": prompt,
        "mask": bool(mask is not None),
        "outside": OUTSIDE if mask is not None else None,
        "outside_pixels": int(outside_of(edited).sum()) if edited is not None else None,
        "classifier": classifier,
        "target_label": label,
        "clip": str(clip) if clip else None,
        "steered_by": steered,
        "summary": summary,
        "frames": table,
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    report = render(frames, metrics, f"{run_dir.name}: {prompt or ''}", label)
    text, spreadsheet = json.dumps(data, indent=2) + "\n", buffer.getvalue()
    from pie_cli.evaluation.html import run_report

    grey_mask = (mask * 255).astype("uint8") if mask is not None else None
    page = run_report(run_dir, frames, grey_mask, data)
    written = outputs
    # All four or none: a full disk must not leave new metrics beside an old report.
    write_together(
        [
            (written[0], lambda tmp: tmp.write_text(text, encoding="utf-8")),
            (written[1], lambda tmp: tmp.write_text(spreadsheet, encoding="utf-8")),
            (written[2], png_writer(report)),
            (written[3], lambda tmp: tmp.write_text(page, encoding="utf-8")),
        ]
    )
    ledger.record(*written)  # so a later --overwrite of the run (or evaluate) knows them as pie's
    return Evaluation(data, metrics, label, written)


def load_frames(sources) -> list[Image.Image]:
    """A run's frames as they are (8-bit RGB or grey, 16-bit grey as "I;16"), all of one size."""
    from pie_cli.runs.frames import load_as_read

    return load_as_read(sources)


def steered_by(run_dir: Path) -> dict[str, Any] | None:
    """A paced run's record of what steered it (manifest ``pace``: classifier, output, curve), else None."""
    from pie_cli.runs.manifest import MANIFEST

    try:
        manifest = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pace = manifest.get("pace") if isinstance(manifest, dict) else None
    return pace if isinstance(pace, dict) else None


def beyond_feather(run_dir: Path, frames: list[Any], edited: Any) -> dict[str, Any] | None:
    """For a ``--preserve-outside`` run: how its frames compare with frame 0 farther than the feather
    from the mask (where the option promises frame 0's pixels bit for bit); None for other runs."""
    import numpy as np

    from pie_cli.evaluation.metrics import grey
    from pie_cli.imaging.morphology import dilate
    from pie_cli.runs import manifest as runs_manifest

    record = runs_manifest.read(run_dir, "RUN_DIR") or {}
    params = record.get("parameters") if isinstance(record.get("parameters"), dict) else {}
    if params.get("preserve_outside") is not True:
        return None
    geometry = record.get("geometry") if isinstance(record.get("geometry"), dict) else {}
    full = geometry.get("full_res") if isinstance(geometry.get("full_res"), dict) else None
    feather = full.get("feather") if full else params.get("preserve_feather")
    if not isinstance(feather, int) or isinstance(feather, bool):
        feather = 8  # the default: one latent cell at the working size
    region = ~dilate(np.asarray(edited, dtype=bool), feather)
    if not region.any():
        return {"feather": feather, "pixels": 0, "max_abs": None, "identical_frames": None}
    first = grey(frames[0])
    largest = [float(np.abs(grey(f) - first)[region].max()) for f in frames[1:]]
    return {
        "feather": feather,
        "pixels": int(region.sum()),
        "max_abs": max(largest, default=0.0),
        "identical_frames": sum(v == 0 for v in largest),
    }


def _given_mask(
    run_dir: Path, mask: Path | None, fit: str | None, frame_size: tuple[int, int]
) -> tuple[Path | None, Any]:
    """(path, 8-bit values in the frames' geometry) of ``--mask``, checked against the run's recorded geometry."""
    import numpy as np

    from pie_cli.imaging.geometry import FIT_CHOICES, fit_geometry
    from pie_cli.imaging.masks import mask_in_frame, mask_to_grey
    from pie_cli.imaging.media import open_image
    from pie_cli.runs import manifest as runs_manifest

    record = runs_manifest.read(run_dir, "RUN_DIR") or {}
    geometry = record.get("geometry") if isinstance(record.get("geometry"), dict) else None
    recorded = geometry.get("fit") if geometry else None
    if fit is not None:
        if fit not in FIT_CHOICES:
            raise UserError(f"--fit must be one of {', '.join(FIT_CHOICES)}, got {fit!r}.")
        if recorded is not None and fit != recorded:
            raise UserError(
                f"--fit {fit}: the run in {run_dir} was made with --fit {recorded}, the geometry its frames are in; "
                "drop --fit."
            )
    if mask is None:
        return None, None
    grey = mask_to_grey(open_image(mask, "--mask"), mask)
    if grey.size == frame_size:
        return mask, np.asarray(grey)
    inputs = record.get("inputs") if isinstance(record.get("inputs"), dict) else {}
    size = inputs.get("image_size")
    resolution = (record.get("parameters") or {}).get("resolution")
    full = geometry.get("full_res") if geometry else None
    if full is None and isinstance(size, list) and len(size) == 2 and isinstance(resolution, int):
        source = (int(size[0]), int(size[1]))
        if grey.size == source:
            frame = mask_in_frame(grey, fit_geometry(source, resolution, recorded or fit or "crop"))
            if frame.size == frame_size:
                return mask, np.asarray(frame)
    (mw, mh), (fw, fh) = grey.size, frame_size
    image = f" or the image's {size[0]}x{size[1]}" if isinstance(size, list) and full is None else ""
    raise UserError(f"--mask {mask} is {mw}x{mh}; it must have the frames' size {fw}x{fh}{image}.")


def _check_replaceable(path: Path, ledger) -> None:
    """An existing output is replaced only when pie wrote it (a user's own metrics.csv never is)."""
    from pie_cli.imaging.ownership import LEDGER, legacy_pie_file, written_by_pie

    if not path.exists():
        return
    legacy = not (path.parent / LEDGER).is_file() and legacy_pie_file(path)
    if path.is_dir() or not (written_by_pie(path, ledger) or legacy):
        raise UserError(
            f"RUN_DIR {path.parent} holds {path.name}, which pie did not write (or which changed since); "
            "pie never replaces it: move it away and evaluate again."
        )


def headline(run_dir: Path) -> dict[str, Any]:
    """The headline measures of a finished run folder, for a cohort's summary: the final change inside
    the mask, the lowest PSNR and the largest drift outside it, and the pace of the change (share at
    step 1, steps to 90 %, Spearman); for a trajectory run, the mean over its trajectories (``traj_KK/``)."""
    import numpy as np

    from pie_cli.evaluation.metrics import frame_metrics, summarise
    from pie_cli.runs import frames as run_frames

    run_dir = Path(run_dir)
    folders = sorted(p for p in run_dir.glob("traj_[0-9][0-9]") if p.is_dir()) or [run_dir]
    found: dict[str, list[float]] = {}
    for folder in folders:
        sources, mask_path = run_frames.collect([folder])
        mask_path = mask_path or (run_dir / "mask.png" if (run_dir / "mask.png").is_file() else None)
        frames = load_frames(sources)
        grey_mask = run_frames.load_mask(mask_path, frames) if mask_path is not None else None
        mask = grey_mask >= 128 if grey_mask is not None and (grey_mask >= 128).any() else None
        summary = summarise(frame_metrics(frames, mask, grey_mask > 0 if mask is not None else None))
        pace = summary.get("pace", {})
        values = {
            "final_change_in_mask": summary.get("final_change_in_mask"),
            "min_psnr_outside": summary.get("min_psnr_outside"),
            "max_drift_outside": summary.get("max_drift_outside"),
            "first_step_share": pace.get("first_step_share"),
            "steps_to_90": pace.get("steps_to_90"),
            "spearman": pace.get("spearman"),
        }
        for key, value in values.items():
            found.setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for key, values in found.items():
        if all(v is not None for v in values):  # a measure some trajectory lacks is left out, not guessed
            out[key] = values[0] if len(values) == 1 else round(float(np.mean(values)), 4)
    return out
