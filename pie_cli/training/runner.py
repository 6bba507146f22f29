"""`pie finetune` as a service: configuration -> checked plan -> training run -> result.

:func:`plan` does everything cheap first (the configuration with its precedence, ``--out``,
the model's files, the dataset, the validation inputs) and touches no file; :func:`train`
then writes the run folder (``training_config.yaml``, ``training_summary.json``, checkpoints,
``metrics.csv``, the weights) and returns a :class:`~pie_cli.training.loop.TrainResult`.
Neither prints: notes and progress go to the :class:`~pie_cli.reporting.Reporter`.

``training_summary.json`` records, like a simulate manifest, no command line and no input
paths (folder names often carry patient IDs): the data's format and size, the model, the
effective values' sources, and paths inside the run folder only.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie_cli.core.registry import ModelSource
from pie_cli.errors import Interrupted, UserError
from pie_cli.imaging.ownership import Ledger
from pie_cli.reporting import SILENT, Reporter
from pie_cli.training.checkpoints import (
    COMPLETE,
    CONFIG_FILE,
    SUMMARY,
    TRAINING_FILES,
    checkpoint_step,
    incomplete_checkpoints,
    is_complete,
    latest_checkpoint,
    remove_leftovers,
)
from pie_cli.training.config import TrainSpec, merge, read_yaml, write_yaml
from pie_cli.training.data import Record, TrainingData

# Training values worth a warning when they silently fell back to a built-in default.
_NAMED_DEFAULTS = ("method", "batch_size", "resolution", "lr_scheduler")


@dataclass(frozen=True)
class TrainPlan:
    """A checked training run, before anything is written."""

    spec: TrainSpec
    source: ModelSource
    data: TrainingData
    prior: list[Record] | None
    out: Path
    checkpoint: Path | None  # the complete checkpoint to resume from
    overwrite: bool
    heldout: tuple[Record, ...] = ()  # --validation-split: examples scored, never trained on


def resolve_resume(resume: str, out: Path | None, reporter: Reporter = SILENT) -> tuple[Path, Path]:
    """(checkpoint folder, run directory) for --resume latest|PATH: always a complete checkpoint."""
    if resume == "latest":
        if out is None:
            raise UserError("--resume latest needs --out (the run directory to continue).")
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise UserError(
                f"--resume latest: {out} has no complete checkpoint (checkpoints/step_*) to continue from."
            )
        last = checkpoint_step(checkpoint) or 0
        for broken in (p for p in incomplete_checkpoints(out) if (checkpoint_step(p) or 0) > last):
            reporter.note(f"skipping {broken}: an incomplete checkpoint (the run stopped while saving it).")
        return checkpoint, out
    checkpoint = Path(resume)
    if not checkpoint.is_dir():
        raise UserError(f"--resume {resume} is not a checkpoint folder.")
    if not is_complete(checkpoint):
        raise UserError(
            f"--resume {resume} is not a complete checkpoint (no {COMPLETE}: the run stopped while "
            "saving it); use --resume latest or an earlier checkpoint."
        )
    return checkpoint, out or checkpoint.parent.parent


def plan(
    flags: dict[str, Any],
    explicit: dict[str, str],
    config: Path | None = None,
    resume: str | None = None,
    *,
    check_out: bool = True,
    overwrite: bool = False,
    reporter: Reporter = SILENT,
) -> TrainPlan:
    """Check a training run cheaply: ``flags`` are option values, ``explicit`` the given ones and how.

    Precedence: options given (command line or ``PIE_*`` environment) > ``--config`` > the saved
    run's configuration (when resuming) > defaults. ``check_out=False`` skips the ``--out``
    checks (a dry run writes nothing).
    """
    from pie_cli.core.registry import resolve
    from pie_cli.core.single_file import check_source_weights
    from pie_cli.training.data import class_records, load_data

    # 1. Configuration, checked before anything else.
    recipe = read_yaml(config) if config is not None else {}
    out_hint = flags["out"] if "out" in explicit else recipe.get("out")
    checkpoint = None
    saved: dict[str, Any] = {}
    if resume:
        checkpoint, run_dir = resolve_resume(resume, Path(out_hint) if out_hint else None, reporter)
        if (run_dir / CONFIG_FILE).is_file():
            saved = read_yaml(run_dir / CONFIG_FILE, "saved config")
        flags = {**flags, "out": str(run_dir)}
        explicit = {**explicit, "out": explicit.get("out", "command line")}
    spec = launcher_precision(merge(flags, explicit, recipe, saved))
    spec.check()
    if saved and not spec.allow_schedule_change:
        _refuse_schedule_change(spec, saved, resume)
    out = Path(spec.out)
    if spec.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU.")

    # 2. Inputs, cheaply: model, data, images, and the output directory against them.
    source = resolve(spec.model, config=spec.model_config)
    if source.loras:
        raise UserError(f"--model {spec.model} carries LoRA adapters; fine-tune from its base model instead.")
    if source.checkpoint is not None and spec.method == "full":
        raise UserError(
            f"--method full writes a whole model, which needs --model in diffusers layout; convert {spec.model} "
            "once with `pie models convert` and fine-tune the folder it writes."
        )
    check_source_weights(source, spec.allow_pickle)  # pickle-only weights refused before anything is written
    data = load_data(spec)
    heldout: list[Record] = []
    if spec.validation_split:
        import dataclasses

        from pie_cli.training.validation import split_records

        train_records, heldout = split_records(data.records, spec.validation_split, spec.seed)
        data = dataclasses.replace(data, records=train_records)
    prior = class_records(spec) if spec.class_data else None
    _check_trackers(spec.report_to)
    _check_out(spec, source, data, resume is None and check_out, overwrite)
    if spec.validation_image:
        from pie_cli.imaging.masks import prepare_mask, require_nonempty
        from pie_cli.imaging.media import open_image

        image = open_image(Path(spec.validation_image), "--validation-image")
        raw = open_image(Path(spec.validation_mask or ""), "--validation-mask")
        mask = prepare_mask(
            raw, image.size, spec.resolution, f"--validation-mask {spec.validation_mask}", fit=spec.fit
        )
        require_nonempty(mask, raw, spec.resolution, f"--validation-mask {spec.validation_mask}")
    return TrainPlan(spec, source, data, prior, out, checkpoint, overwrite, tuple(heldout))


def _check_trackers(report_to: str) -> None:
    """--report-to needs its package; refused now rather than after the model has loaded."""
    import importlib.metadata
    import importlib.util

    if report_to == "none":
        return

    def installed(name: str) -> bool:  # accelerate's own test: importable and with package metadata
        if importlib.util.find_spec(name) is None:
            return False
        try:
            importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[report_to]
    if not any(installed(m) for m in modules):
        raise UserError(
            f"--report-to {report_to} needs the {modules[0]} package: pip install {modules[0]} "
            "(or --report-to none; metrics.csv and loss.png are written either way)."
        )


# What `accelerate launch --mixed_precision X` (or its config file's value) hands the training process.
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"


def launcher_precision(spec: TrainSpec) -> TrainSpec:
    """``spec`` with the launcher's mixed precision where --mixed-precision was not given (a recipe or the
    saved run's configuration counts as given): `accelerate launch --mixed_precision bf16 -m pie_cli finetune`
    trains in bf16, as diffusers' scripts do, and the value and its source are recorded."""
    import dataclasses
    import os

    from pie_cli.training.config import PRECISIONS

    value = os.environ.get(LAUNCHER_PRECISION, "").strip().lower()
    if not value or spec.sources.get("mixed_precision", "default") != "default":
        return spec
    if value not in PRECISIONS:
        raise UserError(
            f"${LAUNCHER_PRECISION} is {value!r} (set by accelerate launch or its config); "
            f"pie trains with one of {', '.join(PRECISIONS)}."
        )
    sources = {**spec.sources, "mixed_precision": f"accelerate launch / config (${LAUNCHER_PRECISION})"}
    return dataclasses.replace(spec, mixed_precision=value, sources=sources)


# What sets the length and shape of a run's LR schedule (and, with --epochs, its steps per epoch).
SCHEDULE_KEYS = (
    "max_steps",
    "epochs",
    "lr_scheduler",
    "warmup_steps",
    "batch_size",
    "grad_accum",
    "buckets",
    "bucket_step",
    "validation_split",  # the examples trained on, and so the steps per epoch
)


def _refuse_schedule_change(spec: TrainSpec, saved: dict[str, Any], resume: str | None) -> None:
    """A resume that would change the LR schedule silently (another --max-steps, warmup...) is refused."""
    saved_spec = merge({}, {}, {}, saved)
    for key in SCHEDULE_KEYS:
        if key not in saved:
            continue
        now, before = getattr(spec, key), getattr(saved_spec, key)
        if key == "max_steps" and spec.epochs is None and saved_spec.epochs is None:
            from pie_cli.training.config import DEFAULT_MAX_STEPS

            now, before = now or DEFAULT_MAX_STEPS, before or DEFAULT_MAX_STEPS
        if now != before:
            raise UserError(
                f"--resume {resume}: --{key.replace('_', '-')} {now} differs from the run's {before}, which would "
                "change its learning-rate schedule; add --allow-schedule-change to continue with the new value."
            )


def training_output(rel: str) -> bool:
    """Whether a path (relative to the run folder) is one a `pie finetune` run writes."""
    return rel.split("/")[0] in TRAINING_FILES


def _check_out(
    spec: TrainSpec, source: ModelSource, data: TrainingData, fresh: bool, overwrite: bool
) -> None:
    """--out is no input (model, data, class data, validation files), and is free for a fresh run."""
    from pie_cli.imaging.files import check_out_dir
    from pie_cli.imaging.ownership import plan_overwrite, refuse_overlap

    out = Path(spec.out)
    table = Path(data.source) if data.format in ("csv", "jsonl") else None
    folder = Path(data.source) if data.format not in ("csv", "jsonl", "hf") else None
    inputs = [
        ("--model", source.checkpoint or source.path),
        ("--model-config", source.path if source.checkpoint else None),
        ("--unet", source.unet),
        ("--data", folder or table),
        ("--class-data", Path(spec.class_data) if spec.class_data else None),
        ("--validation-image", Path(spec.validation_image) if spec.validation_image else None),
        ("--validation-mask", Path(spec.validation_mask) if spec.validation_mask else None),
    ]
    refuse_overlap("--out", out, inputs, training_output)
    if table is not None and out.resolve() in table.resolve().parents:
        raise UserError(f"--data {table} lies inside --out {out}; keep the dataset out of the run folder.")
    if not fresh:
        return
    check_out_dir(
        out,
        overwrite,
        not_empty="continue it with --resume latest, start over with --overwrite, or choose another directory",
    )
    if overwrite:
        plan_overwrite(
            out, training_output, legacy_outputs=training_output
        )  # refuses now what it would replace


def defaulted_values(spec: TrainSpec) -> list[str]:
    """``name=value`` for the training values that fell back to built-in defaults."""
    found = [f"{n}={getattr(spec, n)}" for n in _NAMED_DEFAULTS if spec.sources.get(n) == "default"]
    if spec.sources.get("lr") == "default":
        found.append(f"lr={spec.learning_rate:g}")
    if spec.max_steps is None and spec.epochs is None:
        found.append("max_steps=1000")
    return found


def is_main_process() -> bool:
    """Whether this process writes the run (under torchrun / accelerate launch only rank 0 does)."""
    from pie_cli.core.distributed import process_state

    return process_state().is_main_process


def train(plan: TrainPlan, reporter: Reporter = SILENT):
    """Run ``plan``: check its images, write the run folder, train, save; returns a ``TrainResult``."""
    import dataclasses

    from pie_cli.core.loading import quiet_libraries
    from pie_cli.training.data import check_images
    from pie_cli.training.loop import Trainer

    spec, out = plan.spec, plan.out
    with reporter.status(f"checking {len(plan.data.records)} images"):
        check_images(plan.data)
        if plan.heldout:
            check_images(dataclasses.replace(plan.data, records=list(plan.heldout)))
        if plan.prior:
            check_images(TrainingData(plan.prior, "folder", spec.class_data or ""))
    if spec.buckets or spec.loss_mask == "lungs":  # buckets (refusals first) and lung masks, once
        from pie_cli.training.dataset import prepare_examples

        prepare_examples(spec, plan.data, list(plan.heldout), reporter)
    main = is_main_process()
    summary = _Summary(out, main, plan)
    _prepare_folder(plan, main, summary)
    defaulted = defaulted_values(spec)
    if defaulted:
        reporter.warn("using defaults for " + ", ".join(defaulted) + " (set them with flags or --config).")
    trainer = Trainer(spec, plan.source, plan.data, plan.prior, out, reporter, list(plan.heldout))
    try:
        with (
            trainer.signals,
            quiet_libraries(reporter.verbose),
        ):  # SIGINT/SIGTERM: stop at a step, checkpointed
            with reporter.status(f"loading {spec.model}"):
                trainer.setup()
            trained = trainer.run(plan.checkpoint)
    except KeyboardInterrupt as exc:
        raise _interrupted(exc, trainer, out, main, summary) from None
    except Exception as exc:
        summary.save(
            status="failed",
            error=f"{type(exc).__name__}: {exc}",
            step=trainer.state.step if hasattr(trainer, "state") else 0,
        )
        raise
    summary.save(
        status="complete",
        validation=_validation_summary(trainer, summary),
        step=trained.steps,
        seconds=round(trained.seconds, 3),
        last_loss=trained.last_loss,
        weights=summary.inside(trained.weights),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return trained


def _validation_summary(trainer: Any, summary: _Summary) -> dict[str, Any] | None:
    """The held-out loss's record: examples, timesteps, last and best (with its checkpoint, when kept)."""
    from pie_cli.training.checkpoints import CHECKPOINTS
    from pie_cli.training.validation import timesteps_of

    if trainer.heldout is None:
        return None
    best = trainer.best()
    history = trainer.val_history
    record: dict[str, Any] = {
        "examples": len(trainer.heldout.dataset),
        "timesteps": list(timesteps_of(trainer.noise_scheduler.config.num_train_timesteps)),
        "weights": "ema" if trainer.ema is not None else "trained",
        "last": {"step": history[-1][0], "val_loss": history[-1][1]} if history else None,
        "best": None,
    }
    if best is not None:
        folder = trainer.out / CHECKPOINTS / f"step_{best[0]:06d}"
        record["best"] = {
            "step": best[0],
            "val_loss": best[1],
            "checkpoint": summary.inside(folder) if folder.is_dir() else None,
        }
    return record


class _Summary:
    """``training_summary.json``, rewritten (atomically) as the run goes."""

    def __init__(self, out: Path, main: bool, plan: TrainPlan) -> None:
        from pie_cli import __version__

        self.out, self.main = out, main
        self.data = {
            "pie_version": __version__,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": plan.source.describe(),
            "data": {
                "format": plan.data.format,
                "examples": len(plan.data.records),
                "held_out": len(plan.heldout),
            },
            "resumed_from": self.inside(plan.checkpoint) if plan.checkpoint else None,
            "sources": plan.spec.sources,
        }
        spec = plan.spec
        if spec.loss_mask:
            lungs = spec.loss_mask == "lungs"
            self.data["loss_mask"] = {
                "kind": spec.loss_mask,
                # images the lung heuristic found nothing in: trained with full weight
                "no_lungs_found": plan.data.lung_mask_failures if lungs else None,
            }
        if spec.buckets:
            from pie_cli.training.buckets import plan_buckets

            counts = plan_buckets(plan.data, spec).counts()
            self.data["buckets"] = [{"canvas": f"{w}x{h}", "examples": n} for (w, h), n in counts]

    def inside(self, path: Path | None) -> str | None:
        """A path of the run as relative to its folder (the summary names no path outside it)."""
        if path is None:
            return None
        try:
            return str(Path(path).resolve().relative_to(self.out.resolve()))
        except ValueError:
            return Path(path).name

    def save(self, **extra: Any) -> None:
        if self.main:
            from pie_cli.imaging.files import write_text

            self.data.update(extra)
            write_text(self.out / SUMMARY, json.dumps(self.data, indent=2, default=str) + "\n")
            Ledger(self.out).record(self.out / SUMMARY)


def _prepare_folder(plan: TrainPlan, main: bool, summary: _Summary) -> None:
    """The run folder with its configuration and summary (a fresh --overwrite removes pie's old files)."""
    out = plan.out
    if not main:
        return
    created = not out.exists()
    if plan.overwrite and plan.checkpoint is None and out.is_dir():
        from pie_cli.imaging.ownership import plan_overwrite, remove_planned

        # Only what pie can prove it wrote (checked again now, before anything goes).
        remove_planned(out, plan_overwrite(out, training_output, legacy_outputs=training_output))
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)  # temporary files and half-saved checkpoints of a killed run
    try:
        write_yaml(plan.spec, out / CONFIG_FILE)
        Ledger(out).record(out / CONFIG_FILE)
        summary.save()
    except OSError:  # a full disk before anything useful exists: leave nothing behind
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _interrupted(
    exc: KeyboardInterrupt, trainer: Any, out: Path, main: bool, summary: _Summary
) -> Interrupted:
    """Record an interrupt and say where training stopped and how to continue it."""
    from pie_cli.signals import TrainingInterrupted

    step = trainer.state.step if hasattr(trainer, "state") else 0
    total = getattr(trainer, "total_steps", None)
    signum = trainer.signals.received
    by = signal.Signals(signum).name if signum else None
    at = f"step {step}" + (f" of {total}" if total else "")
    how = f" by {by}" if by else ""
    checkpoint = latest_checkpoint(out)
    validation = _validation_summary(trainer, summary) if getattr(trainer, "heldout", None) else None
    summary.save(
        status="interrupted",
        step=step,
        signal=by,
        checkpoint=summary.inside(checkpoint),
        validation=validation,
    )
    if not main:
        return Interrupted("interrupted.")
    if isinstance(exc, TrainingInterrupted):
        note = f"finetune: stopped{how} at {at}; saved checkpoint {exc.checkpoint}."
    elif checkpoint is not None:
        note = (
            f"finetune: interrupted{how} at {at}; the last complete checkpoint is {checkpoint} "
            "(the steps after it will be trained again)."
        )
    else:
        note = f"finetune: interrupted{how} at {at}, before the first checkpoint."
    if checkpoint is not None:
        note += f" Continue with: pie finetune --out {shlex.quote(str(out))} --resume latest"
    else:
        note += " Start over with --overwrite."
    return Interrupted(note)


# --------------------------------------------------------------------------- --dry-run


@dataclass
class DryRun:
    """What `pie finetune --dry-run` reports: the schedule, and a one-step probe's figures when run."""

    steps_per_epoch: int
    total_steps: int
    epochs: float
    trainable: int | None = None  # parameters the optimizer updates
    parameters: int | None = None  # of the trained models (UNet, and the text encoder when trained)
    step_seconds: float | None = None  # one optimizer step (grad_accum micro-batches), after a warm-up step
    peak_memory: int | None = None  # bytes: CUDA's peak allocation, or the process's peak RSS on the CPU
    memory_kind: str = ""
    device: str = ""
    probe_examples: int = 0


def schedule(spec: TrainSpec, batches_per_epoch: int) -> tuple[int, int, float]:
    """(optimizer steps per epoch, total steps, epochs) of a run with this many batches per epoch."""
    import math

    from pie_cli.training.config import DEFAULT_MAX_STEPS

    per_epoch = max(1, math.ceil(batches_per_epoch / spec.grad_accum))
    if spec.max_steps is not None:
        total = spec.max_steps
    elif spec.epochs is not None:
        total = spec.epochs * per_epoch
    else:
        total = DEFAULT_MAX_STEPS
    return per_epoch, total, total / per_epoch


def dry_run(plan: TrainPlan, probe: bool = True, reporter: Reporter = SILENT) -> DryRun:
    """The run's schedule and, with ``probe``, one real optimizer step's time and memory (in a scratch folder;
    nothing of ``--out`` is touched). Single process: under a launcher, divide the steps by the processes."""
    import math

    if not probe:
        batches = math.ceil(len(plan.data.records) / plan.spec.batch_size)
        if plan.spec.buckets:  # each bucket's last batch may be short
            from pie_cli.training.buckets import plan_buckets

            batches = plan_buckets(plan.data, plan.spec).batches(plan.spec.batch_size)
        per_epoch, total, epochs = schedule(plan.spec, batches)
        return DryRun(per_epoch, total, epochs)
    import dataclasses
    import tempfile

    from pie_cli.core.loading import quiet_libraries
    from pie_cli.training.dataset import training_batches
    from pie_cli.training.loop import Trainer

    spec = plan.spec
    needed = 2 * spec.batch_size * spec.grad_accum  # a warm-up step and the measured one
    records = plan.data.records[:needed]
    with tempfile.TemporaryDirectory(prefix="pie-probe-") as scratch:
        probe_spec = dataclasses.replace(
            spec, out=scratch, report_to="none", validation_every=None, max_steps=2, epochs=None
        )
        data = dataclasses.replace(plan.data, records=records)
        prior = plan.prior[:needed] if plan.prior else None
        trainer = Trainer(probe_spec, plan.source, data, prior, Path(scratch), reporter)
        with quiet_libraries(reporter.verbose):
            with reporter.status(f"loading {spec.model} for a one-step probe"):
                trainer.setup()
            seconds, peak, kind = trainer.probe()
        batches = len(training_batches(spec, plan.data, plan.prior, trainer.tokenizer).loader)
    per_epoch, total, epochs = schedule(spec, batches)
    trained = trainer.trainables
    return DryRun(
        per_epoch,
        total,
        epochs,
        trainable=sum(p.numel() for p in trainer.params),
        parameters=sum(p.numel() for m in trained for p in trainer.accelerator.unwrap_model(m).parameters()),
        step_seconds=seconds,
        peak_memory=peak,
        memory_kind=kind,
        device=str(trainer.accelerator.device),
        probe_examples=len(records),
    )
