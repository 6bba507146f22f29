"""`pie finetune`: options (+ --config recipe) -> the training service (plan, then train) -> the weights on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pie_cli.cli.options import (
    AllowPickleOpt,
    DebugOpt,
    ModelConfigOpt,
    ModelOpt,
    OutDirOpt,
    TrainingResolutionOpt,
    TrainingSeedOpt,
)
from pie_cli.training.config import DATA_FORMATS, OPTION_NAMES, TrainSpec

DEFAULTS = TrainSpec()  # defaults shown in --help come from the one place they are defined


def finetune(
    ctx: typer.Context,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Image folder with metadata.jsonl/.csv, a CSV/JSONL file, a dataset root (CheXpert, MIMIC-CXR-JPG, HAM10000, EyePACS) or a Hugging Face dataset in the local cache.",
            show_default=False,
        ),
    ] = DEFAULTS.data,
    model: ModelOpt = DEFAULTS.model,
    model_config: ModelConfigOpt = DEFAULTS.model_config,
    out: OutDirOpt = DEFAULTS.out,
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
        bool,
        typer.Option(
            "--dry-run",
            help="Check everything and print the effective configuration (each value and where it came "
            "from), the data, the schedule, the trainable parameters and a one-step probe's time and "
            "memory estimate; writes nothing.",
        ),
    ] = False,
    probe: Annotated[
        bool,
        typer.Option(
            "--probe/--no-probe",
            help="With --dry-run: load the model and time one real optimizer step (in a scratch folder).",
        ),
    ] = True,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Start over in a non-empty --out (removes pie's training files there)."
        ),
    ] = False,
    # data
    data_format: Annotated[
        str,
        typer.Option(
            "--data-format",
            help=", ".join(DATA_FORMATS)
            + " (mimic-cxr: a MIMIC-CXR-JPG root, mimic-cxr-2.0.0-metadata/split/chexpert.csv[.gz] + files/).",
        ),
    ] = DEFAULTS.data_format,
    image_column: Annotated[
        str | None,
        typer.Option(
            "--image-column",
            show_default=False,
            help="Image path column (default: file_name, image, path...).",
        ),
    ] = DEFAULTS.image_column,
    caption_column: Annotated[
        str | None,
        typer.Option(
            "--caption-column", show_default=False, help="Text column (default: text, caption, report...)."
        ),
    ] = DEFAULTS.caption_column,
    mask_column: Annotated[
        str | None,
        typer.Option(
            "--mask-column",
            show_default=False,
            help="Mask path column for --loss-mask data (default: mask, mask_file, mask_path).",
        ),
    ] = DEFAULTS.mask_column,
    prompt_template: Annotated[
        str,
        typer.Option("--prompt-template", help="Prompt from {instance}, {labels}, {caption} or any column."),
    ] = DEFAULTS.prompt_template,
    instance_prompt: Annotated[
        str | None,
        typer.Option(
            "--instance-prompt",
            show_default=False,
            help='e.g. "A chest X-ray image" (the default for chexpert).',
        ),
    ] = DEFAULTS.instance_prompt,
    view: Annotated[
        str,
        typer.Option(
            "--view", help="CheXpert / MIMIC-CXR views: frontal (MIMIC: PA, AP), lateral (LATERAL, LL), all."
        ),
    ] = DEFAULTS.view,
    uncertain: Annotated[
        str, typer.Option("--uncertain", help="CheXpert uncertain (-1) labels count as negative or positive.")
    ] = DEFAULTS.uncertain,
    split: Annotated[
        str,
        typer.Option(
            "--split", help="Split of a Hugging Face dataset, or MIMIC-CXR's train, validate, test."
        ),
    ] = DEFAULTS.split,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", show_default=False, help="Use only the first N examples.")
    ] = DEFAULTS.max_samples,
    report_section: Annotated[
        str,
        typer.Option(
            "--report-section",
            metavar="impression|findings|both|labels",
            help="MIMIC-CXR prompt: that section of each study's report (both: findings then impression; a "
            "missing one falls back to the other, then to the labels) or the CheXpert labels as for chexpert.",
        ),
    ] = DEFAULTS.report_section,
    reports: Annotated[
        str | None,
        typer.Option(
            "--reports",
            metavar="DIR",
            show_default=False,
            help="MIMIC-CXR: the unpacked reports (DIR/files/pNN/pSUBJECT/sSTUDY.txt or DIR/pNN/...); "
            "default: beside the images under DATA/files.",
        ),
    ] = DEFAULTS.reports,
    # method
    method: Annotated[
        str, typer.Option("--method", help="lora (peft adapters) or full (DreamBooth-style UNet).")
    ] = DEFAULTS.method,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank.")] = DEFAULTS.rank,
    alpha: Annotated[
        float | None, typer.Option("--alpha", show_default=False, help="LoRA alpha (default: = rank).")
    ] = DEFAULTS.alpha,
    lora_dropout: Annotated[
        float, typer.Option("--lora-dropout", help="LoRA dropout.")
    ] = DEFAULTS.lora_dropout,
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
    ] = DEFAULTS.train_text_encoder,
    class_data: Annotated[
        str | None,
        typer.Option(
            "--class-data", show_default=False, help="Folder of class images for prior preservation."
        ),
    ] = DEFAULTS.class_data,
    class_prompt: Annotated[
        str | None, typer.Option("--class-prompt", show_default=False, help="Prompt of the class images.")
    ] = DEFAULTS.class_prompt,
    prior_loss_weight: Annotated[
        float, typer.Option("--prior-loss-weight", help="Weight of the prior-preservation loss.")
    ] = DEFAULTS.prior_loss_weight,
    # optimisation
    resolution: TrainingResolutionOpt = DEFAULTS.resolution,
    fit: Annotated[
        str,
        typer.Option(
            "--fit",
            metavar="crop|pad|native",
            help="How each image becomes an example, as `pie simulate --fit`: 'crop' (short side to R, square "
            "crop), 'pad' (the whole image letterboxed on R x R), 'native' (whole, its own aspect; --batch-size 1 unless --buckets).",
        ),
    ] = DEFAULTS.fit,
    buckets: Annotated[
        bool,
        typer.Option(
            "--buckets",
            help="With --fit native: batches of similar aspect, each image covering the bucket canvas nearest "
            "its own (short side R, long side a multiple of --bucket-step; trims at most step/2 px), so "
            "--batch-size can exceed 1.",
        ),
    ] = DEFAULTS.buckets,
    bucket_step: Annotated[
        int,
        typer.Option(
            "--bucket-step", help="--buckets' long sides are multiples of this (8 = --fit native's)."
        ),
    ] = DEFAULTS.bucket_step,
    loss_mask: Annotated[
        str | None,
        typer.Option(
            "--loss-mask",
            metavar="data|lungs",
            show_default=False,
            help="Weight the loss by each image's mask: 'data' (a mask column of the table, see --mask-column) "
            "or 'lungs' (the lung heuristic of `pie mask --auto lungs`; full weight where it finds none).",
        ),
    ] = DEFAULTS.loss_mask,
    center_crop: Annotated[
        bool, typer.Option("--center-crop/--random-crop", help="Centre or random square crop.")
    ] = DEFAULTS.center_crop,
    random_flip: Annotated[
        bool, typer.Option("--random-flip", help="Mirror half the images (moves a chest X-ray's heart!).")
    ] = DEFAULTS.random_flip,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Examples per device per micro-batch.")
    ] = DEFAULTS.batch_size,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")
    ] = DEFAULTS.grad_accum,
    lr: Annotated[
        float | None,
        typer.Option("--lr", show_default=False, help="Learning rate (default 1e-4 LoRA, 5e-5 full)."),
    ] = DEFAULTS.lr,
    lr_scheduler: Annotated[
        str, typer.Option("--lr-scheduler", help="constant, cosine, linear, constant_with_warmup.")
    ] = DEFAULTS.lr_scheduler,
    warmup_steps: Annotated[
        int, typer.Option("--warmup-steps", help="LR warm-up steps.")
    ] = DEFAULTS.warmup_steps,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps", show_default=False, help="Optimizer steps (default 1000 unless --epochs)."
        ),
    ] = DEFAULTS.max_steps,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", show_default=False, help="Passes over the data instead of --max-steps."),
    ] = DEFAULTS.epochs,
    mixed_precision: Annotated[
        str,
        typer.Option(
            "--mixed-precision",
            help="no, fp16 (GPU), bf16. Default: what `accelerate launch --mixed_precision` or its config says "
            "($ACCELERATE_MIXED_PRECISION), else no; the value used and its source are recorded.",
        ),
    ] = DEFAULTS.mixed_precision,
    gradient_checkpointing: Annotated[
        bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")
    ] = DEFAULTS.gradient_checkpointing,
    snr_gamma: Annotated[
        float | None,
        typer.Option("--snr-gamma", show_default=False, help="Min-SNR loss weighting (5 is typical)."),
    ] = DEFAULTS.snr_gamma,
    noise_offset: Annotated[
        float, typer.Option("--noise-offset", help="Offset noise strength.")
    ] = DEFAULTS.noise_offset,
    caption_dropout: Annotated[
        float,
        typer.Option(
            "--caption-dropout",
            metavar="P",
            help="Train on the empty prompt with probability P per example (seeded), so classifier-free "
            "guidance's unconditional branch learns the medical domain too; 0.1 is typical.",
        ),
    ] = DEFAULTS.caption_dropout,
    cache_latents: Annotated[
        bool, typer.Option("--cache-latents", help="Encode each image once through the VAE.")
    ] = DEFAULTS.cache_latents,
    use_ema: Annotated[
        bool,
        typer.Option(
            "--use-ema",
            help="Keep an exponential moving average of the trained weights; validation and the saved "
            "weights use it (mostly for --method full).",
        ),
    ] = DEFAULTS.use_ema,
    ema_decay: Annotated[
        float,
        typer.Option("--ema-decay", help="EMA decay cap (warms up as (1+step)/(10+step)); with --use-ema."),
    ] = DEFAULTS.ema_decay,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="Gradient clipping.")
    ] = DEFAULTS.max_grad_norm,
    num_workers: Annotated[
        int, typer.Option("--num-workers", help="Data-loading worker processes.")
    ] = DEFAULTS.num_workers,
    seed: TrainingSeedOpt = DEFAULTS.seed,
    # checkpoints and validation
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")
    ] = DEFAULTS.checkpoint_every,
    keep_checkpoints: Annotated[
        int, typer.Option("--keep-checkpoints", help="Newest checkpoints kept.")
    ] = DEFAULTS.keep_checkpoints,
    validation_prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--validation-prompt", show_default=False, help="Prompt sampled during training; repeatable."
        ),
    ] = None,
    validation_every: Annotated[
        int | None,
        typer.Option("--validation-every", show_default=False, help="Steps between validation samples."),
    ] = DEFAULTS.validation_every,
    validation_image: Annotated[
        str | None,
        typer.Option(
            "--validation-image", show_default=False, help="Image for a short PIE progression at validation."
        ),
    ] = DEFAULTS.validation_image,
    validation_mask: Annotated[
        str | None, typer.Option("--validation-mask", show_default=False, help="Its mask.")
    ] = DEFAULTS.validation_mask,
    validation_split: Annotated[
        float,
        typer.Option(
            "--validation-split",
            metavar="F",
            help="Hold out this fraction of the examples (chosen by --seed) and log their denoising loss at "
            "fixed timesteps and noise to metrics.csv (val_loss); the best checkpoint is kept and named in "
            "training_summary.json. 0.05-0.1 is typical.",
        ),
    ] = DEFAULTS.validation_split,
    validation_loss_every: Annotated[
        int | None,
        typer.Option(
            "--validation-loss-every",
            show_default=False,
            help="Steps between held-out losses (default: at every checkpoint and the last step).",
        ),
    ] = DEFAULTS.validation_loss_every,
    report_to: Annotated[
        str,
        typer.Option(
            "--report-to",
            metavar="none|tensorboard|wandb",
            help="Also log loss, lr and val_loss to TensorBoard (DIR/logs) or Weights & Biases "
            "(needs the package: pip install tensorboard / wandb; WANDB_MODE=offline works).",
        ),
    ] = DEFAULTS.report_to,
    allow_pickle: AllowPickleOpt = DEFAULTS.allow_pickle,
    allow_schedule_change: Annotated[
        bool,
        typer.Option(
            "--allow-schedule-change",
            help="With --resume: accept another --max-steps, --epochs, warmup, scheduler or batch shape "
            "(the LR schedule then changes from the checkpoint on).",
        ),
    ] = DEFAULTS.allow_schedule_change,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune Stable Diffusion on report-image pairs: LoRA adapters or the full UNet, on accelerate."""
    from pie_cli.cli.console import info, result, ui
    from pie_cli.cli.display import ProgressDisplay
    from pie_cli.training import runner

    values = dict(locals())
    flags: dict[str, Any] = {name: values[name] for name in OPTION_NAMES}
    for name in ("target_modules", "validation_prompt"):
        flags[name] = tuple(flags[name]) if flags[name] is not None else getattr(DEFAULTS, name)
    explicit = {name: how for name in OPTION_NAMES if (how := _given(ctx, name)) is not None}
    with ProgressDisplay() as display:
        plan = runner.plan(
            flags, explicit, config, resume, check_out=not dry_run, overwrite=overwrite, reporter=display
        )
    if dry_run:
        with ProgressDisplay() as display:
            estimate = runner.dry_run(plan, probe=probe, reporter=display)
        _print_dry_run(plan, estimate)
        return
    main = runner.is_main_process()
    if not main:  # under torchrun / accelerate launch only the main process talks
        ui.quiet = True
    for note in plan.data.notes:  # what the data format says about the prompts
        info(f"finetune: {note}")
    with ProgressDisplay(None if main else "off") as display:
        trained = runner.train(plan, display)
    if main:
        info(
            f"finetune: {trained.steps} steps in {trained.seconds:.1f} s, last loss {trained.last_loss} -> {trained.weights}"
        )
        result(str(trained.weights))


def _given(ctx: typer.Context, name: str) -> str | None:
    """Where an option's value came from when the user gave it (command line, environment), else None."""
    source = ctx.get_parameter_source(name)
    if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
        return None
    if source.name == "ENVIRONMENT":
        envvar = next((p.envvar for p in ctx.command.params if p.name == name), None)
        return f"environment (${envvar})" if isinstance(envvar, str) else "environment"
    return "command line"


def _print_dry_run(plan: Any, estimate: Any) -> None:
    """The effective configuration, the data and its first prompts, the schedule and the probe, on stdout."""
    from pie_cli.cli.console import result

    data, prior, spec = plan.data, plan.prior, plan.spec
    skipped = f", {data.skipped} left out by --view {spec.view}" if data.skipped else ""
    held = f", {len(plan.heldout)} more held out by --validation-split" if plan.heldout else ""
    result(f"{len(data.records)} examples ({data.format}: {data.source}{skipped}{held})")
    for record in data.records[:5]:
        result(f"  {record.where}: {record.prompt}")
    for note in data.notes:  # e.g. MIMIC-CXR's prompt fallbacks
        result(f"note: {note}")
    if prior:
        result(f"{len(prior)} class images for prior preservation: {spec.class_prompt}")
    if spec.buckets:  # from the image headers
        from pie_cli.training.buckets import bucket_summary

        result(f"buckets: {bucket_summary(data, spec)}")
    result("effective configuration (value, and where it came from):")
    values = spec.to_yaml_dict()
    width = max(len(name) for name in values)
    for name, value in values.items():
        source = spec.sources.get(name, "default")
        if name in ("lr", "alpha", "max_steps") and getattr(spec, name) is None:
            source = "default (derived)"
        result(f"  {name:<{width}}  {value!s:<24}  {source}")
    per_epoch, total, epochs = estimate.steps_per_epoch, estimate.total_steps, estimate.epochs
    effective = spec.batch_size * spec.grad_accum
    result(
        f"schedule: {total} optimizer steps of {effective} examples (batch {spec.batch_size} x grad-accum "
        f"{spec.grad_accum}); {per_epoch} steps per epoch, so {epochs:.3g} epochs (one process; under a "
        "launcher each step takes a batch on every process)"
    )
    if estimate.trainable is None:
        result("probe: skipped (--no-probe)")
        return
    share = 100 * estimate.trainable / max(1, estimate.parameters)
    result(
        f"trainable parameters: {estimate.trainable:,} of {estimate.parameters:,} ({share:.2f} %; {spec.method})"
    )
    eta = estimate.step_seconds * total
    result(
        f"probe on {estimate.device} ({estimate.probe_examples} examples): {estimate.step_seconds:.3g} s per "
        f"optimizer step, so about {_duration(eta)} for {total} steps (checkpoints and validation not "
        f"included); {estimate.memory_kind} {estimate.peak_memory / 2**30:.2f} GiB"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
