"""`pie simulate`: options -> checked spec -> model -> progression -> run directory."""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from pie_cli import __version__
from pie_cli.console import info, result, ui, warn
from pie_cli.errors import UserError
from pie_cli.options import (
    DebugOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    ResolutionOpt,
    SchedulerName,
    SeedOpt,
)
from pie_cli.parameters import PieConfig

EXAMPLE_PROMPT = "large left pleural effusion"


@dataclass(frozen=True)
class SimulateSpec:
    image: Path
    prompt: str
    mask: Path | None
    model: str
    out: Path
    steps: int
    strength: float
    guidance_scale: float
    beta1: float
    beta2: float
    inference_steps: int
    scheduler: str
    negative_prompt: str
    seed: int
    resolution: int
    device: str
    dtype: str
    unet: Path | None
    lora: tuple[str, ...]
    gif: bool
    overwrite: bool

    def config(self) -> PieConfig:
        return PieConfig(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            strength=self.strength,
            guidance_scale=self.guidance_scale,
            beta1=self.beta1,
            beta2=self.beta2,
            inference_steps=self.inference_steps,
            resolution=self.resolution,
        )

    def parameters(self) -> dict[str, Any]:
        keep = [
            "prompt",
            "negative_prompt",
            "steps",
            "strength",
            "guidance_scale",
            "beta1",
            "beta2",
            "inference_steps",
            "scheduler",
            "resolution",
            "seed",
            "gif",
        ]
        return {k: v for k, v in asdict(self).items() if k in keep}


def simulate(
    image: Annotated[
        Path,
        typer.Argument(
            help="Input image: PNG, JPEG, TIFF, BMP, WebP (8- or 16-bit).",
            metavar="IMAGE",
            show_default=False,
        ),
    ],
    prompt: Annotated[
        str,
        typer.Option(
            "--prompt", "-p", help="Clinical report text describing the finding.", show_default=False
        ),
    ],
    mask: Annotated[
        Path | None,
        typer.Option(
            "--mask",
            help="Edit mask (white = may change, grey = partly): the image's size or R x R.",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = "sd-v1-5",
    out: OutOpt = None,
    steps: Annotated[
        int, typer.Option("--steps", "-n", help="Progression steps N (frames after frame 0).")
    ] = 10,
    strength: Annotated[
        float, typer.Option("--strength", "-g", help="Fraction of the schedule re-run per step, in (0, 1].")
    ] = 0.5,
    guidance_scale: Annotated[
        float, typer.Option("--guidance-scale", "-w", help="Classifier-free guidance scale.")
    ] = 7.5,
    beta1: Annotated[
        float, typer.Option("--beta1", help="Blend weight outside the mask (0 = keep the input).")
    ] = 0.01,
    beta2: Annotated[float, typer.Option("--beta2", help="Blend weight inside the mask.")] = 0.75,
    inference_steps: Annotated[
        int, typer.Option("--inference-steps", "-T", help="Scheduler steps of a full schedule.")
    ] = 50,
    scheduler: Annotated[
        SchedulerName, typer.Option("--scheduler", help="Denoising scheduler; 'model' = the model's own.")
    ] = SchedulerName.model,
    negative_prompt: Annotated[
        str, typer.Option("--negative-prompt", help="Text for the unconditional branch of guidance.")
    ] = "",
    seed: SeedOpt = 42,
    resolution: ResolutionOpt = 512,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
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
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Simulate disease progression: frames in which the finding of PROMPT appears and grows inside MASK."""
    spec = SimulateSpec(
        image=image,
        prompt=prompt,
        mask=mask,
        model=model,
        out=out if out is not None else _default_out(image),
        steps=steps,
        strength=strength,
        guidance_scale=guidance_scale,
        beta1=beta1,
        beta2=beta2,
        inference_steps=inference_steps,
        scheduler=scheduler.value,
        negative_prompt=negative_prompt,
        seed=seed,
        resolution=resolution,
        device=device,
        dtype=dtype.value,
        unet=unet,
        lora=tuple(lora or ()),
        gif=gif,
        overwrite=overwrite,
    )
    run(spec)


def _default_out(image: Path) -> Path:
    from pie_cli.runs import default_out_dir

    return default_out_dir(image)


def check_numbers(spec: SimulateSpec) -> None:
    """Every numeric/text option, before anything is read or loaded."""
    if not spec.prompt.strip():
        raise UserError(f"--prompt is empty; describe the finding to simulate, e.g. {EXAMPLE_PROMPT!r}.")
    for name, problem in spec.config().problems():
        raise UserError(f"--{name.replace('_', '-')} {problem}.")
    if not 0 <= spec.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2^63), got {spec.seed}.")


@dataclass
class _Inputs:
    image: Any
    mask: Any  # prepared R x R mask or None
    source: Any
    unet: Path | None
    adapters: tuple


def check_inputs(spec: SimulateSpec) -> _Inputs:
    """Validate everything cheaply, before loading a model or creating any file."""
    from pie_cli.masks import prepare_mask, require_nonempty
    from pie_cli.media import open_image
    from pie_cli.registry import parse_lora, resolve, resolve_unet_path
    from pie_cli.runs import check_out_dir

    check_numbers(spec)
    image = open_image(spec.image, "image")
    mask = None
    if spec.mask is not None:
        raw_mask = open_image(spec.mask, "mask")
        mask = prepare_mask(raw_mask, image.size, spec.resolution, spec.mask)
        require_nonempty(mask, raw_mask, spec.resolution, spec.mask)
    adapters = tuple(parse_lora(s) for s in spec.lora)
    unet = resolve_unet_path(spec.unet) if spec.unet is not None else None
    check_out_dir(spec.out, spec.overwrite)
    source = resolve(spec.model)
    return _Inputs(image, mask, source, unet, adapters)


def run(spec: SimulateSpec) -> Path:
    inputs = check_inputs(spec)

    from pie_cli.progress import ProgressDisplay

    with ProgressDisplay(ui.progress) as display:
        components, placement = _load_model(spec, inputs, display)
        seconds = _run_progression(spec, inputs, components, placement, display)
    # After the live display has stopped, so the lines do not interleave with the bars.
    what = spec.out / "progression.gif" if spec.gif else spec.out
    info(
        f"pie: {spec.steps} progression steps in {seconds:.1f} s ({seconds / spec.steps:.2f} s/step) -> {what}"
    )
    result(str(spec.out))
    return spec.out


def _load_model(spec: SimulateSpec, inputs: _Inputs, display: Any):
    from pie_cli.devices import choose_placement
    from pie_cli.loading import load, select_scheduler
    from pie_cli.masks import latent_mask
    from pie_cli.progression import count_prompt_tokens
    from pie_cli.registry import vae_force_upcast

    placement = choose_placement(spec.device, spec.dtype, vae_force_upcast(inputs.source.path))
    for note in placement.notes:
        warn(note)
    with display.status(f"loading {spec.model}"):
        components = load(inputs.source, placement, unet=inputs.unet, loras=inputs.adapters, verbose=ui.debug)
    components = select_scheduler(components, spec.scheduler)

    factor = components.vae_scale_factor
    if spec.resolution % factor:
        raise UserError(
            f"--resolution {spec.resolution} is not a multiple of this model's VAE factor {factor}."
        )
    if inputs.mask is not None and latent_mask(inputs.mask, factor).max() == 0:
        raise UserError(
            f"mask {spec.mask} is too thin to reach any {factor}x{factor} latent cell at --resolution "
            f"{spec.resolution}; dilate it (e.g. `pie mask --dilate`)."
        )
    limit = components.tokenizer.model_max_length
    for name, text in (("--prompt", spec.prompt), ("--negative-prompt", spec.negative_prompt)):
        n = count_prompt_tokens(components.tokenizer, text)
        if n > limit:
            warn(f"{name} is {n} tokens; the text encoder reads only the first {limit}, the rest is ignored.")
    return components, placement


def _run_progression(
    spec: SimulateSpec, inputs: _Inputs, components: Any, placement: Any, display: Any
) -> Path:
    import torch

    from pie_cli.progression import fresh_scheduler, progress, step_timesteps
    from pie_cli.runs import RunWriter

    config = spec.config()
    probe = fresh_scheduler(components)
    timesteps = step_timesteps(probe, spec.inference_steps, spec.strength, torch.device("cpu")).tolist()
    manifest = _manifest(spec, inputs, placement, type(components.scheduler).__name__, timesteps)

    writer = RunWriter(spec.out, manifest)
    writer.open(spec.overwrite)
    if inputs.mask is not None:
        writer.write_mask(inputs.mask)
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    frames = []
    started = time.perf_counter()
    try:
        display.start(spec.steps, "progression")
        for frame in progress(
            components, inputs.image, inputs.mask, config, generator=generator, on_denoise=display.inner
        ):
            writer.write_frame(frame.index, frame.image, frame.seconds)
            frames.append(frame.image)
            if frame.index > 0:
                display.advance(frame.index, frame.seconds)
        if spec.gif:
            writer.write_gif(frames)
    except KeyboardInterrupt:
        writer.finish("interrupted", total_seconds=round(time.perf_counter() - started, 3))
        raise
    except Exception as exc:
        writer.finish(
            "failed",
            error=f"{type(exc).__name__}: {exc}",
            total_seconds=round(time.perf_counter() - started, 3),
        )
        raise
    total = time.perf_counter() - started
    writer.finish("complete", total_seconds=round(total, 3))
    return total


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(
    spec: SimulateSpec, inputs: _Inputs, placement: Any, scheduler_class: str, timesteps: list[int]
) -> dict[str, Any]:
    model = inputs.source.describe()
    if inputs.unet is not None:
        model["unet"] = str(inputs.unet)
    model["loras"] = model["loras"] + [a.spec() for a in inputs.adapters]
    data: dict[str, Any] = {
        "pie_version": __version__,
        "command": "simulate",
        "argv": sys.argv[1:],
        "parameters": spec.parameters(),
        "model": model,
        "scheduler": {
            "class": scheduler_class,
            "timesteps": timesteps,
            "unet_calls_per_step": len(timesteps),
        },
        "inputs": {
            "image": str(spec.image),
            "image_sha256": _sha256(spec.image),
            "image_size": list(inputs.image.size),
            "mask": str(spec.mask) if spec.mask else None,
            "mask_sha256": _sha256(spec.mask) if spec.mask else None,
        },
        "placement": placement.describe(),
        "environment": _environment(placement),
        "outputs": {"frames": [f"frame_{0:03d}.png", f"frame_{spec.steps:03d}.png"]},
    }
    return data


def _environment(placement: Any) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pillow"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    if placement.device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(placement.device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env
