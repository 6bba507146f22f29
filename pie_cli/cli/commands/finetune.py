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
            help="Image folder with metadata.jsonl/.csv, a CSV/JSONL file, a dataset root (CheXpert, HAM10000, EyePACS) or a Hugging Face dataset in the local cache.",
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
        str, typer.Option("--data-format", help=", ".join(DATA_FORMATS) + ".")
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
        str, typer.Option("--view", help="CheXpert views: frontal, lateral, all.")
    ] = DEFAULTS.view,
    uncertain: Annotated[
        str, typer.Option("--uncertain", help="CheXpert uncertain (-1) labels count as negative or positive.")
    ] = DEFAULTS.uncertain,
    split: Annotated[str, typer.Option("--split", help="Split of a Hugging Face dataset.")] = DEFAULTS.split,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", show_default=False, help="Use only the first N examples.")
    ] = DEFAULTS.max_samples,
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
            "crop), 'pad' (the whole image letterboxed on R x R), 'native' (whole, its own aspect; --batch-size 1).",
        ),
    ] = DEFAULTS.fit,
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
        _print_dry_run(plan)
        return
    main = runner.is_main_process()
    if not main:  # under torchrun / accelerate launch only the main process talks
        ui.quiet = True
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


def _print_dry_run(plan: Any) -> None:
    """The dataset size and its first prompts, on stdout."""
    from pie_cli.cli.console import result

    data, prior, spec = plan.data, plan.prior, plan.spec
    skipped = f", {data.skipped} left out by --view {spec.view}" if data.skipped else ""
    result(f"{len(data.records)} examples ({data.format}: {data.source}{skipped})")
    for record in data.records[:5]:
        result(f"  {record.where}: {record.prompt}")
    if prior:
        result(f"{len(prior)} class images for prior preservation: {spec.class_prompt}")
