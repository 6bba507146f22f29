"""Running one `pie simulate` case: checked inputs -> model -> K batched trajectories -> run folders.

:func:`prepare_inputs` checks everything cheaply (options, image, mask, adapters, ``--out``,
the model reference) before any model is loaded or file written; :func:`load_model` loads
the model once; :func:`run_case` runs one case into its folders and is shared by fresh,
resumed and cohort runs; :func:`run` is the service behind `pie simulate IMAGE`. Nothing here
prints: progress and notes go to the :class:`~pie_cli.reporting.Reporter` passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pie_cli.core.parameters import PieConfig
from pie_cli.core.registry import Adapter, ModelSource
from pie_cli.errors import Interrupted, UserError
from pie_cli.reporting import SILENT, Reporter
from pie_cli.simulate.spec import SimulateSpec, build_config, pace_plan, recorded_parameters

# (classifier reference, target label or None, prompt, allow pickle) -> (frames -> one score each, a record of what
# is scored). Injected by the CLI (pie_cli.evaluation.scorers.pace_scorer): simulate loads no classifier.
# (The fourth argument is --allow-pickle: a classifier stored as a pickle loads only with it.)
ScoreLoader = Callable[
    [str, "str | None", str, bool], tuple[Callable[[list[Image.Image]], Any], dict[str, Any]]
]


@dataclass(frozen=True)
class Inputs:
    """What a case reads before any model is loaded."""

    config: PieConfig  # as given (recorded); the progression runs ``core_config``
    image: Image.Image  # what the progression edits: the image, or --full-res's window of it
    mask: Image.Image | None  # the prepared mask in the frame geometry (of the window with --full-res)
    source: ModelSource  # the model, with --unet and --lora merged in
    unet: Path | None  # --unet as resolved (recorded, so --resume rebuilds the same model)
    adapters: tuple[Adapter, ...]  # --lora as parsed (likewise)
    full: Any = None  # imaging.compose.FullRes with --full-res
    notes: tuple[str, ...] = ()  # warnings about the inputs (a crop that cuts the film), reported by the run

    @property
    def core_config(self) -> PieConfig:
        """The progression's parameters: with --full-res, the feather in working pixels."""
        if self.full is None or not self.config.preserve_outside:
            return self.config
        from dataclasses import replace

        return replace(self.config, preserve_feather=self.full.working_feather())

    @property
    def saved_mask(self) -> Image.Image | None:
        """The run's mask.png: in the frames' geometry (the original's size with --full-res)."""
        return self.full.mask if self.full is not None else self.mask

    def geometry(self) -> Any:
        from pie_cli.imaging.geometry import fit_geometry

        return fit_geometry(self.image.size, self.config.resolution, self.config.fit)


@dataclass(frozen=True)
class Resume:
    """An interrupted case to continue: where it stopped and its folders' manifests."""

    point: Any  # core.progression.ResumePoint: last whole step, its frames, the generators' states
    manifests: list[dict[str, Any]]  # [top] or [top, traj_00, ...]


@dataclass(frozen=True)
class SimulateResult:
    """What a `pie simulate` service call did."""

    out: Path
    steps: int
    trajectories: int
    seconds: float
    gif: Path | None  # the progression GIF of a single trajectory
    first_step: int = 1  # > 1 when a resumed run continued there
    already_complete: bool = False  # --resume found nothing left to do


def prepare_inputs(spec: SimulateSpec) -> Inputs:
    """Check everything cheaply and read the image and mask; nothing is loaded or created."""
    from pie_cli.core.model_files import resolve_unet_path
    from pie_cli.core.registry import parse_lora, resolve
    from pie_cli.core.single_file import check_source_weights
    from pie_cli.imaging.masks import require_image_size
    from pie_cli.imaging.media import open_image, require_opaque

    config = build_config(spec)
    if spec.image is None:
        raise UserError("give an IMAGE (or --cohort CSV).")
    image = open_image(spec.image, "image")
    require_image_size(image, spec.image)
    require_opaque(image, spec.image)
    raw_mask = open_image(spec.mask, "mask") if spec.mask is not None else None
    image, mask, full, notes = fit_inputs(spec, config, image, raw_mask)
    adapters = tuple(parse_lora(s) for s in spec.lora)
    unet = resolve_unet_path(spec.unet) if spec.unet is not None else None
    source = resolve(spec.model, config=spec.model_config).with_overrides(unet=unet, loras=adapters)
    check_source_weights(source, spec.allow_pickle)  # pickle-only weights refused before anything is loaded
    check_output(spec, source)
    return Inputs(config, image, mask, source, unet, adapters, full, notes)


def fit_inputs(
    spec: SimulateSpec, config: PieConfig, image: Image.Image, raw_mask: Image.Image | None
) -> tuple[Image.Image, Image.Image | None, Any, tuple[str, ...]]:
    """(what the progression edits, its mask in the frame geometry, the --full-res plan, warnings).

    The one place a case's geometry is decided (``--fit``, ``--full-res``), for fresh and resumed runs.
    """
    from pie_cli.imaging.geometry import fit_geometry, fit_problem
    from pie_cli.imaging.masks import crop_warning, mask_to_grey, prepare_mask, require_nonempty

    what = f"image {spec.image}"
    full = None
    if spec.full_res and raw_mask is not None:
        from pie_cli.imaging.compose import plan_full_res

        grey = mask_to_grey(raw_mask, spec.mask)
        if grey.size != image.size:
            (mw, mh), (iw, ih) = grey.size, image.size
            raise UserError(
                f"--full-res needs a mask of the image's own size {iw}x{ih}; mask {spec.mask} is {mw}x{mh} "
                f"(make one with `pie mask IMAGE --full-res ...`)."
            )
        if not (grey.getextrema()[1] > 0):
            raise UserError(f"mask {spec.mask} is empty (no white pixels); white marks the region to edit.")
        full = plan_full_res(
            image,
            grey,
            spec.resolution,
            config.fit,
            spec.full_res_margin,
            config.preserve_feather,
            config.preserve_outside,
        )
        image, raw_mask, what = (
            full.window_image(),
            full.window_mask(),
            f"the --full-res window of {spec.image}",
        )
    problem = fit_problem(image.size, spec.resolution, config.fit)
    if problem is not None:
        raise UserError(f"--fit {problem}.")
    geometry = fit_geometry(image.size, spec.resolution, config.fit)
    mask = None
    if raw_mask is not None:
        mask = prepare_mask(raw_mask, image.size, spec.resolution, spec.mask, fit=config.fit)
        require_nonempty(mask, raw_mask, spec.resolution, spec.mask)
    same_size = raw_mask is not None and raw_mask.size == image.size
    warning = crop_warning(geometry, what, mask_to_grey(raw_mask, spec.mask) if same_size else None)
    return image, mask, full, (warning,) if warning else ()


def output_files(spec: SimulateSpec) -> Callable[[str], bool]:
    """The paths (relative to ``spec.out``) this case writes."""
    from pie_cli.runs.manifest import run_files

    return run_files(spec.steps, spec.trajectories, mask=spec.mask is not None, gif=spec.gif)


def check_output(spec: SimulateSpec, source: ModelSource) -> None:
    """``--out`` usable: not an input, not in use, empty or (with --overwrite) holding only what pie may replace."""
    from pie_cli.imaging.files import check_out_dir
    from pie_cli.imaging.ownership import plan_overwrite, refuse_overlap
    from pie_cli.runs.locks import LOCK_NAME, check_not_locked
    from pie_cli.runs.manifest import any_run_file

    writes = output_files(spec)
    inputs = [
        ("IMAGE", spec.image),
        ("--mask", spec.mask),
        ("--prompt-schedule", spec.prompt_schedule),
        ("--model", source.checkpoint or source.path),
        ("--model-config", source.path if source.checkpoint else None),
        ("--unet", source.unet),
        *[("--lora", adapter.path) for adapter in source.loras],
    ]
    refuse_overlap("--out", spec.out, inputs, writes)
    check_not_locked(spec.out)
    check_out_dir(spec.out, spec.overwrite)
    if spec.overwrite:
        # Refuses now, before the model loads, what the run would replace; RunWriter re-plans under the lock.
        plan_overwrite(spec.out, writes, reserved=(LOCK_NAME,), legacy_outputs=any_run_file)


def load_model(spec: SimulateSpec, inputs: Inputs, reporter: Reporter) -> tuple[Any, Any]:
    """(components, placement): the model on its device, tuned for speed (core.devices.tune_for_speed:
    channels-last, on the CPU packed weights, --compile)."""
    from pie_cli.core.devices import choose_placement, tune_for_speed
    from pie_cli.core.loading import load
    from pie_cli.core.model_files import vae_force_upcast

    placement = choose_placement(spec.device, spec.dtype, vae_force_upcast(inputs.source.path))
    for note in placement.notes:
        reporter.warn(note)
    with reporter.status(f"loading {spec.model}"):
        components = load(
            inputs.source,
            placement,
            verbose=reporter.verbose,
            allow_pickle=spec.allow_pickle,
            warn=reporter.warn,
        )
        tune_for_speed(components, placement, compile_unet=spec.compile)
    if spec.compile and placement.device.type == "cpu":
        reporter.warn(
            "--compile is not applied on the CPU: torch.compile measured slower there than pie's packed "
            "weights (benchmarks/bench_simulate.py --compile); the UNet runs eager."
        )
    return components, placement


def check_against_model(spec: SimulateSpec, inputs: Inputs, components: Any, reporter: Reporter) -> None:
    """What can only be checked once the model is known: its VAE factor and its tokenizer's length."""
    from pie_cli.core.progression import count_prompt_tokens
    from pie_cli.imaging.masks import latent_mask
    from pie_cli.imaging.media import onto_canvas

    factor = components.vae_scale_factor
    if spec.resolution % factor:
        raise UserError(
            f"--resolution {spec.resolution} is not a multiple of this model's VAE factor {factor}."
        )
    geometry = inputs.geometry()
    if any(side % factor for side in geometry.canvas):
        w, h = geometry.canvas
        raise UserError(
            f"--fit {geometry.fit} works at {w}x{h}, not a multiple of this model's VAE factor {factor}; use --fit pad."
        )
    canvas_mask = (
        onto_canvas(inputs.mask, Image.new("L", geometry.canvas, 0), geometry) if inputs.mask else None
    )
    if canvas_mask is not None and latent_mask(canvas_mask, factor).max() == 0:
        raise UserError(
            f"mask {spec.mask} is too thin to reach any {factor}x{factor} latent cell at --resolution "
            f"{spec.resolution}; dilate it (e.g. `pie mask --dilate`)."
        )
    limit = components.tokenizer.model_max_length
    for name, text in [("--prompt", p) for p in inputs.config.prompts()] + [
        ("--negative-prompt", inputs.config.negative_prompt)
    ]:
        n = count_prompt_tokens(components.tokenizer, text)
        if n > limit and inputs.config.long_prompt == "chunk":
            windows = -(-(n - 2) // (limit - 2))  # BOS and EOS wrap each window
            reporter.note(f"{name} is {n} tokens; --long-prompt chunk reads all of it, in {windows} windows.")
        elif n > limit:
            reporter.warn(
                f"{name} is {n} tokens; the text encoder reads only the first {limit}, the rest is ignored."
            )


def make_pace(spec: SimulateSpec, score_loader: ScoreLoader | None) -> tuple[Any, dict[str, Any]] | None:
    """(core Pace, its manifest record) for a spec with --pace, else None; the classifier loads here."""
    if spec.pace is None:
        return None
    from pie_cli.core.progression import Pace

    plan = pace_plan(spec)
    if score_loader is None:
        raise UserError("--pace needs a classifier loader; pie's command line passes one.")
    score, described = score_loader(str(spec.classifier), spec.target, spec.prompt or "", spec.allow_pickle)
    record = {
        **described,
        "curve": spec.pace,
        "targets": list(plan.targets) or None,
        "end": plan.end,
        "candidates": list(plan.candidates),
        "choice": "per step, the candidate b2 whose frame's score is nearest the step's target",
    }
    return Pace(score, plan.candidates, plan.targets, plan.end), record


def run(
    spec: SimulateSpec, reporter: Reporter = SILENT, score_loader: ScoreLoader | None = None
) -> SimulateResult:
    """`pie simulate IMAGE ...`: one case, K trajectories, into ``spec.out``.

    ``score_loader`` builds the scorer of a paced run (``--pace``), see :data:`ScoreLoader`.
    """
    from pie_cli.core.devices import intra_op_threads
    from pie_cli.signals import terminate_as_interrupt

    inputs = prepare_inputs(spec)
    for note in inputs.notes:
        reporter.warn(note)
    pace = make_pace(spec, score_loader)
    with terminate_as_interrupt(), intra_op_threads(spec.threads):
        components, placement = load_model(spec, inputs, reporter)
        check_against_model(spec, inputs, components, reporter)
        seconds = run_case(spec, inputs, components, placement, reporter, pace=pace)
    gif = spec.out / "progression.gif" if spec.gif and spec.trajectories == 1 else None
    return SimulateResult(spec.out, spec.steps, spec.trajectories, seconds, gif)


def run_case(
    spec: SimulateSpec,
    inputs: Inputs,
    components: Any,
    placement: Any,
    reporter: Reporter,
    resume: Resume | None = None,
    pace: tuple[Any, dict[str, Any]] | None = None,
) -> float:
    """Run one case into its folders (continuing ``resume`` if given); returns its seconds.

    ``pace`` is :func:`make_pace`'s (core Pace, record) for a paced run.
    """
    import torch

    from pie_cli.core.loading import select_scheduler
    from pie_cli.core.progression import progress_batch
    from pie_cli.imaging.annotate import watermark
    from pie_cli.runs.writer import CaseRun

    components = select_scheduler(components, spec.scheduler)
    seeds = [spec.seed + j for j in range(spec.trajectories)]
    mark = watermark if spec.watermark else None
    if resume is None:
        manifest = new_manifest(spec, inputs, components, placement)
        if pace is not None:
            manifest["pace"] = pace[1]
        case = CaseRun.new(spec.out, manifest, seeds, watermark=mark, warn=reporter.warn)
        case.open(spec.overwrite, inputs.saved_mask, output_files(spec))
        last_step = -1
    else:
        case = CaseRun.continued(spec.out, resume.manifests, watermark=mark, warn=reporter.warn)
        case.reopen(resume.point.step)
        last_step = resume.point.step
    full = inputs.full
    if full is not None:
        case.keep_clean()  # frames on disk are full size: the working frames go on from .resume/
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    started = time.perf_counter()
    try:
        reporter.start(spec.steps, "progression")
        if last_step > 0:
            reporter.advance(last_step, 0.0)
        for frames in progress_batch(
            components,
            inputs.image,
            inputs.mask,
            inputs.core_config,
            generators=generators,
            on_denoise=reporter.inner,
            resume=resume.point if resume is not None else None,
            pace=pace[0] if pace is not None else None,
        ):
            index = frames[0].index
            shown = None
            if full is not None:  # frame 0 is the original itself; later frames are pasted into it
                shown = [full.base if index == 0 else full.frame(f.image) for f in frames]
            case.write_step(
                index,
                [f.image for f in frames],
                frames[0].seconds,
                [g.get_state() for g in generators],
                paces=[f.pace for f in frames],
                shown=shown,
            )
            last_step = index
            if index > 0:
                reporter.advance(index, frames[0].seconds)
        if spec.gif or spec.trajectories > 1:
            history = case.written_frames(spec.steps)  # as on disk (watermarked, full size)
            if spec.gif:
                case.write_gifs(history)
            if spec.trajectories > 1:
                case.write_spread(history)
    except KeyboardInterrupt:
        case.finish("interrupted", total_seconds=round(time.perf_counter() - started, 3))
        done = f"frames 0..{last_step} are kept" if last_step >= 0 else "no frame was finished"
        raise Interrupted(
            f"interrupted after progression step {max(last_step, 0)} of {spec.steps}; {done} in {spec.out}. "
            f"Continue with: pie simulate --resume --out {spec.out}"
        ) from None
    except Exception as exc:
        case.finish(
            "failed",
            error=f"{type(exc).__name__}: {exc}",
            total_seconds=round(time.perf_counter() - started, 3),
        )
        raise
    total = time.perf_counter() - started
    case.finish("complete", total_seconds=round(total, 3))
    return total


def new_manifest(spec: SimulateSpec, inputs: Inputs, components: Any, placement: Any) -> dict[str, Any]:
    """The manifest of a case about to start (see :mod:`pie_cli.runs.manifest` for the schema)."""
    import torch

    from pie_cli.core.devices import speed_record
    from pie_cli.core.progression import fresh_scheduler, step_timesteps
    from pie_cli.core.registry import source_fingerprint
    from pie_cli.runs import manifest

    # Step 1's timesteps, from a private scheduler (steps with another strength have their own).
    probe = fresh_scheduler(components)
    config = inputs.config
    timesteps = step_timesteps(
        probe, config.inference_steps, config.strength_at(1), torch.device("cpu")
    ).tolist()
    return manifest.build(
        parameters=recorded_parameters(config, spec),
        model={**inputs.source.describe(), "fingerprint": source_fingerprint(inputs.source)},
        run={
            "model": spec.model,
            "model_config": spec.model_config,
            "unet": str(inputs.unet) if inputs.unet else None,
            "lora": [a.spec() for a in inputs.adapters],
            "device": spec.device,
            "dtype": spec.dtype,
            "compile": spec.compile,
            "threads": spec.threads,
            "allow_pickle": spec.allow_pickle,
        },
        scheduler={
            "class": type(components.scheduler).__name__,
            "timesteps": timesteps,
            "unet_calls_per_step": len(timesteps),
        },
        inputs=manifest.input_record(
            spec.image, inputs.full.base if inputs.full is not None else inputs.image, spec.mask, inputs.mask
        ),
        geometry={
            **inputs.geometry().describe(),
            "full_res": inputs.full.describe() if inputs.full is not None else None,
        },
        placement=placement.describe(),
        speed=speed_record(components),  # intra-op threads; per part: layout, weights, compiled
        environment=manifest.environment(placement.device.type, placement.device),
        steps=spec.steps,
    )
