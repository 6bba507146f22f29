"""Running `pie simulate`: checked spec -> model -> progression(s) -> run directories.

The command module parses options into a :class:`SimulateSpec`; this module validates it
cheaply (before any model is loaded or file written), loads the model once, runs one case
(K batched trajectories) or a cohort, and writes run directories with their manifests.
"""

from __future__ import annotations

import csv
import io
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pie_cli import __version__
from pie_cli.cli.console import info, result, ui, warn
from pie_cli.core.parameters import PieConfig
from pie_cli.errors import Interrupted, PieError, UserError

EXAMPLE_PROMPT = "large left pleural effusion"
SUMMARY = "cohort_summary.csv"


@dataclass(frozen=True)
class SimulateSpec:
    image: Path | None
    prompt: str | None
    mask: Path | None
    model: str
    out: Path
    steps: int = 10
    strength: float = 0.5
    guidance_scale: float = 7.5
    beta1: float = 0.01
    beta2: float = 0.75
    inference_steps: int = 50
    scheduler: str = "model"
    negative_prompt: str = ""
    seed: int = 42
    resolution: int = 512
    device: str = "auto"
    dtype: str = "auto"
    unet: Path | None = None
    lora: tuple[str, ...] = ()
    gif: bool = True
    overwrite: bool = False
    trajectories: int = 1
    prompt_schedule: Path | None = None
    strength_schedule: str | None = None
    guidance_schedule: str | None = None
    compile: bool = False
    watermark: bool = False
    allow_pickle: bool = False

    def parameters(self) -> dict[str, Any]:
        """The values recorded in the manifest's ``parameters`` (what :func:`plan_resume` reads back)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k in RECORDED}


# SimulateSpec fields a manifest records under "parameters"; the schedules' parsed values are
# recorded beside them as "prompts", "strengths" and "guidance_scales".
RECORDED = (
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
    "trajectories",
    "prompt_schedule",
    "strength_schedule",
    "guidance_schedule",
    "compile",
    "watermark",
)


def make_config(
    spec: SimulateSpec,
    prompts: tuple[str, ...] = (),
    strengths: tuple[float, ...] = (),
    guidances: tuple[float, ...] = (),
) -> PieConfig:
    """The PIE parameters of ``spec`` with its per-step schedules already read."""
    return PieConfig(
        prompt=spec.prompt or (prompts[0] if prompts else ""),
        negative_prompt=spec.negative_prompt,
        steps=spec.steps,
        strength=spec.strength,
        guidance_scale=spec.guidance_scale,
        beta1=spec.beta1,
        beta2=spec.beta2,
        inference_steps=spec.inference_steps,
        resolution=spec.resolution,
        prompt_schedule=prompts,
        strength_schedule=strengths,
        guidance_schedule=guidances,
    )


def build_config(spec: SimulateSpec) -> PieConfig:
    """The PIE parameters (schedules read and parsed); a ``UserError`` naming the first bad option."""
    from pie_cli.core.schedules import parse_numbers, read_prompts

    prompts: tuple[str, ...] = ()
    if spec.steps >= 1 and spec.prompt_schedule is not None:
        prompts = read_prompts(spec.prompt_schedule, spec.steps, spec.prompt)
    if not prompts and not (spec.prompt or "").strip():
        raise UserError(f"--prompt is empty; describe the finding to simulate, e.g. {EXAMPLE_PROMPT!r}.")
    strengths = (
        parse_numbers(spec.strength_schedule, spec.steps, "--strength-schedule")
        if spec.strength_schedule
        else ()
    )
    guidances = (
        parse_numbers(spec.guidance_schedule, spec.steps, "--guidance-schedule")
        if spec.guidance_schedule
        else ()
    )
    config = make_config(spec, prompts, strengths, guidances)
    for name, problem in config.problems():
        raise UserError(f"--{name.replace('_', '-')} {problem}.")
    if not 0 <= spec.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2^63), got {spec.seed}.")
    if not 1 <= spec.trajectories <= 64:
        raise UserError(f"--trajectories must be in 1..64, got {spec.trajectories}.")
    return config


@dataclass
class Inputs:
    config: PieConfig
    image: Any
    mask: Any  # the prepared R x R mask, or None
    source: Any
    unet: Path | None
    adapters: tuple


def check_inputs(spec: SimulateSpec, *, check_out: bool = True) -> Inputs:
    """Validate everything cheaply, before loading a model or creating any file."""
    from pie_cli.core.registry import parse_lora, resolve, resolve_unet_path
    from pie_cli.imaging.masks import prepare_mask, require_image_size, require_nonempty
    from pie_cli.imaging.media import open_image
    from pie_cli.runs.writer import check_out_dir

    config = build_config(spec)
    if spec.image is None:
        raise UserError("give an IMAGE (or --cohort CSV).")
    image = open_image(spec.image, "image")
    require_image_size(image, spec.image)
    mask = None
    if spec.mask is not None:
        raw_mask = open_image(spec.mask, "mask")
        mask = prepare_mask(raw_mask, image.size, spec.resolution, spec.mask)
        require_nonempty(mask, raw_mask, spec.resolution, spec.mask)
    adapters = tuple(parse_lora(s) for s in spec.lora)
    unet = resolve_unet_path(spec.unet) if spec.unet is not None else None
    if check_out:
        check_out_dir(spec.out, spec.overwrite)
    source = resolve(spec.model)
    return Inputs(config, image, mask, source, unet, adapters)


# --------------------------------------------------------------------------- model


def load_model(spec: SimulateSpec, inputs: Inputs, display: Any):
    from pie_cli.core.devices import choose_placement, tune_for_speed
    from pie_cli.core.loading import load
    from pie_cli.core.registry import vae_force_upcast

    placement = choose_placement(spec.device, spec.dtype, vae_force_upcast(inputs.source.path))
    for note in placement.notes:
        warn(note)
    with display.status(f"loading {spec.model}"):
        components = load(
            inputs.source,
            placement,
            unet=inputs.unet,
            loras=inputs.adapters,
            verbose=ui.debug,
            allow_pickle=spec.allow_pickle,
            warn=warn,
        )
        if spec.compile or placement.device.type == "cuda":
            tune_for_speed(components, placement, compile_unet=spec.compile)
    return components, placement


def check_against_model(spec: SimulateSpec, inputs: Inputs, components: Any) -> None:
    from pie_cli.core.progression import count_prompt_tokens
    from pie_cli.imaging.masks import latent_mask

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
    for name, text in [("--prompt", p) for p in inputs.config.prompts()] + [
        ("--negative-prompt", spec.negative_prompt)
    ]:
        n = count_prompt_tokens(components.tokenizer, text)
        if n > limit:
            warn(f"{name} is {n} tokens; the text encoder reads only the first {limit}, the rest is ignored.")


# --------------------------------------------------------------------------- one case


def run(spec: SimulateSpec) -> Path:
    """`pie simulate IMAGE ...`: one case, K trajectories."""
    inputs = check_inputs(spec)
    from pie_cli.cli.display import ProgressDisplay
    from pie_cli.signals import terminate_as_interrupt

    with terminate_as_interrupt(), ProgressDisplay(ui.progress) as display:
        components, placement = load_model(spec, inputs, display)
        check_against_model(spec, inputs, components)
        seconds = run_case(spec, inputs, components, placement, display)
    what = spec.out / "progression.gif" if spec.gif and spec.trajectories == 1 else spec.out
    many = f" x {spec.trajectories} trajectories" if spec.trajectories > 1 else ""
    info(
        f"pie: {spec.steps} progression steps{many} in {seconds:.1f} s ({seconds / spec.steps:.2f} s/step) -> {what}"
    )
    result(str(spec.out))
    return spec.out


@dataclass
class Resume:
    """An interrupted run to continue: its last whole step, the frames there and the RNG states."""

    step: int
    frames: list[Any]  # one PIL image per trajectory
    rng_states: list[Any]
    manifests: list[dict[str, Any]]  # [top] or [top, traj_00, ...]


def run_case(
    spec: SimulateSpec,
    inputs: Inputs,
    components: Any,
    placement: Any,
    display: Any,
    resume: Resume | None = None,
) -> float:
    import torch

    from pie_cli.core.loading import select_scheduler
    from pie_cli.core.progression import ResumePoint, fresh_scheduler, progress_batch, step_timesteps
    from pie_cli.imaging.annotate import watermark
    from pie_cli.runs.writer import RunWriter

    components = select_scheduler(components, spec.scheduler)
    config = inputs.config
    k = spec.trajectories
    seeds = [spec.seed + j for j in range(k)]
    mark = watermark if spec.watermark else None
    if resume is None:
        probe = fresh_scheduler(components)
        timesteps = step_timesteps(
            probe, config.inference_steps, config.strength_at(1), torch.device("cpu")
        ).tolist()
        manifest = _manifest(spec, inputs, placement, type(components.scheduler).__name__, timesteps)
        top = RunWriter(spec.out, manifest, watermark=mark if k == 1 else None, warn=warn)
    else:
        top = RunWriter(spec.out, resume.manifests[0], watermark=mark if k == 1 else None, warn=warn)
    if k == 1:
        writers = [top]
    else:
        writers = []
        for j, s in enumerate(seeds):
            if resume is None:
                sub = {
                    **manifest,
                    "parameters": {**manifest["parameters"], "seed": s},
                    "trajectory": j,
                    "run_id": f"{top.run_id}-{j:02d}",
                }
            else:
                sub = resume.manifests[j + 1]
            writers.append(RunWriter(spec.out / f"traj_{j:02d}", sub, lock=False, watermark=mark))
        top.manifest["trajectories"] = [f"traj_{j:02d}" for j in range(k)]
    everyone = [top, *writers] if k > 1 else writers
    if resume is None:
        for writer in everyone:
            writer.open(spec.overwrite)
        for writer in everyone:
            if inputs.mask is not None:
                writer.write_mask(inputs.mask)
    else:
        for writer in everyone:
            writer.reopen(resume.step)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    point = None if resume is None else ResumePoint(resume.step, resume.frames, resume.rng_states)
    history: list[list[Any]] = [[] for _ in range(k)]
    if resume is not None:
        for j, writer in enumerate(writers):
            history[j] = [_open_frame(writer.clean_frame(n)) for n in range(resume.step + 1)]
    started = time.perf_counter()
    last_step = resume.step if resume is not None else -1
    try:
        display.start(spec.steps, "progression")
        if resume is not None and resume.step > 0:
            display.advance(resume.step, 0.0)
        for frames in progress_batch(
            components,
            inputs.image,
            inputs.mask,
            config,
            generators=generators,
            on_denoise=display.inner,
            resume=point,
        ):
            states = [g.get_state() for g in generators]
            for j, frame in enumerate(frames):
                writers[j].write_frame(frame.index, frame.image, frame.seconds, [states[j]])
                history[j].append(frame.image)
            if k > 1:
                top.manifest["last_complete_frame"] = frames[0].index
                top.manifest["rng_states"] = [_encoded(st) for st in states]
                top._write_manifest()
            last_step = frames[0].index
            if frames[0].index > 0:
                display.advance(frames[0].index, frames[0].seconds)
        if spec.gif:
            for writer, frames in zip(writers, history, strict=True):
                writer.write_gif(frames)
        if k > 1:
            _write_spread(spec.out, history, top.run_id)
            top.manifest["outputs"].update({"uncertainty": "uncertainty.png", "mean_final": "mean_final.png"})
    except KeyboardInterrupt:
        _finish_all(everyone, "interrupted", total_seconds=round(time.perf_counter() - started, 3))
        done = f"frames 0..{last_step} are kept" if last_step >= 0 else "no frame was finished"
        raise Interrupted(
            f"interrupted after progression step {max(last_step, 0)} of {spec.steps}; {done} in {spec.out}. "
            f"Continue with: pie simulate --resume --out {spec.out}"
        ) from None
    except Exception as exc:
        _finish_all(
            everyone,
            "failed",
            error=f"{type(exc).__name__}: {exc}",
            total_seconds=round(time.perf_counter() - started, 3),
        )
        raise
    total = time.perf_counter() - started
    for writer in everyone:
        writer.finish("complete", total_seconds=round(total, 3))
    return total


def _finish_all(writers: list[Any], status: str, **extra: Any) -> None:
    """Mark every writer ``status``; a second failure (a full disk) must not hide the first."""
    for writer in writers:
        try:
            writer.finish(status, **extra)
        except OSError:
            if writer.lock is not None:
                writer.lock.release()


def _encoded(state: Any) -> str:
    from pie_cli.runs.writer import encode_state

    return encode_state(state)


def _open_frame(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


# --------------------------------------------------------------------------- resume


def resume_run(out: Path, base: SimulateSpec) -> Path:
    """`pie simulate --resume --out DIR`: continue an interrupted or killed run where it stopped."""
    from pie_cli.cli.display import ProgressDisplay
    from pie_cli.signals import terminate_as_interrupt

    plan = plan_resume(out, base)
    if plan is None:
        info(f"{out} is already complete; nothing to resume.")
        result(str(out))
        return out
    spec, inputs, point = plan
    info(f"resuming {out} after step {point.step} of {spec.steps}")
    with terminate_as_interrupt(), ProgressDisplay(ui.progress) as display:
        components, placement = load_model(spec, inputs, display)
        check_against_model(spec, inputs, components)
        seconds = run_case(spec, inputs, components, placement, display, resume=point)
    info(f"pie: steps {point.step + 1}..{spec.steps} in {seconds:.1f} s -> {out}")
    result(str(out))
    return out


def plan_resume(out: Path, base: SimulateSpec) -> tuple[SimulateSpec, Inputs, Resume] | None:
    """What continuing the run in ``out`` needs (checked, nothing loaded); None when it is complete."""
    import json

    from pie_cli.core.registry import parse_lora, resolve, resolve_unet_path
    from pie_cli.imaging.masks import prepare_mask
    from pie_cli.imaging.media import open_image
    from pie_cli.runs.writer import MANIFEST, check_not_locked, decode_state, file_sha256, frame_name

    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        raise UserError(f"--resume: {out} has no {MANIFEST}; there is no pie run to resume there.")
    try:
        top = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume: {path} is not readable JSON ({exc}).") from None
    if top.get("status") == "complete":
        return None
    record, params = top.get("run"), top.get("parameters")
    if top.get("command") != "simulate" or not isinstance(record, dict) or not isinstance(params, dict):
        raise UserError(f"--resume: {path} was not written by a resumable pie simulate run.")
    if "rng_states" not in top or top.get("last_complete_frame") is None:
        raise UserError(f"--resume: {out} stopped before its first frame was written; start it again.")
    check_not_locked(out)
    step = int(top["last_complete_frame"])
    k = int(params.get("trajectories", 1))
    subs = [out / f"traj_{j:02d}" for j in range(k)] if k > 1 else [out]
    manifests = [top]
    if k > 1:
        for sub in subs:
            try:
                manifests.append(json.loads((sub / MANIFEST).read_text(encoding="utf-8")))
            except (OSError, ValueError):
                raise UserError(f"--resume: {sub / MANIFEST} is missing or unreadable.") from None
    frames = []
    for sub, manifest in zip(subs, manifests[-k:], strict=True):
        for n in sorted({0, step}):
            entry = next((f for f in manifest.get("frames", []) if f["index"] == n), None)
            file = sub / frame_name(n)
            if entry is None or not file.is_file():
                raise UserError(f"--resume: {file} is missing; the run cannot be continued.")
            if entry.get("sha256") and file_sha256(file) != entry["sha256"]:
                raise UserError(
                    f"--resume: {file} was changed after pie wrote it; the run cannot be continued exactly."
                )
        clean = sub / ".resume" / frame_name(step)
        frames.append(_open_frame(clean if clean.exists() else sub / frame_name(step)))
    first = subs[0] / ".resume" / frame_name(0)
    image = _open_frame(first if first.exists() else subs[0] / frame_name(0))

    overridden = {"prompt_schedule", "strength_schedule", "guidance_schedule", "compile"}
    recorded = {k: params[k] for k in RECORDED if k in params and k not in overridden}
    spec = replace(
        base,
        **recorded,
        image=subs[0] / frame_name(0),
        mask=out / "mask.png" if (out / "mask.png").is_file() else None,
        model=record["model"],
        out=out,
        device=base.device if base.device != "auto" else record.get("device", "auto"),
        dtype=base.dtype if base.dtype != "auto" else record.get("dtype", "auto"),
        unet=Path(record["unet"]) if record.get("unet") else None,
        lora=tuple(record.get("lora", ())),
        overwrite=False,
        prompt_schedule=None,  # the schedules' recorded values are used, not their files
        strength_schedule=None,
        guidance_schedule=None,
        compile=base.compile or bool(record.get("compile")),
        allow_pickle=base.allow_pickle or bool(record.get("allow_pickle")),
    )
    config = make_config(
        spec,
        tuple(params.get("prompts") or ()),
        tuple(params.get("strengths") or ()),
        tuple(params.get("guidance_scales") or ()),
    )
    mask = None
    if spec.mask is not None:
        mask = prepare_mask(open_image(spec.mask, "mask"), image.size, spec.resolution, spec.mask)
    inputs = Inputs(
        config,
        image,
        mask,
        resolve(spec.model),
        resolve_unet_path(spec.unet) if spec.unet else None,
        tuple(parse_lora(s) for s in spec.lora),
    )
    states = [decode_state(t) for t in top["rng_states"]]
    if len(states) != k:
        raise UserError(f"--resume: {path} has {len(states)} generator states for {k} trajectories.")
    return spec, inputs, Resume(step, frames, states, manifests)


def _write_spread(out: Path, history: list[list[Any]], run_id: str | None = None) -> None:
    """uncertainty.png (per-pixel std of the last frames, a heat map over frame 0) and mean_final.png."""
    import numpy as np
    from PIL import Image

    from pie_cli.imaging.annotate import HEAT_LUT
    from pie_cli.imaging.media import save_png

    last = np.stack([np.asarray(frames[-1].convert("RGB"), dtype=np.float64) for frames in history])
    save_png(
        Image.fromarray(np.round(last.mean(axis=0)).astype(np.uint8), mode="RGB"),
        out / "mean_final.png",
        run_id,
    )
    std = last.std(axis=0).mean(axis=2)
    scale = max(float(std.max()), 1e-9)
    heat = HEAT_LUT[np.clip(np.round(std / scale * 255), 0, 255).astype(np.uint8)].astype(np.float64)
    alpha = (0.15 + 0.75 * std / scale)[..., None]
    base = np.asarray(history[0][0].convert("RGB"), dtype=np.float64)
    overlay = base * (1 - alpha) + heat * alpha
    save_png(Image.fromarray(np.round(overlay).astype(np.uint8), mode="RGB"), out / "uncertainty.png", run_id)


# --------------------------------------------------------------------------- cohorts


def run_cohort(cohort: Path, base: SimulateSpec) -> Path:
    """`pie simulate --cohort cases.csv --out DIR`: one run directory per case, the model loaded once."""
    import json

    from pie_cli.cli.display import ProgressDisplay
    from pie_cli.simulate.cohort import process_rank, read_cohort, split

    if base.image is not None:
        raise UserError("give an IMAGE or --cohort, not both.")
    cases = read_cohort(cohort)
    rank, world = process_rank()
    plans: list[tuple[Any, SimulateSpec, Inputs | None, str, Resume | None]] = []
    for case in split(cases, rank, world):
        values = dict(case.values)
        values.setdefault("seed", base.seed + case.index)
        out = base.out / case.name
        manifest = out / "manifest.json"
        status = None
        if manifest.is_file():
            try:
                status = json.loads(manifest.read_text()).get("status")
            except json.JSONDecodeError:
                status = None
        spec = replace(base, out=out, overwrite=base.overwrite or status is not None, **values)
        if status == "complete" and not base.overwrite:
            plans.append((case, spec, None, "skipped (complete)", None))
            continue
        if status in ("interrupted", "running") and not base.overwrite:
            # A case stopped by Ctrl-C, SIGTERM or a kill goes on from its last whole frame.
            try:
                plan = plan_resume(out, replace(spec, overwrite=False))
            except UserError as exc:
                warn(f"cohort case {case.name} cannot be resumed ({exc}); running it again.")
                plan = None
            if plan is not None:
                plans.append((case, plan[0], plan[1], "resumed", plan[2]))
                continue
        try:
            plans.append((case, spec, check_inputs(spec), "pending", None))
        except UserError as exc:
            raise UserError(f"--cohort {cohort} row {case.row}: {exc}") from None
    from pie_cli.signals import terminate_as_interrupt

    rows = []
    failures = 0
    with terminate_as_interrupt(), ProgressDisplay(ui.progress) as display:
        components = placement = None
        for index, (case, spec, inputs, status, point) in enumerate(plans):
            if inputs is None:
                rows.append([case.name, status, 0.0, str(spec.out)])
                continue
            if components is None:
                components, placement = load_model(spec, inputs, display)
            try:
                check_against_model(spec, inputs, components)
                seconds = run_case(spec, inputs, components, placement, display, resume=point)
                rows.append([case.name, "complete", round(seconds, 3), str(spec.out)])
            except Interrupted:
                rows.append([case.name, "interrupted", 0.0, str(spec.out)])
                rows += [[c.name, "not started", 0.0, str(sp.out)] for c, sp, *_ in plans[index + 1 :]]
                if world == 1:  # other processes may still be running: no rendezvous now
                    _write_summary(base.out, rows, rank, world, [c.name for c in cases])
                raise Interrupted(
                    f"interrupted during cohort case {case.name}; its whole frames are kept. Rerun the same "
                    "command to go on: complete cases are skipped, interrupted ones resumed."
                ) from None
            except UserError as exc:
                failures += 1
                rows.append([case.name, f"failed: {exc}", 0.0, str(spec.out)])
            except (RuntimeError, ValueError, OSError) as exc:
                if ui.debug:
                    raise
                failures += 1
                rows.append([case.name, f"failed: {type(exc).__name__}: {exc}", 0.0, str(spec.out)])
    _write_summary(base.out, rows, rank, world, [c.name for c in cases])
    done = sum(r[1] == "complete" for r in rows)
    info(
        f"cohort: {done} run, {sum(r[1].startswith('skipped') for r in rows)} skipped, {failures} failed "
        f"-> {base.out / SUMMARY}"
    )
    result(str(base.out))
    if failures:
        raise PieError(f"{failures} cohort case(s) failed; see {base.out / SUMMARY}.")
    return base.out


def _write_summary(
    out: Path, rows: list[list[Any]], rank: int, world: int, order: list[str] | None = None
) -> None:
    from pie_cli.imaging.media import write_text

    out.mkdir(parents=True, exist_ok=True)
    name = SUMMARY if world == 1 else f"cohort_summary.rank{rank}.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "status", "seconds", "output"])
    writer.writerows(rows)
    write_text(out / name, buffer.getvalue())
    if world > 1:
        from pie_cli.core.distributed import process_state

        state = process_state()
        state.wait_for_everyone()
        if state.is_main_process:
            merged = []
            for r in range(world):
                part = out / f"cohort_summary.rank{r}.csv"
                with part.open(newline="") as fh:
                    merged += list(csv.reader(fh))[1:]
            position = {name: k for k, name in enumerate(order or [])}
            merged.sort(
                key=lambda row: position.get(row[0], len(position))
            )  # the CSV's order, not the ranks'
            buffer = io.StringIO()
            csv.writer(buffer).writerows([["case", "status", "seconds", "output"], *merged])
            write_text(out / SUMMARY, buffer.getvalue())
            for r in range(world):
                (out / f"cohort_summary.rank{r}.csv").unlink(missing_ok=True)


# --------------------------------------------------------------------------- manifest


def _manifest(
    spec: SimulateSpec, inputs: Inputs, placement: Any, scheduler_class: str, timesteps: list[int]
) -> dict[str, Any]:
    from pie_cli.runs.writer import file_sha256

    model = inputs.source.describe()
    if inputs.unet is not None:
        model["unet"] = str(inputs.unet)
    model["loras"] = model["loras"] + [a.spec() for a in inputs.adapters]
    parameters = spec.parameters()
    if inputs.config.prompt_schedule:
        parameters["prompts"] = list(inputs.config.prompt_schedule)
    if inputs.config.strength_schedule:
        parameters["strengths"] = list(inputs.config.strength_schedule)
    if inputs.config.guidance_schedule:
        parameters["guidance_scales"] = list(inputs.config.guidance_schedule)
    # No input paths or command line: file and folder names often carry patient names or IDs.
    # The inputs are identified by content hash and pixel geometry only.
    return {
        "pie_version": __version__,
        "command": "simulate",
        "synthetic": True,
        "parameters": parameters,
        "model": model,
        "run": {
            "model": spec.model,
            "unet": str(spec.unet) if spec.unet else None,
            "lora": list(spec.lora),
            "device": spec.device,
            "dtype": spec.dtype,
            "compile": spec.compile,
            "allow_pickle": spec.allow_pickle,
        },
        "scheduler": {
            "class": scheduler_class,
            "timesteps": timesteps,
            "unet_calls_per_step": len(timesteps),
        },
        "inputs": {
            "image_sha256": file_sha256(spec.image),
            "image_size": list(inputs.image.size),
            "image_mode": inputs.image.mode,
            "mask": spec.mask is not None,
            "mask_sha256": file_sha256(spec.mask) if spec.mask else None,
        },
        "placement": placement.describe(),
        "environment": _environment(placement),
        "outputs": {"frames": [f"frame_{0:03d}.png", f"frame_{spec.steps:03d}.png"]},
    }


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
