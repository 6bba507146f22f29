"""`pie simulate`: options -> SimulateSpec -> the simulate service -> the run directory on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pie_cli.cli.options import (
    FIT_HELP,
    AllowPickleOpt,
    DebugOpt,
    DeviceOpt,
    Dtype,
    ModelConfigOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    ResolutionOpt,
    SchedulerName,
    SeedOpt,
    WatermarkOpt,
)
from pie_cli.core.parameters import DEFAULTS, TUNABLE


def simulate(
    ctx: typer.Context,
    image: Annotated[
        Path | None,
        typer.Argument(
            help="Input image: PNG, JPEG, TIFF, BMP, WebP (8- or 16-bit) or DICOM. Not with --cohort.",
            metavar="IMAGE",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt", "-p", help="Clinical report text describing the finding.", show_default=False
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(
            "--mask",
            help="Edit mask (white = may change, grey = partly): the image's size, or the frames' size "
            "(R x R with --fit crop; as `pie mask --fit` writes it).",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = "sd-v1-5",
    model_config: ModelConfigOpt = None,
    out: OutOpt = None,
    steps: Annotated[
        int, typer.Option("--steps", "-n", help="Progression steps N (frames after frame 0).")
    ] = DEFAULTS.steps,
    strength: Annotated[
        float, typer.Option("--strength", "-g", help="Fraction of the schedule re-run per step, in (0, 1].")
    ] = DEFAULTS.strength,
    guidance_scale: Annotated[
        float,
        typer.Option(
            "--guidance-scale",
            "-w",
            help="Classifier-free guidance scale. 1 or 0: one UNet branch, half the work, same frames; "
            "between 0 and 1 both branches run, as the formula needs (diffusers' no-guidance is -w 1).",
        ),
    ] = DEFAULTS.guidance_scale,
    beta1: Annotated[
        float, typer.Option("--beta1", help="Blend weight outside the mask (0 = keep the input).")
    ] = DEFAULTS.beta1,
    beta2: Annotated[float, typer.Option("--beta2", help="Blend weight inside the mask.")] = DEFAULTS.beta2,
    mask_growth: Annotated[
        str,
        typer.Option(
            "--mask-growth",
            metavar="MODE[:START]",
            help="Let the mask grow over the steps: 'rise' (a level rising from the mask's lowest row, "
            "like fluid filling the lung base) or 'dilate' (outwards from the mask's deepest point), from "
            "START of it at step 1 (default 1/N) to all of it at step N; e.g. rise:0.2. "
            "Default: the whole mask every step.",
            show_default=False,
        ),
    ] = DEFAULTS.mask_growth,
    inference_steps: Annotated[
        int, typer.Option("--inference-steps", "-T", help="Scheduler steps of a full schedule.")
    ] = DEFAULTS.inference_steps,
    scheduler: Annotated[
        SchedulerName, typer.Option("--scheduler", help="Denoising scheduler; 'model' = the model's own.")
    ] = SchedulerName.model,
    negative_prompt: Annotated[
        str, typer.Option("--negative-prompt", help="Text for the unconditional branch of guidance.")
    ] = DEFAULTS.negative_prompt,
    long_prompt: Annotated[
        str,
        typer.Option(
            "--long-prompt",
            metavar="truncate|chunk",
            help="A prompt longer than the text encoder's 77 tokens: 'truncate' reads its first 77 and warns "
            "(the original's); 'chunk' reads all of it, 75 tokens per window, the windows' embeddings "
            "concatenated (the negative prompt and every prompt of a schedule padded to as many windows).",
        ),
    ] = DEFAULTS.long_prompt,
    seed: SeedOpt = 42,
    resolution: ResolutionOpt = DEFAULTS.resolution,
    fit: Annotated[
        str,
        typer.Option(
            "--fit", metavar="crop|pad|native", help=FIT_HELP, rich_help_panel="The patient's own image"
        ),
    ] = DEFAULTS.fit,
    preserve_outside: Annotated[
        bool,
        typer.Option(
            "--preserve-outside",
            rich_help_panel="The patient's own image",
            help="After every step the frame is frame 0 outside the mask and the edit inside, blended across "
            "--preserve-feather: pixels beyond the feather stay the input's bit for bit (the original method "
            "lets the VAE smooth them a little each step).",
        ),
    ] = DEFAULTS.preserve_outside,
    preserve_feather: Annotated[
        int | None,
        typer.Option(
            "--preserve-feather",
            metavar="PX",
            show_default=False,
            rich_help_panel="The patient's own image",
            help="Width of --preserve-outside's blend band beyond the mask, in the frames' pixels "
            "(default: one latent cell, 8 px at the working size; with --full-res, 8 x the window's scale).",
        ),
    ] = DEFAULTS.preserve_feather,
    full_res: Annotated[
        bool,
        typer.Option(
            "--full-res",
            rich_help_panel="The patient's own image",
            help="Frames at the input's own size and depth (8- or 16-bit): a square window around the "
            "mask is edited at R and pasted back; outside it, the input's exact pixels. Needs a --mask of the "
            "image's size; best with --preserve-outside.",
        ),
    ] = False,
    full_res_margin: Annotated[
        int | None,
        typer.Option(
            "--full-res-margin",
            metavar="PX",
            show_default=False,
            rich_help_panel="The patient's own image",
            help="Context around the mask's bounding box in the --full-res window, in image pixels "
            "(default: a quarter of the box's longer side, at least 32).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        Dtype,
        typer.Option(
            "--dtype",
            envvar="PIE_DTYPE",
            help="auto = fp16 on CUDA (VAE kept in fp32 when it would overflow), fp32 elsewhere. "
            "bf16 on the CPU is opt-in: runs take about 0.7x fp32's time on bf16 hardware, VAE kept in fp32, "
            "frames a few grey levels off fp32's.",
        ),
    ] = Dtype.auto,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            metavar="N",
            envvar="PIE_THREADS",
            show_default=False,
            help="CPU intra-op threads (default: torch's, one per core; recorded in the manifest).",
        ),
    ] = None,
    unet: Annotated[
        Path | None,
        typer.Option(
            "--unet",
            help="Fine-tuned UNet in diffusers layout (folder or its parent with unet/).",
            show_default=False,
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="LoRA weights PATH[:WEIGHT] (diffusers format); repeatable.",
            metavar="PATH[:WEIGHT]",
            show_default=False,
        ),
    ] = None,
    gif: Annotated[bool, typer.Option("--gif/--no-gif", help="Also write progression.gif.")] = True,
    trajectories: Annotated[
        int,
        typer.Option(
            "--trajectories", "-k", help="K progressions (seeds seed..seed+K-1) batched; traj_KK/ each."
        ),
    ] = 1,
    prompt_schedule: Annotated[
        Path | None,
        typer.Option(
            "--prompt-schedule",
            metavar="FILE",
            show_default=False,
            help="One prompt per step, or 'step: prompt' lines (held until the next).",
        ),
    ] = None,
    strength_schedule: Annotated[
        str | None,
        typer.Option(
            "--strength-schedule",
            metavar="LIST|START:END",
            show_default=False,
            help="Strength per step: comma list or linear ramp.",
        ),
    ] = None,
    guidance_schedule: Annotated[
        str | None,
        typer.Option(
            "--guidance-schedule",
            metavar="LIST|START:END",
            show_default=False,
            help="Guidance scale per step: comma list or linear ramp.",
        ),
    ] = None,
    beta2_schedule: Annotated[
        str | None,
        typer.Option(
            "--beta2-schedule",
            metavar="LIST|START:END",
            show_default=False,
            help="Blend weight b2 inside the mask per step (how much of each step's edit is kept), "
            "e.g. 0.2:0.9 for a finding that grows; comma list or linear ramp. Default: --beta2 every step.",
        ),
    ] = None,
    pace: Annotated[
        str | None,
        typer.Option(
            "--pace",
            metavar="linear[:END]|LIST|START:END",
            show_default=False,
            rich_help_panel="Closed-loop pace",
            help="Steer the finding's growth: each step tries the --pace-candidates blend weights (one "
            "denoising, several decodes) and keeps the frame whose --classifier score is nearest the "
            "curve. 'linear' = a straight line from frame 0's score to 1 (severity grade 3 for the demo "
            "classifier), 'linear:0.67' ends at grade 2; or the score per step as a list or ramp. Needs --mask.",
        ),
    ] = None,
    classifier: Annotated[
        str | None,
        typer.Option(
            "--classifier",
            metavar="REF",
            show_default=False,
            rich_help_panel="Closed-loop pace",
            help="What --pace follows: 'demo', xrv:NAME@WEIGHTS (torchxrayvision, with --allow-pickle), "
            "a Hugging Face image-classification folder, or a TorchScript / .pt2 file (as for `pie evaluate`).",
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "--target-label",
            metavar="LABEL",
            show_default=False,
            rich_help_panel="Closed-loop pace",
            help="The classifier label --pace follows (its severity where graded). Default: the label "
            "the prompt names.",
        ),
    ] = None,
    pace_candidates: Annotated[
        str | None,
        typer.Option(
            "--pace-candidates",
            metavar="LIST|START:END",
            show_default=False,
            rich_help_panel="Closed-loop pace",
            help="Blend weights b2 a paced step tries: a comma list, or START:END (21 values). Default 0:1.",
        ),
    ] = None,
    cohort: Annotated[
        Path | None,
        typer.Option(
            "--cohort",
            metavar="CSV",
            show_default=False,
            help="Cases (image, mask, prompt, seed, out, any option as a column): one run per case under --out.",
        ),
    ] = None,
    compile_unet: Annotated[
        bool,
        typer.Option(
            "--compile", help="torch.compile the UNet on CUDA (slow start, faster steps); not on the CPU."
        ),
    ] = False,
    watermark: WatermarkOpt = False,
    allow_pickle: AllowPickleOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the interrupted or killed run in --out where it stopped (bit-identical on CPU).",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Simulate disease progression: frames in which the finding of PROMPT appears and grows inside MASK.

    Examples:

    \b
      pie simulate cxr.png --mask lung.png -p "large left pleural effusion" --out runs/cxr
      pie simulate cxr.png --mask lung.png -p "large left pleural effusion" --beta2-schedule 0.1:0.9
      pie simulate cxr.png --mask lung.png -p "large left pleural effusion" --pace linear --classifier demo
      pie simulate cxr.png --mask lung.png -p "..." -k 8 --out runs/k8     # 8 trajectories, batched
      pie simulate film.dcm --mask lung.png -p "..." --full-res --preserve-outside   # the film's own pixels
      pie simulate --cohort cases.csv --out runs/cohort                    # one run per row
      pie simulate --resume --out runs/cxr                                 # go on after an interruption
    """
    from pie_cli.cli.console import info, result, ui
    from pie_cli.cli.display import ProgressDisplay
    from pie_cli.core.parameters import PieConfig
    from pie_cli.errors import PieError, UserError
    from pie_cli.simulate.spec import SimulateSpec

    given = locals()
    spec = SimulateSpec(
        image=image,
        prompt=prompt,
        mask=mask,
        model=model,
        model_config=model_config,
        out=out if out is not None else _default_out(image if image is not None else cohort),
        params=PieConfig(prompt="", **{name: given[name] for name in TUNABLE}),
        scheduler=scheduler.value,
        seed=seed,
        device=device,
        dtype=dtype.value,
        unet=unet,
        lora=tuple(lora or ()),
        gif=gif,
        overwrite=overwrite,
        trajectories=trajectories,
        prompt_schedule=prompt_schedule,
        strength_schedule=strength_schedule,
        guidance_schedule=guidance_schedule,
        beta2_schedule=beta2_schedule,
        compile=compile_unet,
        threads=threads,
        watermark=watermark,
        allow_pickle=allow_pickle,
        pace=pace,
        classifier=classifier,
        target=target,
        pace_candidates=pace_candidates,
        full_res=full_res,
        full_res_margin=full_res_margin,
    )
    from pie_cli.evaluation.scorers import pace_scorer

    if resume:
        if out is None:
            raise UserError("--resume needs --out DIR, the run directory to continue.")
        if cohort is not None or overwrite:
            raise UserError(
                "--resume continues --out DIR with its own settings; drop --cohort and --overwrite "
                "(a cohort goes on when rerun without --resume)."
            )
        from pie_cli.simulate.resume import resume_run

        # Options given again (a requeued SLURM job repeats its command line) must match the run.
        given = {name: value for name, value in spec_values(spec).items() if _given(ctx, name)}
        with ProgressDisplay() as display:
            done = resume_run(out, spec, display, given=given, score_loader=pace_scorer)
        if done.already_complete:
            info(f"{out} is already complete; nothing to resume.")
        else:
            info(f"pie: steps {done.first_step}..{done.steps} in {done.seconds:.1f} s -> {out}")
    elif cohort is not None:
        from pie_cli.evaluation.evaluate import headline
        from pie_cli.simulate.cohort import run_cohort

        with ProgressDisplay() as display:
            done = run_cohort(
                cohort, spec, display, stop_on_error=ui.debug, headline=headline, score_loader=pace_scorer
            )
        info(
            f"cohort: {done.count('complete')} run, {done.count('skipped')} skipped, {done.failures} failed "
            f"-> {done.summary}"
        )
        result(str(done.out))
        if done.failures:
            raise PieError(f"{done.failures} cohort case(s) failed; see {done.summary}.")
        return
    else:
        from pie_cli.simulate.run import run

        with ProgressDisplay() as display:
            done = run(spec, display, score_loader=pace_scorer)
        many = f" x {done.trajectories} trajectories" if done.trajectories > 1 else ""
        info(
            f"pie: {done.steps} progression steps{many} in {done.seconds:.1f} s "
            f"({done.seconds / done.steps:.2f} s/step) -> {done.gif or done.out}"
        )
    result(str(done.out))


def _default_out(name: Path | None) -> Path:
    """``runs/<image stem>-<time>``: a new folder per run when --out is not given."""
    import time

    stem = Path(name).stem if name is not None else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


# Options a resume takes on its own terms (where and how to compute), not as part of the run's identity.
_RESUME_OWN = {
    "out",
    "device",
    "dtype",
    "compile_unet",
    "threads",
    "allow_pickle",
    "resume",
    "overwrite",
    "cohort",
    "debug",
}


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return name not in _RESUME_OWN and source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def spec_values(spec) -> dict:
    """Option name -> the spec's value for it (the names of the command's parameters)."""
    from pie_cli.core.parameters import TUNABLE

    values = {name: getattr(spec.params, name) for name in TUNABLE}
    for name in (
        "image",
        "prompt",
        "mask",
        "model",
        "scheduler",
        "seed",
        "unet",
        "lora",
        "gif",
        "trajectories",
    ):
        values[name] = getattr(spec, name)
    values.update(
        prompt_schedule=spec.prompt_schedule,
        strength_schedule=spec.strength_schedule,
        guidance_schedule=spec.guidance_schedule,
        beta2_schedule=spec.beta2_schedule,
        watermark=spec.watermark,
        pace=spec.pace,
        classifier=spec.classifier,
        target=spec.target,
        pace_candidates=spec.pace_candidates,
        full_res=spec.full_res,
        full_res_margin=spec.full_res_margin,
    )
    return values
