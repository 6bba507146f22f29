"""`pie finetune`: options (+ --config recipe) -> checked TrainSpec -> data -> accelerate loop."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pie_cli import __version__
from pie_cli.cli.console import info, result, ui, warn
from pie_cli.cli.options import DebugOpt
from pie_cli.errors import Interrupted, UserError
from pie_cli.training.config import OPTION_NAMES, TrainSpec, merge, read_yaml, write_yaml

D = TrainSpec()  # defaults shown in --help come from the one place they are defined
CONFIG_FILE = "training_config.yaml"
# What a finished or started run leaves in DIR; --overwrite removes exactly these.
RUN_ENTRIES = (
    "checkpoints",
    "samples",
    "metrics.csv",
    CONFIG_FILE,
    "training_summary.json",
    "pytorch_lora_weights.safetensors",
    "unet",
    "text_encoder",
    "vae",
    "tokenizer",
    "scheduler",
    "model_index.json",
)


def finetune(
    ctx: typer.Context,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Image folder with metadata.jsonl/.csv, a CSV/JSONL file, a dataset root (CheXpert, HAM10000, EyePACS) or a Hugging Face dataset in the local cache.",
            show_default=False,
        ),
    ] = D.data,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Base model (see `pie models list`).")
    ] = D.model,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Output directory.", show_default=False)
    ] = D.out,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Recipe YAML with any option below; flags override it.", show_default=False
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="latest|PATH",
            help="Continue from the newest checkpoint in --out, or a checkpoint folder.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the dataset size and the first prompts, then exit.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Start over in a non-empty --out (removes pie's training files there)."
        ),
    ] = False,
    # data
    data_format: Annotated[
        str, typer.Option("--data-format", help="auto, folder, csv, jsonl, hf, chexpert, ham10000, eyepacs.")
    ] = D.data_format,
    image_column: Annotated[
        str | None,
        typer.Option(
            "--image-column",
            show_default=False,
            help="Image path column (default: file_name, image, path...).",
        ),
    ] = D.image_column,
    caption_column: Annotated[
        str | None,
        typer.Option(
            "--caption-column", show_default=False, help="Text column (default: text, caption, report...)."
        ),
    ] = D.caption_column,
    prompt_template: Annotated[
        str,
        typer.Option("--prompt-template", help="Prompt from {instance}, {labels}, {caption} or any column."),
    ] = D.prompt_template,
    instance_prompt: Annotated[
        str | None,
        typer.Option(
            "--instance-prompt",
            show_default=False,
            help='e.g. "A chest X-ray image" (the default for chexpert).',
        ),
    ] = D.instance_prompt,
    view: Annotated[str, typer.Option("--view", help="CheXpert views: frontal, lateral, all.")] = D.view,
    uncertain: Annotated[
        str, typer.Option("--uncertain", help="CheXpert uncertain (-1) labels count as negative or positive.")
    ] = D.uncertain,
    split: Annotated[str, typer.Option("--split", help="Split of a Hugging Face dataset.")] = D.split,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", show_default=False, help="Use only the first N examples.")
    ] = D.max_samples,
    # method
    method: Annotated[
        str, typer.Option("--method", help="lora (peft adapters) or full (DreamBooth-style UNet).")
    ] = D.method,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = D.rank,
    alpha: Annotated[
        float | None, typer.Option("--alpha", show_default=False, help="LoRA alpha (default: = rank).")
    ] = D.alpha,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", help="LoRA dropout.")] = D.lora_dropout,
    target_modules: Annotated[
        list[str] | None,
        typer.Option(
            "--target-modules",
            show_default=False,
            help="UNet modules given LoRA (default to_q to_k to_v to_out.0); repeatable.",
        ),
    ] = None,
    train_text_encoder: Annotated[
        bool,
        typer.Option("--train-text-encoder", help="Also train the text encoder (its own LoRA, or fully)."),
    ] = D.train_text_encoder,
    class_data: Annotated[
        str | None,
        typer.Option(
            "--class-data", show_default=False, help="Folder of class images for prior preservation."
        ),
    ] = D.class_data,
    class_prompt: Annotated[
        str | None, typer.Option("--class-prompt", show_default=False, help="Prompt of the class images.")
    ] = D.class_prompt,
    prior_loss_weight: Annotated[
        float, typer.Option("--prior-loss-weight", help="Weight of the prior-preservation loss.")
    ] = D.prior_loss_weight,
    # optimisation
    resolution: Annotated[
        int, typer.Option("--resolution", "-r", help="Training resolution.")
    ] = D.resolution,
    center_crop: Annotated[
        bool, typer.Option("--center-crop/--random-crop", help="Centre or random square crop.")
    ] = D.center_crop,
    random_flip: Annotated[
        bool, typer.Option("--random-flip", help="Mirror half the images (moves a chest X-ray's heart!).")
    ] = D.random_flip,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Examples per device per micro-batch.")
    ] = D.batch_size,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")
    ] = D.grad_accum,
    lr: Annotated[
        float | None,
        typer.Option("--lr", show_default=False, help="Learning rate (default 1e-4 LoRA, 5e-5 full)."),
    ] = D.lr,
    lr_scheduler: Annotated[
        str, typer.Option("--lr-scheduler", help="constant, cosine, linear, constant_with_warmup.")
    ] = D.lr_scheduler,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="LR warm-up steps.")] = D.warmup_steps,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps", show_default=False, help="Optimizer steps (default 1000 unless --epochs)."
        ),
    ] = D.max_steps,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", show_default=False, help="Passes over the data instead of --max-steps."),
    ] = D.epochs,
    mixed_precision: Annotated[
        str, typer.Option("--mixed-precision", help="no, fp16 (GPU), bf16.")
    ] = D.mixed_precision,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")
    ] = D.gradient_checkpointing,
    snr_gamma: Annotated[
        float | None,
        typer.Option("--snr-gamma", show_default=False, help="Min-SNR loss weighting (5 is typical)."),
    ] = D.snr_gamma,
    noise_offset: Annotated[
        float, typer.Option("--noise-offset", help="Offset noise strength.")
    ] = D.noise_offset,
    cache_latents: Annotated[
        bool, typer.Option("--cache-latents", help="Encode each image once through the VAE.")
    ] = D.cache_latents,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="Gradient clipping.")
    ] = D.max_grad_norm,
    num_workers: Annotated[
        int, typer.Option("--num-workers", help="Data-loading worker processes.")
    ] = D.num_workers,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of data order, augmentation, noise and LoRA init.")
    ] = D.seed,
    # checkpoints and validation
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = D.checkpoint_every,
    keep_checkpoints: Annotated[
        int, typer.Option("--keep-checkpoints", help="Newest checkpoints kept.")
    ] = D.keep_checkpoints,
    validation_prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--validation-prompt", show_default=False, help="Prompt sampled during training; repeatable."
        ),
    ] = None,
    validation_every: Annotated[
        int | None,
        typer.Option("--validation-every", show_default=False, help="Steps between validation samples."),
    ] = D.validation_every,
    validation_image: Annotated[
        str | None,
        typer.Option(
            "--validation-image", show_default=False, help="Image for a short PIE progression at validation."
        ),
    ] = D.validation_image,
    validation_mask: Annotated[
        str | None, typer.Option("--validation-mask", show_default=False, help="Its mask.")
    ] = D.validation_mask,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle", help="Also load a base model's .bin/.ckpt pickle weights (trusted files only)."
        ),
    ] = D.allow_pickle,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune Stable Diffusion on report-image pairs: LoRA adapters or the full UNet, on accelerate."""
    values = dict(locals())
    flags: dict[str, Any] = {name: values[name] for name in OPTION_NAMES}
    for name in ("target_modules", "validation_prompt"):
        flags[name] = tuple(flags[name]) if flags[name] is not None else getattr(D, name)
    explicit = {name for name in OPTION_NAMES if _given(ctx, name)}
    run(flags, explicit, config, resume, dry_run, overwrite)


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _resolve_resume(resume: str, out: Path | None) -> tuple[Path, Path]:
    """(checkpoint folder, run directory) for --resume latest|PATH: always a complete checkpoint."""
    from pie_cli.training.loop import (
        COMPLETE,
        checkpoint_step,
        incomplete_checkpoints,
        is_complete,
        latest_checkpoint,
    )

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
            info(f"skipping {broken}: an incomplete checkpoint (the run stopped while saving it).")
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


def run(
    flags: dict[str, Any],
    explicit: set[str],
    config: Path | None,
    resume: str | None,
    dry_run: bool,
    overwrite: bool,
) -> None:
    from pie_cli.training.data import check_images, class_records, load_data

    # 1. Configuration: flags > --config > saved run (when resuming) > defaults; checked before anything else.
    recipe = read_yaml(config) if config is not None else {}
    out_hint = flags["out"] if "out" in explicit else recipe.get("out")
    checkpoint = None
    saved: dict[str, Any] = {}
    if resume:
        checkpoint, run_dir = _resolve_resume(resume, Path(out_hint) if out_hint else None)
        if (run_dir / CONFIG_FILE).is_file():
            saved = read_yaml(run_dir / CONFIG_FILE, "saved config")
        flags = {**flags, "out": str(run_dir)}
        explicit = explicit | {"out"}
    spec = merge(flags, explicit, recipe, saved)
    spec.check()
    out = Path(spec.out)
    if spec.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU.")

    # 2. Inputs, cheaply: output directory, model, data, images.
    if not resume and not dry_run:
        _check_out(out, overwrite)
    from pie_cli.core.registry import resolve

    source = resolve(spec.model)
    if source.loras:
        raise UserError(f"--model {spec.model} carries LoRA adapters; fine-tune from its base model instead.")
    from pie_cli.core.loading import require_safetensors

    for part in ("unet", "vae", "text_encoder"):  # pickle-only weights refused before anything is written
        folder = (source.unet or source.path / "unet") if part == "unet" else source.path / part
        require_safetensors(folder, f"model {source.reference}: {part}", allow_pickle=spec.allow_pickle)
    data = load_data(spec)
    prior = class_records(spec) if spec.class_data else None
    if spec.validation_image:
        from pie_cli.imaging.masks import prepare_mask, require_nonempty
        from pie_cli.imaging.media import open_image

        image = open_image(Path(spec.validation_image), "--validation-image")
        raw = open_image(Path(spec.validation_mask or ""), "--validation-mask")
        mask = prepare_mask(raw, image.size, spec.resolution, f"--validation-mask {spec.validation_mask}")
        require_nonempty(mask, raw, spec.resolution, f"--validation-mask {spec.validation_mask}")
    if dry_run:
        _print_dry_run(spec, data, prior)
        return
    from pie_cli.cli.display import ProgressDisplay
    from pie_cli.core.distributed import process_state

    main = process_state().is_main_process
    if not main:  # under torchrun / accelerate launch only the main process talks
        ui.quiet = True
    with ProgressDisplay(ui.progress) as display:
        with display.status(f"checking {len(data.records)} images"):
            check_images(data)
            if prior:
                from pie_cli.training.data import TrainingData

                check_images(TrainingData(prior, "folder", spec.class_data or ""))
        trained = _train(spec, source, data, prior, out, display, checkpoint, overwrite)
    if main:
        info(
            f"finetune: {trained.steps} steps in {trained.seconds:.1f} s, last loss {trained.last_loss} -> {trained.weights}"
        )
        result(str(trained.weights))


def _warn_defaults(spec: TrainSpec) -> None:
    """Name the training values that fell back to built-in defaults (after all checks passed)."""
    defaulted = [
        f"{n}={getattr(spec, n)}"
        for n in ("method", "batch_size", "resolution", "lr_scheduler")
        if spec.sources.get(n) == "default"
    ]
    if spec.sources.get("lr") == "default":
        defaulted.append(f"lr={spec.learning_rate:g}")
    if spec.max_steps is None and spec.epochs is None:
        defaulted.append("max_steps=1000")
    if defaulted:
        warn("using defaults for " + ", ".join(defaulted) + " (set them with flags or --config).")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"--out {out} is not empty; continue it with --resume latest, start over with --overwrite, "
            "or choose another directory."
        )
    from pie_cli.runs.writer import check_creatable

    check_creatable(out)


def _print_dry_run(spec: TrainSpec, data: Any, prior: Any) -> None:
    skipped = f", {data.skipped} left out by --view {spec.view}" if data.skipped else ""
    result(f"{len(data.records)} examples ({data.format}: {data.source}{skipped})")
    for record in data.records[:5]:
        result(f"  {record.where}: {record.prompt}")
    if prior:
        result(f"{len(prior)} class images for prior preservation: {spec.class_prompt}")


def _train(
    spec: TrainSpec,
    source: Any,
    data: Any,
    prior: Any,
    out: Path,
    display: Any,
    checkpoint: Path | None,
    overwrite: bool,
):
    from pie_cli.core.distributed import process_state
    from pie_cli.core.loading import quiet_libraries
    from pie_cli.imaging.media import write_text
    from pie_cli.training.loop import SUMMARY, Trainer, remove_leftovers

    main = process_state().is_main_process
    if not main:
        display.mode = "off"
    created = not out.exists()
    if main:
        if overwrite and checkpoint is None and out.is_dir():
            for name in RUN_ENTRIES:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)  # temporary files and half-saved checkpoints of a killed run
        try:
            write_yaml(spec, out / CONFIG_FILE)
        except OSError:  # a full disk before anything useful exists: leave nothing behind
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
    summary: dict[str, Any] = {
        "pie_version": __version__,
        "argv": sys.argv[1:],
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": source.describe(),
        "data": {"format": data.format, "source": data.source, "examples": len(data.records)},
        "resumed_from": str(checkpoint) if checkpoint else None,
        "sources": spec.sources,
    }

    def save_summary(**extra: Any) -> None:
        if main:
            summary.update(extra)
            write_text(out / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")

    try:
        save_summary()
    except OSError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    _warn_defaults(spec)
    trainer = Trainer(spec, source, data, prior, out, display, info)
    try:
        with trainer.signals, quiet_libraries(ui.debug):  # SIGINT/SIGTERM: stop at a step, checkpointed
            with display.status(f"loading {spec.model}"):
                trainer.setup()
            trained = trainer.run(checkpoint)
    except KeyboardInterrupt as exc:
        _interrupted(exc, trainer, out, main, save_summary)
        raise Interrupted("interrupted.") from None
    except Exception as exc:
        save_summary(
            status="failed",
            error=f"{type(exc).__name__}: {exc}",
            step=trainer.state.step if hasattr(trainer, "state") else 0,
        )
        raise
    save_summary(
        status="complete",
        step=trained.steps,
        seconds=round(trained.seconds, 3),
        last_loss=trained.last_loss,
        weights=str(trained.weights),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return trained


def _interrupted(exc: KeyboardInterrupt, trainer: Any, out: Path, main: bool, save_summary: Any) -> None:
    """Record and explain an interrupt: where training stopped and how to continue it."""
    import signal

    from pie_cli.training.loop import TrainingInterrupted, latest_checkpoint

    step = trainer.state.step if hasattr(trainer, "state") else 0
    total = getattr(trainer, "total_steps", None)
    signum = trainer.signals.received
    by = signal.Signals(signum).name if signum else None
    at = f"step {step}" + (f" of {total}" if total else "")
    how = f" by {by}" if by else ""
    checkpoint = latest_checkpoint(out)
    save_summary(
        status="interrupted",
        step=step,
        signal=by,
        checkpoint=str(checkpoint) if checkpoint else None,
    )
    if not main:
        return
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
    raise Interrupted(note) from None
