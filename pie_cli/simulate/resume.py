"""`pie simulate --resume --out DIR`: continue an interrupted or killed run after its last whole frame.

The run's own manifest says everything needed: its parameters, how its model was asked for,
its last whole step and the generators' states after it. The spec is rebuilt from those
records and checked by the same :func:`~pie_cli.simulate.spec.build_config` as a fresh run,
so a damaged or edited manifest is refused with a sentence naming it. Only ``--device``,
``--dtype``, ``--compile``, ``--threads`` and ``--allow-pickle`` may be given again (bit-identical
frames on the CPU need the run's own thread count, which its manifest records under ``speed``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from pie_cli.errors import UserError
from pie_cli.reporting import SILENT, Reporter
from pie_cli.simulate.run import (
    Inputs,
    Resume,
    ScoreLoader,
    SimulateResult,
    check_against_model,
    fit_inputs,
    load_model,
    make_pace,
    run_case,
)
from pie_cli.simulate.spec import RECORDED, SCHEDULE_RECORDS, SimulateSpec, build_config, recorded_value

# Recorded options a resume does not take back: the schedules' values are used, not their files,
# and --compile is the resuming command's choice.
_NOT_RESTORED = {*SCHEDULE_RECORDS, "compile"}


def resume_run(
    out: Path,
    base: SimulateSpec,
    reporter: Reporter = SILENT,
    given: dict[str, Any] | None = None,
    score_loader: ScoreLoader | None = None,
) -> SimulateResult:
    """Continue the run in ``out``; ``base`` carries the resuming command's device options.

    ``given`` holds run options the command repeated (a requeued job's original command line):
    each must match what the run recorded, or the resume is refused naming it.
    """
    from pie_cli.core.devices import intra_op_threads
    from pie_cli.signals import terminate_as_interrupt

    plan = plan_resume(out, base, given)
    if plan is None:
        return SimulateResult(Path(out), 0, 1, 0.0, None, already_complete=True)
    spec, inputs, resume = plan
    pace = make_pace(spec, score_loader)  # a paced run follows its recorded curve and classifier
    step = resume.point.step
    reporter.note(f"resuming {out} after step {step} of {spec.steps}")
    with terminate_as_interrupt(), intra_op_threads(spec.threads):
        components, placement = load_model(spec, inputs, reporter)
        check_against_model(spec, inputs, components, reporter)
        seconds = run_case(spec, inputs, components, placement, reporter, resume=resume, pace=pace)
    gif = spec.out / "progression.gif" if spec.gif and spec.trajectories == 1 else None
    return SimulateResult(spec.out, spec.steps, spec.trajectories, seconds, gif, first_step=step + 1)


def plan_resume(
    out: Path, base: SimulateSpec, given: dict[str, Any] | None = None
) -> tuple[SimulateSpec, Inputs, Resume] | None:
    """What continuing the run in ``out`` needs (checked, nothing loaded); None when it is complete."""
    from pie_cli.core.model_files import resolve_unet_path
    from pie_cli.core.progression import ResumePoint
    from pie_cli.core.registry import parse_lora, resolve, source_fingerprint
    from pie_cli.imaging.media import open_image
    from pie_cli.runs import manifest as runs_manifest
    from pie_cli.runs.locks import check_not_locked
    from pie_cli.runs.manifest import MANIFEST, MASK, RESUME_DIR, decode_state, file_sha256, frame_name
    from pie_cli.runs.writer import ORIGINAL

    out = Path(out)
    path = out / MANIFEST
    top = runs_manifest.read(out, "--resume")
    if top is None:
        raise UserError(f"--resume: {out} has no {MANIFEST}; there is no pie run to resume there.")
    if top.get("status") == "complete":
        return None
    record, params = top.get("run"), top.get("parameters")
    if top.get("command") != "simulate" or not isinstance(record, dict) or not isinstance(params, dict):
        raise UserError(f"--resume: {path} was not written by a resumable pie simulate run.")
    if not isinstance(top.get("rng_states"), list) or top.get("last_complete_frame") is None:
        raise UserError(f"--resume: {out} stopped before its first frame was written; start it again.")
    check_not_locked(out)
    where = f"--resume: {path}"
    step = _count(top.get("last_complete_frame"), f"{where}: last_complete_frame")
    k = _count(params.get("trajectories", 1), f"{where}: trajectories")
    if k < 1:
        raise UserError(f"{where}: trajectories is {k}, not a count of trajectories.")
    subs = [out / runs_manifest.trajectory_dir(j) for j in range(k)] if k > 1 else [out]
    values = {
        name: recorded_value(name, params[name], where)
        for name in RECORDED
        if name in params and name not in _NOT_RESTORED
    }
    unet = recorded_value("unet", record.get("unet"), f"{where}: run")
    lora = record.get("lora", [])
    if not isinstance(lora, list) or not all(isinstance(s, str) for s in lora):
        raise UserError(f"{where} records run.lora = {lora!r}, which is not a list of PATH:WEIGHT texts.")
    model = record.get("model")
    if not isinstance(model, str):
        raise UserError(f"{where} records run.model = {model!r}, which is not a model reference.")
    model_config = record.get("model_config")
    if model_config is not None and not isinstance(model_config, str):
        raise UserError(
            f"{where} records run.model_config = {model_config!r}, which is not a model reference."
        )
    if base.model_config is not None and base.model_config != model_config:
        raise UserError(
            f"--resume: --model-config differs from the run in {out}; drop it to continue the run as it was "
            "started, or start a new run with the new value."
        )
    spec = replace(
        base.with_values(**values),
        image=subs[0] / frame_name(0),
        mask=out / MASK if (out / MASK).is_file() else None,
        model=model,
        model_config=model_config,
        out=out,
        device=base.device if base.device != "auto" else str(record.get("device", "auto")),
        dtype=base.dtype if base.dtype != "auto" else str(record.get("dtype", "auto")),
        unet=unet,
        lora=tuple(lora),
        overwrite=False,
        prompt_schedule=None,  # the schedules' recorded values are used, not their files
        strength_schedule=None,
        guidance_schedule=None,
        beta2_schedule=None,
        compile=base.compile or bool(record.get("compile")),
        allow_pickle=base.allow_pickle,  # never from the file: pickles open only when the command says so
    )
    schedules = tuple(_recorded_list(params, key, where) for key in SCHEDULE_RECORDS.values())
    try:
        config = build_config(spec, schedules)  # the same checks as a fresh run
    except UserError as exc:
        raise UserError(f"{where} holds parameters pie cannot run: {exc}") from None
    if given:
        _check_given(given, spec, config, top, out)
    if len(top["rng_states"]) != k:
        raise UserError(
            f"--resume: {path} has {len(top['rng_states'])} generator states for {k} trajectories."
        )
    try:
        states = [decode_state(t) for t in top["rng_states"]]
        import torch

        for state in states:  # a state of the wrong size or content is refused by torch itself
            torch.Generator("cpu").set_state(state)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{where} holds generator states that cannot be decoded.") from None
    manifests = [top]
    if k > 1:
        for sub in subs:
            manifest = runs_manifest.read(sub, "--resume")
            if manifest is None:
                raise UserError(f"--resume: {sub / MANIFEST} is missing or unreadable.")
            manifests.append(manifest)
    frames = []
    for sub, manifest in zip(subs, manifests[-k:], strict=True):
        for n in sorted({0, step}):
            entry = next(
                (f for f in manifest.get("frames", []) if isinstance(f, dict) and f.get("index") == n), None
            )
            file = sub / frame_name(n)
            if entry is None or not file.is_file():
                raise UserError(f"--resume: {file} is missing; the run cannot be continued.")
            if entry.get("sha256") and file_sha256(file) != entry["sha256"]:
                raise UserError(
                    f"--resume: {file} was changed after pie wrote it; the run cannot be continued exactly."
                )
        clean = sub / RESUME_DIR / frame_name(step)
        frames.append(_open_frame(clean if clean.exists() else sub / frame_name(step)))
    first = subs[0] / RESUME_DIR / frame_name(0)
    if spec.full_res:  # frame 0 on disk is the original at its size and depth; the window is cut again
        original = subs[0] / RESUME_DIR / ORIGINAL  # kept clean when frame 0 carries a watermark
        image = open_image(original if original.exists() else subs[0] / frame_name(0), "frame")
    else:
        image = _open_frame(first if first.exists() else subs[0] / frame_name(0))
    raw_mask = open_image(spec.mask, "mask") if spec.mask is not None else None
    image, mask, full, _ = fit_inputs(spec, config, image, raw_mask)
    adapters = tuple(parse_lora(s) for s in spec.lora)
    unet_path = resolve_unet_path(spec.unet) if spec.unet else None
    source = resolve(spec.model, config=spec.model_config).with_overrides(unet=unet_path, loras=adapters)
    recorded = top.get("model", {}).get("fingerprint") if isinstance(top.get("model"), dict) else None
    if recorded is not None and recorded != source_fingerprint(source):
        raise UserError(
            f"--resume: the model of {out} changed since the run started ({spec.model} now resolves to "
            f"{source.checkpoint or source.path}, with other files); continuing would mix two models. Point it back, "
            "or start a new run."
        )
    from pie_cli.core.single_file import check_source_weights

    check_source_weights(source, spec.allow_pickle)  # a pickle opens only with this command's --allow-pickle
    inputs = Inputs(config, image, mask, source, unet_path, adapters, full)
    return spec, inputs, Resume(ResumePoint(step, frames, states), manifests)


def _check_given(
    given: dict[str, Any], spec: SimulateSpec, config: Any, top: dict[str, Any], out: Path
) -> None:
    """Every run option given again with --resume equals the run's own, or a ``UserError`` naming it."""
    from pie_cli.core.registry import parse_lora
    from pie_cli.core.schedules import parse_numbers, read_prompts
    from pie_cli.runs.manifest import file_sha256

    inputs = top.get("inputs") if isinstance(top.get("inputs"), dict) else {}
    for name, value in given.items():
        flag = "IMAGE" if name == "image" else "--" + name.replace("_", "-")
        if name == "image":
            same = value is not None and file_sha256(value) == inputs.get("image_sha256")
        elif name == "mask":
            same = (file_sha256(value) if value is not None else None) == inputs.get("mask_sha256")
        elif name == "lora":
            same = [parse_lora(s).spec() for s in value] == list(spec.lora)
        elif name == "unet":
            from pie_cli.core.model_files import resolve_unet_path

            same = (str(resolve_unet_path(value)) if value is not None else None) == (
                str(spec.unet) if spec.unet else None
            )
        elif name == "prompt_schedule":
            same = value is None or read_prompts(value, config.steps, spec.prompt) == config.prompt_schedule
        elif name in ("strength_schedule", "guidance_schedule", "beta2_schedule"):
            recorded = getattr(config, name)
            same = value is None or parse_numbers(value, config.steps, flag) == recorded
        else:
            current = (
                getattr(spec.params, name)
                if hasattr(spec.params, name) and name != "prompt"
                else getattr(spec, name)
            )
            same = value == current
        if not same:
            raise UserError(
                f"--resume: {flag} differs from the run in {out}; drop it to continue the run as it was "
                "started, or start a new run with the new value."
            )


def _count(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{where} is {value!r}, not a count.")
    return value


def _recorded_list(params: dict[str, Any], key: str, where: str) -> tuple:
    """A schedule's recorded values: texts for "prompts", numbers for the others."""
    values = params.get(key) or ()
    texts = key == "prompts"
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, str) if texts else (isinstance(v, (int, float)) and not isinstance(v, bool))
        for v in values
    ):
        kind = "texts" if texts else "numbers"
        raise UserError(f"{where} records {key} = {values!r}, which is not a list of {kind}.")
    return tuple(values) if texts else tuple(float(v) for v in values)


def _open_frame(path: Path) -> Image.Image:
    from pie_cli.imaging.media import open_image

    return open_image(path, "frame").convert("RGB")
